"""Generation controls: stop strings (streamed with a held-back tail), CTRL's repetition penalty,
min_new_tokens, stop_reason; in generate_tokens / generate_text, chat, the CLI and the recipe.

Tiny random models (1-2 layers, 32 wide) and a small trained BPE; oracles are written here without the
KV cache or the streaming code.
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rich.console import Console

from llmstages import checkpoint
from llmstages.checkpoint import Checkpoint, save_checkpoint
from llmstages.cli import main
from llmstages.config import build_recipe
from llmstages.errors import RecipeError, UserError
from llmstages.model import GPT, GPTConfig
from llmstages.sampling import generate_tokens, penalize_repeats
from llmstages.stages.chat import chat
from llmstages.stages.generate import Sampling, generate_text
from llmstages.stopping import StopStrings
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer, train_bpe

TEXT = "the cat sat on the mat. the dog ate the bone! a bird, a tree; one two three four five six.\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe([TEXT] * 30, 300)


def tiny_model(vocab: int, seed: int = 0, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


def ckpt_of(tok: Tokenizer, meta: dict | None = None) -> Checkpoint:
    return Checkpoint(tiny_model(tok.vocab_size), tok, dict({"task": "pretrain"}, **(meta or {})), None)


def ids_of(ckpt: Checkpoint, prompt: str, n: int) -> list[int]:
    """Greedy ids without end-of-text handling (the reference reply)."""
    return list(generate_tokens(ckpt.model, ckpt.tokenizer.encode(prompt), max_new_tokens=n))


# --- repetition penalty ----------------------------------------------------------------------------
def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [3.0, -1.0, 0.0, -0.5]])
    seen = torch.tensor([[True, True, False, False], [False, True, True, True]])
    out = penalize_repeats(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5], [3.0, -2.0, 0.0, -1.0]]


def greedy_with_penalty_oracle(model: GPT, prompt: list[int], n: int, penalty: float) -> list[int]:
    """A full forward pass per token, then a per-token loop over the context's distinct ids."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([tokens]))[0, -1].float().clone()
            for t in set(tokens):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def test_repetition_penalty_matches_the_oracle_on_both_paths_and_changes_the_reply():
    model, prompt = tiny_model(97), [5, 17, 42, 5]
    plain = list(generate_tokens(model, prompt, max_new_tokens=30))
    expected = greedy_with_penalty_oracle(model, prompt, 30, 3.0)
    for use_cache in (True, False):
        got = list(generate_tokens(model, prompt, max_new_tokens=30, repetition_penalty=3.0, use_cache=use_cache))
        assert got == expected
    assert expected != plain  # a random model's greedy reply repeats itself; the penalty changes it
    assert len(set(expected)) > len(set(plain))


def test_sampled_generation_with_every_control_is_the_same_with_and_without_cache():
    model = tiny_model(97, seed=3)
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=20, seed=7, repetition_penalty=1.5, min_new_tokens=6,
                  stop_id=3)
    assert list(generate_tokens(model, [1, 2, 3], **kwargs, use_cache=True)) == \
        list(generate_tokens(model, [1, 2, 3], **kwargs, use_cache=False))


# --- min_new_tokens --------------------------------------------------------------------------------
def test_min_new_tokens_masks_the_stop_token_until_then():
    model = tiny_model(97)
    first = list(generate_tokens(model, [1, 2], max_new_tokens=1))[0]
    assert list(generate_tokens(model, [1, 2], max_new_tokens=10, stop_id=first)) == [first]
    for use_cache in (True, False):
        out = list(generate_tokens(model, [1, 2], max_new_tokens=10, stop_id=first, min_new_tokens=4,
                                   use_cache=use_cache))
        assert first not in out[:4]
        assert out[-1] == first and len(out) >= 5 if first in out else len(out) == 10


# --- stop strings: the streaming scanner -----------------------------------------------------------
def test_streaming_holds_back_what_could_start_a_stop_string():
    stops = StopStrings(["###"])
    assert stops.feed("ab#") == "a"  # "b#" might begin "###": the last len("###") - 1 characters wait
    assert stops.feed("#x") == "b#"  # "ab##x": "#x" waits
    assert stops.feed("y##") == "#xy"
    assert stops.feed("#tail") == "" and stops.stopped and stops.text == "ab##xy"


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab#\n", max_size=4), max_size=12),
       stops=st.lists(st.text(alphabet="ab#\n", min_size=1, max_size=3), max_size=3),
       armed_after=st.integers(0, 6))
@example(pieces=["\n#", "#"], stops=["#", "\n##"], armed_after=0)  # "#" completes while "\n##" is still open
def test_stop_strings_against_an_oracle(pieces, stops, armed_after):
    """Shown text is always a prefix of the reply, and shown + flush is the whole reply. Generation ends
    with the first piece after which the text holds a stop string starting after the unarmed pieces
    (min_new_tokens); the reply is that text cut before the earliest-starting stop string in it. (A
    longer stop string that starts earlier but is not complete yet never will be: nothing more is
    generated.)"""
    scanner, shown = StopStrings(stops), ""
    for i, piece in enumerate(pieces):
        shown += scanner.feed(piece, armed=i >= armed_after)
        if scanner.stopped:
            break
    shown += scanner.flush()
    boundary = len("".join(pieces[:armed_after]))
    text, hits = "", []
    for i, piece in enumerate(pieces):
        text += piece
        hits = [j for j in (text.find(s, boundary) for s in stops) if j >= 0] if i >= armed_after else []
        if hits:
            break
    assert shown == scanner.text == (text[:min(hits)] if hits else text)
    assert scanner.stopped == bool(hits)


# --- generate_text: stop_reason, streaming, min_new_tokens -----------------------------------------
def test_generate_text_ends_before_a_stop_string_and_streams_no_part_of_it(tok):
    ckpt = ckpt_of(tok)
    reference = generate_text(ckpt, "the cat", max_new_tokens=24, temperature=0.0)
    assert reference.stop_reason == "max_new_tokens" and reference.tokens == 24
    text = reference.completion
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    pieces: list[str] = []
    cut = generate_text(ckpt, "the cat", max_new_tokens=24, temperature=0.0, stop=["never-there", stop],
                        on_text=pieces.append)
    assert cut.stop_reason == "stop_string" and cut.completion == text[:text.find(stop)]
    assert "".join(pieces) == cut.completion and cut.tokens < 24
    assert cut.to_json()["stop_reason"] == "stop_string"


def test_min_new_tokens_ignores_stop_strings_in_the_first_tokens(tok):
    ckpt = ckpt_of(tok)
    ids = ids_of(ckpt, "the dog", 24)
    text = tok.decode(ids)
    stop = text[:2]  # matches at once without min_new_tokens
    assert generate_text(ckpt, "the dog", max_new_tokens=24, temperature=0.0, stop=[stop]).completion == ""
    boundary = len(tok.decode(ids[:5]))
    later = text.find(stop, boundary)
    result = generate_text(ckpt, "the dog", max_new_tokens=24, temperature=0.0, stop=[stop], min_new_tokens=5)
    assert result.completion == (text[:later] if later >= 0 else text)
    assert result.stop_reason == ("stop_string" if later >= 0 else "max_new_tokens")


def test_stop_reason_eos_and_min_new_tokens_keeps_going_past_it(tok):
    ckpt = ckpt_of(tok)
    first = ids_of(ckpt, "a bird", 1)[0]
    ckpt.tokenizer = tok.with_eot(tok.inner.id_to_token(first))  # the model's first greedy token ends the text
    ended = generate_text(ckpt, "a bird", max_new_tokens=10, temperature=0.0)
    assert (ended.stop_reason, ended.tokens, ended.completion) == ("eos", 1, "")
    longer = generate_text(ckpt, "a bird", max_new_tokens=10, temperature=0.0, min_new_tokens=4)
    assert longer.tokens >= 4 and longer.completion and longer.stop_reason in ("eos", "max_new_tokens")


def test_inconsistent_settings_are_user_errors():
    with pytest.raises(UserError, match="min_new_tokens=9 is more than max_new_tokens=5"):
        Sampling.over(None, max_new_tokens=5, min_new_tokens=9)
    with pytest.raises(UserError, match="empty stop string"):
        Sampling.over(None, stop=["ok", ""])
    stored = {"stop": ["\n\n"], "repetition_penalty": 1.2, "min_new_tokens": 2, "unknown": 1}
    sampling = Sampling.over(stored, stop=["###"])
    assert (sampling.stop, sampling.repetition_penalty, sampling.min_new_tokens) == (["###"], 1.2, 2)


# --- the recipe's generate section ----------------------------------------------------------------
def test_recipe_generate_section_is_validated_with_clear_paths():
    recipe = build_recipe({"generate": {"stop": ["###", "\n\n"], "repetition_penalty": 1.3, "min_new_tokens": 3}},
                          ["generate.max_new_tokens=50"])
    assert recipe.generate.stop == ["###", "\n\n"] and recipe.generate.min_new_tokens == 3
    assert build_recipe({}, ["generate.stop=###"]).generate.stop == ["###"]
    with pytest.raises(RecipeError) as err:
        build_recipe({"generate": {"stop": [""], "repetition_penalty": 0, "min_new_tokens": 300,
                                   "max_new_tokens": 20, "min_tokens": 1}})
    text = str(err.value)
    for expected in ("generate.stop", "generate.repetition_penalty", "generate.min_new_tokens", "min_tokens"):
        assert expected in text
    assert "did you mean" in text and "generate.min_new_tokens" in text


# --- CLI and chat ----------------------------------------------------------------------------------
def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_stop_json_and_the_recipe_defaults(tok, store_dir, capsys):
    model = tiny_model(tok.vocab_size)
    save_checkpoint(Store(store_dir), "base", 1, model, tok, {"task": "pretrain"})
    code, out, err = run_main(capsys, "generate", "base", "the cat", "-t", "0", "-n", "24", "--json")
    assert code == 0, err
    full = json.loads(out)
    assert full["stop_reason"] == "max_new_tokens"
    stop = full["completion"][6:9]
    code, out, err = run_main(capsys, "generate", "base", "the cat", "-t", "0", "-n", "24", "--stop", "zzz",
                              "--stop", stop, "--json")
    assert code == 0, err
    cut = json.loads(out)
    text = full["completion"]
    assert cut["stop_reason"] == "stop_string" and cut["completion"] == text[:text.find(stop)]
    code, out, err = run_main(capsys, "generate", "base", "the cat", "-t", "0", "-n", "24", "--stop", stop)
    assert code == 0 and out == cut["completion"] + "\n"  # streamed: the same text, nothing of the stop string
    # a checkpoint's recipe defaults (generate section) apply when the command line leaves them out
    save_checkpoint(Store(store_dir), "withstop", 1, model, tok, {"task": "pretrain", "generate": {
        "stop": [stop], "temperature": 0.0, "max_new_tokens": 24}})
    code, out, err = run_main(capsys, "generate", "withstop", "the cat", "--json")
    assert code == 0 and json.loads(out)["completion"] == cut["completion"]
    code, out, err = run_main(capsys, "generate", "base", "the cat", "-n", "3", "--min-new-tokens", "5")
    assert code == 2 and "min_new_tokens=5 is more than max_new_tokens=3" in err and "Traceback" not in err
    code, out, err = run_main(capsys, "generate", "base", "the cat", "--repetition-penalty", "0")
    assert code == 2


def test_cli_generate_device_option(tok, store_dir, capsys, monkeypatch):
    """--device picks where the model runs (auto: a GPU when there is one); a device that is not there,
    or not a device at all, is a usage error (exit 2) naming the option."""
    save_checkpoint(Store(store_dir), "base", 1, tiny_model(tok.vocab_size), tok, {"task": "pretrain"})
    loaded_on = []
    real_load = checkpoint.load_weights
    monkeypatch.setattr(checkpoint, "load_weights", lambda *a, **kw: loaded_on.append(a[2]) or real_load(*a, **kw))
    args = ("generate", "base", "the cat", "-t", "0", "-n", "5", "--json")
    code, out, err = run_main(capsys, *args, "--device", "cpu")
    assert code == 0, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, auto_out, err = run_main(capsys, *args)
    assert code == 0 and json.loads(auto_out)["completion"] == json.loads(out)["completion"]
    assert [str(d) for d in loaded_on] == ["cpu", "cpu"]
    code, out, err = run_main(capsys, *args, "--device", "cuda")
    assert code == 2 and "--device=cuda but no CUDA device is available" in err and "Traceback" not in err
    code, out, err = run_main(capsys, *args, "--device", "gpu0")
    assert code == 2 and "--device=gpu0 is not a device" in err
    # chat takes the same option, checked before the model is loaded or a message read
    code, out, err = run_main(capsys, "chat", "base", "--device", "cuda")
    assert code == 2 and "--device=cuda but no CUDA device is available" in err and "Traceback" not in err
    code, out, err = run_main(capsys, "chat", "base", "--device", "gpu0")
    assert code == 2 and "--device=gpu0 is not a device" in err and len(loaded_on) == 2


def one_message(text: str):
    """A read_line for chat: `text`, then end of input."""
    given = iter([text, None])
    return lambda prompt: next(given)


def test_chat_reply_ends_before_the_stop_string_and_the_history_keeps_the_cut_reply(tok):
    ckpt = ckpt_of(tok, {"task": "instruct", "template": "chat"})
    full: list[str] = []
    chat(ckpt, Sampling(max_new_tokens=20, temperature=0.0), read_line=one_message("hello there"),
         write=full.append, console=Console(file=StringIO()))
    reply = "".join(full).removesuffix("\n")
    assert reply, "the tiny model should say something"
    stop = reply[len(reply) // 2:len(reply) // 2 + 2]
    ckpt = ckpt_of(tok, {"task": "instruct", "template": "chat"})
    out: list[str] = []
    chat(ckpt, Sampling(max_new_tokens=20, temperature=0.0, stop=[stop]), read_line=one_message("hello there"),
         write=out.append, console=Console(file=StringIO()))
    assert "".join(out) == reply[:reply.find(stop)] + "\n"


def test_exported_generation_config_carries_the_controls():
    from llmstages.interop.export import generation_config

    gen = generation_config({"max_new_tokens": 50, "temperature": 0.0, "stop": ["###"], "repetition_penalty": 1.2,
                             "min_new_tokens": 3}, eot_id=0)
    assert gen == {"bos_token_id": 0, "eos_token_id": 0, "max_new_tokens": 50, "repetition_penalty": 1.2,
                   "min_new_tokens": 3, "stop_strings": ["###"]}
    assert "repetition_penalty" not in generation_config({"repetition_penalty": 1.0, "stop": []}, eot_id=0)
