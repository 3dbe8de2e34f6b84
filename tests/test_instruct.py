"""Instruction fine-tuning, chat, instruction evaluation and LoRA merge.

Tiny models built here (1 layer, 32 wide) and small synthetic instruction files in tmp; one
end-to-end CLI test on the real instruction-data.json.
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from llmstages.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from llmstages.config import build_recipe
from llmstages.model import GPT, GPTConfig
from llmstages.objectives import IGNORE
from llmstages.rouge import lcs_length, rouge_l, rouge_tokens
from llmstages.sampling import generate_tokens
from llmstages.stages.chat import Conversation, Sampling, chat, read_message
from llmstages.stages.finetune import finetune
from llmstages.stages.instruct import (EpochBatches, Example, collate, fit_records, fit_to_context,
                                       instruction_task, report_fitting)
from llmstages.stages.prepare import get_or_prepare
from llmstages.store import Store
from llmstages.templates import format_chat, format_prompt
from llmstages.tokenizer import EOT, Tokenizer, train_bpe
from llmstages.errors import UserError
from llmstages.lora import LoRALinear

COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def rows(n: int = 40) -> list[dict]:
    """Alpaca-style records with a response that follows from the instruction."""
    out = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        out.append({"instruction": f"Name the color number {i}.", "input": "" if i % 3 else f"Palette {i % 5}",
                    "output": f"The color is {color}."})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [format_prompt("alpaca", r["instruction"], r["input"]) + r["output"] for r in rows()]
    texts += [format_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])]
    return train_bpe(texts * 3, 400)


def base_model(tokenizer: Tokenizer, block_size: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32))


@pytest.fixture
def base(store_dir, tokenizer) -> str:
    """A tiny random language model committed as run 'base' in the test store."""
    save_checkpoint(Store(store_dir), "base", 1, base_model(tokenizer), tokenizer, {"task": "pretrain"})
    return "base"


def instruct_recipe(source: Path, run: str = "inst", **sections):
    raw = {"task": "instruct", "run": run, "init_from": "base",
           "data": {"source": [str(source)], "val_fraction": 0.2, "split_seed": 1},
           "train": {"max_steps": 2, "micro_batch_size": 4, "global_batch_size": 4, "warmup_steps": 0,
                     "eval_every": 0, "eval_batches": 2, "log_every": 1, "lr": 1e-3}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return build_recipe(raw)


def task_for(store_dir: Path, source: Path, **sections):
    store = Store(store_dir)
    recipe = instruct_recipe(source, **sections)
    ckpt = load_checkpoint("base", store)
    data = get_or_prepare(recipe, store, quiet())
    return ckpt, data, *instruction_task(ckpt, data, recipe)


# --- masking, truncation, dropping ------------------------------------------------------------------
def test_collate_masks_exactly_the_prompt_and_the_padding():
    eot = 99
    rows_ = [Example(np.array([10, 11, 12, 13, 20, 21, eot]), n_prompt=4), Example(np.array([5, 6, 30, eot]), 2)]
    batch = collate(rows_, mask_prompt=True, pad_id=eot)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21], [5, 6, 30, eot, eot, eot]]
    assert batch["targets"].tolist() == [[IGNORE, IGNORE, IGNORE, 20, 21, eot],
                                         [IGNORE, 30, eot, IGNORE, IGNORE, IGNORE]]
    assert batch["n_tokens"] == 6 + 3
    unmasked = collate(rows_, mask_prompt=False, pad_id=eot)
    assert unmasked["targets"].tolist()[0] == [11, 12, 13, 20, 21, eot]


def test_mask_covers_exactly_the_prompt_tokens_of_a_prepared_example(tmp_path, store_dir, base, tokenizer):
    record = {"instruction": "Name the color of the sky.", "input": "", "output": "The sky is blue."}
    source = write_jsonl(tmp_path / "one.jsonl", [record] * 1 + rows(9))
    ckpt, data, _, task = task_for(store_dir, source, data={"val_fraction": 0.0, "val_source": [str(source)]})
    prompt = tokenizer.encode(format_prompt("alpaca", record["instruction"]))
    response = tokenizer.encode(record["output"]) + [tokenizer.eot_id]
    ids = prompt + response
    seen = 0
    for index in range(3):  # one epoch of 10 examples in batches of 4 (the last one wraps around)
        batch = task.batch(index)
        for x, y in zip(batch["input_ids"].tolist(), batch["targets"].tolist()):
            if x[:len(ids) - 1] != ids[:-1]:
                continue
            seen += 1
            for j, target in enumerate(y):  # token by token
                if j < len(prompt) - 1:
                    assert target == IGNORE, f"prompt target {j} is not masked"
                elif j < len(ids) - 1:
                    assert target == ids[j + 1], f"response target {j} is wrong"
                else:
                    assert target == IGNORE, f"padding target {j} is not masked"
            kept = [t for t in y if t != IGNORE]
            assert kept == response and tokenizer.decode(kept) == record["output"] + EOT
    assert seen >= 1


def test_truncation_keeps_the_response():
    prompt, response = list(range(1, 41)), list(range(100, 111))
    tokens = np.array(prompt + response + [0])  # 40 prompt + 11 response + eot = 52 tokens
    ids, kept = fit_to_context(tokens, 40, block_size=31)  # room for 32
    assert len(ids) == 32 and kept == 20
    assert ids.tolist() == prompt[-20:] + response + [0]  # the prompt lost its start, the response is whole
    ids, kept = fit_to_context(tokens, 40, block_size=11)  # response + eot (12) alone fill the context
    assert kept == 2 and ids.tolist() == prompt[-2:] + response[:10]  # prompt floor block // 4, response start
    short = np.array([1, 2, 100, 0])
    assert fit_to_context(short, 2, 15)[0].tolist() == short.tolist()
    fitted = fit_records([tokens, short, tokens], [40, 2, 40], block_size=11)
    assert (fitted.truncated, fitted.responses_cut, fitted.dropped) == (2, 2, [])


def test_a_fully_masked_example_is_dropped_with_a_warning():
    # A record that is all prompt (no response, no end-of-text): no target would count in the loss.
    records = [np.array([1, 2, 3, 50, 0]), np.array([1, 2, 3, 4]), np.array([5, 6, 51, 0])]
    fitted = fit_records(records, [3, 4, 2], block_size=16)
    assert fitted.dropped == [1] and [e.record for e in fitted.examples] == [0, 2]
    out = Console(file=StringIO(), width=300)
    report_fitting(out, "train", fitted, 16, ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"])
    assert "warning" in out.file.getvalue() and "dropped 1 example" in out.file.getvalue()
    assert "a.jsonl:2" in out.file.getvalue()
    batches = EpochBatches(fitted.examples, 2, seed=0, mask_prompt=True, pad_id=0)
    firsts = {row[0] for i in range(4) for row in batches(i)["input_ids"].tolist()}
    assert firsts == {1, 5}  # never the dropped row (which starts 1 2 3 4 and would show as [1, 2, 3])
    for i in range(4):
        assert (batches(i)["targets"] != IGNORE).sum(dim=1).min() > 0


def test_batches_are_a_pure_function_of_the_index_and_cover_each_epoch():
    examples = [Example(np.array([i, i + 1, 0]), 1, i) for i in range(1, 11)]
    a = EpochBatches(examples, 4, seed=3, mask_prompt=True, pad_id=0)
    b = EpochBatches(examples, 4, seed=3, mask_prompt=True, pad_id=0)
    assert all(torch.equal(a(i)["input_ids"], b(i)["input_ids"]) for i in (7, 0, 2))
    stream = [row[0] for i in range(5) for row in a(i)["input_ids"].tolist()]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(1, 11)) and sorted(stream[10:]) == list(range(1, 11))
    assert stream[:10] != stream[10:]  # a new order each epoch


def test_chat_style_messages_train_on_the_last_assistant_message(tmp_path, store_dir, base, tokenizer):
    chats = [{"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": f"Color {i}?"},
                           {"role": "assistant", "content": "Which one?"},
                           {"role": "user", "content": f"Number {i}."},
                           {"role": "assistant", "content": f"It is {COLORS[i % 8]}."}]} for i in range(10)]
    source = write_jsonl(tmp_path / "chat.jsonl", chats)
    _, data, _, task = task_for(store_dir, source, finetune={"template": "chat"})
    assert data.manifest["template"] == "chat" and task.meta["template"] == "chat"
    batch = task.batch(0)
    for x, y in zip(batch["input_ids"].tolist(), batch["targets"].tolist()):
        answer = tokenizer.decode([t for t in y if t != IGNORE])
        assert answer.startswith("It is ") and answer.endswith("." + EOT)
        prompt = tokenizer.decode(x)
        assert prompt.startswith("<|system|>\nBe brief.\n<|user|>\nColor") and "Which one?" + EOT in prompt
    assert "val_loss" in task.evaluate(load_checkpoint("base", Store(store_dir)).model)


# --- the run: template round trip, samples, LoRA merge ------------------------------------------------
def test_template_round_trips_through_the_checkpoint(tmp_path, store_dir, base):
    source = write_jsonl(tmp_path / "inst.jsonl", rows())
    recipe = instruct_recipe(source, finetune={"template": "chat", "eval_samples": 1})
    result = finetune(recipe, Store(store_dir), console=quiet())
    ckpt = load_checkpoint("inst", Store(store_dir))
    assert ckpt.meta["template"] == "chat" and ckpt.meta["task"] == "instruct" and ckpt.meta["mask_prompt"] is True
    assert ckpt.meta["parent"]["ref"] == "base"
    assert {"val_loss", "val_ppl"} <= set(result.metrics)
    log = [json.loads(line) for line in (Store(store_dir).run_dir("inst") / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert evals and evals[-1]["samples"][0]["instruction"].startswith("Name the color")


def test_lora_run_merge_and_export_give_the_lora_logits(tmp_path, store_dir, base):
    from llmstages.stages.merge import merge
    source = write_jsonl(tmp_path / "inst.jsonl", rows())
    recipe = instruct_recipe(source, run="lora", train={"lr": 0.05, "max_steps": 3},
                             finetune={"trainable": "lora", "lora_rank": 2, "eval_samples": 0})
    finetune(recipe, Store(store_dir), console=quiet())
    lora = load_checkpoint("lora", Store(store_dir))
    assert lora.model.config.lora_rank == 2
    assert any(p.abs().sum() > 0 for n, p in lora.model.named_parameters() if n.endswith("lora_B"))
    x = torch.randint(0, lora.model.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = lora.model.eval()(x)
    path = merge("lora", Store(store_dir), run="merged")
    merged = load_checkpoint("merged", Store(store_dir))
    assert merged.path == path and merged.model.config.lora_rank == 0
    assert not any("lora_" in n for n in merged.model.state_dict())
    assert merged.meta["template"] == "alpaca" and merged.meta["parent"]["ref"] == "lora"
    for bad in ("../outside", "a@b", "/tmp/abs"):
        with pytest.raises(UserError, match="not a run name; nothing was written"):
            merge("lora", Store(store_dir), run=bad)
    assert not (store_dir / "outside").exists() and not Store(store_dir).run_dir("a@b").exists()
    with torch.no_grad():
        torch.testing.assert_close(merged.model.eval()(x), expected, atol=1e-5, rtol=1e-5)
    from llmstages.interop import export_hf
    out = export_hf(load_checkpoint("lora", Store(store_dir)), tmp_path / "hf", force=False)
    exported = load_checkpoint(f"hf:{out}")
    with torch.no_grad():
        torch.testing.assert_close(exported.model.eval()(x), expected, atol=1e-5, rtol=1e-5)
    # a LoRA run as the base of another LoRA run: its adapters are folded in first, the new ones added
    again = instruct_recipe(source, run="lora-on-lora", train={"lr": 0.05, "max_steps": 2},
                            finetune={"trainable": "lora", "lora_rank": 3, "lora_targets": ["c_attn"], "eval_samples": 0})
    again.init_from = "lora"
    finetune(again, Store(store_dir), console=quiet())
    second = load_checkpoint("lora-on-lora", Store(store_dir))
    assert second.model.config.lora_rank == 3 and second.model.config.lora_targets == ["c_attn"]
    assert sum(isinstance(m, LoRALinear) for m in second.model.modules()) == second.model.config.n_layer


# --- chat ------------------------------------------------------------------------------------------
def lines(*items: str):
    queue = list(items)
    return lambda prompt: queue.pop(0) if queue else None


def test_read_message_joins_backslash_lines_and_ends_at_eof():
    read = lines("first \\", "second", "alone")
    assert read_message(read) == "first \nsecond" and read_message(read) == "alone" and read_message(read) is None
    assert read_message(lines("cut \\")) == "cut "


def greedy_reply(ckpt: Checkpoint, model_input: str, max_new_tokens: int) -> str:
    """An oracle independent of generate_text and the KV cache: a full forward pass per token, argmax,
    stop at end-of-text."""
    tok, model, out = ckpt.tokenizer, ckpt.model.eval(), []
    ids = tok.encode(model_input)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            context = (ids + out)[-model.config.block_size:]
            nxt = int(model(torch.tensor([context]))[0, -1].argmax())
            if nxt == tok.eot_id:
                break
            out.append(nxt)
    return tok.decode(out)


def rouge_l_oracle(candidate: str, reference: str) -> float:
    """ROUGE-L F of lowercased alphanumeric words, by plain recursion over the LCS (a second implementation)."""
    import functools
    import re

    a, b = (re.findall(r"[a-z0-9]+", t.lower()) for t in (candidate, reference))

    @functools.lru_cache(maxsize=None)
    def lcs(i: int, j: int) -> int:
        if i == len(a) or j == len(b):
            return 0
        return lcs(i + 1, j + 1) + 1 if a[i] == b[j] else max(lcs(i + 1, j), lcs(i, j + 1))

    n = lcs(0, 0)
    return 0.0 if n == 0 else 2 * n / (len(a) + len(b))  # F = 2PR/(P+R) = 2 LCS / (|a| + |b|)


def tiny_instruct(tokenizer: Tokenizer, template: str, block_size: int = 64) -> Checkpoint:
    return Checkpoint(base_model(tokenizer, block_size), tokenizer, {"task": "instruct", "template": template}, None)


def test_chat_alpaca_formats_each_message_and_stops_cleanly(tokenizer):
    ckpt = tiny_instruct(tokenizer, "alpaca")
    out = []
    sampling = Sampling(max_new_tokens=6, temperature=0.0)
    n = chat(ckpt, sampling, read_line=lines("Name a color.", "/reset", "two \\", "lines", "/quit", "never"),
             write=out.append, console=quiet())
    assert n == 2
    first = greedy_reply(ckpt, format_prompt("alpaca", "Name a color."), 6)
    second = greedy_reply(ckpt, format_prompt("alpaca", "two \nlines"), 6)
    assert first and second and "".join(out) == f"{first}\n{second}\n"
    assert chat(ckpt, sampling, read_line=lines("hi"), write=out.append, console=quiet()) == 1  # EOF ends it


def test_chat_template_keeps_the_conversation_until_reset_and_fits_the_context(tokenizer):
    ckpt = tiny_instruct(tokenizer, "chat", block_size=64)
    talk = Conversation(ckpt, "chat", "Be brief.", reserve=16)
    assert talk.model_input("hi") == format_chat([{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "hi"}])
    talk.add("hi", "hello")
    text = talk.model_input("red?")
    assert text.startswith("<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\nhello" + EOT)
    for i in range(20):
        talk.add(f"question {i} " * 3, f"answer {i} " * 3)
    text = talk.model_input("last")
    assert len(tokenizer.encode(text)) <= 64 - 16 and text.startswith("<|system|>") and "<|user|>\nlast" in text
    talk.reset()
    assert "hello" not in talk.model_input("again")


def test_chat_refuses_a_model_without_template(tokenizer):
    ckpt = Checkpoint(base_model(tokenizer), tokenizer, {"task": "pretrain"}, None)
    with pytest.raises(UserError, match="not an instruction model"):
        chat(ckpt, Sampling(), read_line=lines(), write=print, console=quiet())


# --- ROUGE-L ---------------------------------------------------------------------------------------
def test_rouge_l_against_hand_computed_values():
    assert rouge_tokens("The cat, sat!") == ["the", "cat", "sat"]
    assert lcs_length("a b c d".split(), "a c e".split()) == 2
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)  # P = R = 5/6
    assert rouge_l("a b c d", "a c e") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # 0.5714
    assert rouge_l("The Cat.", "the cat") == 1.0
    assert rouge_l("", "the cat") == 0.0 and rouge_l("dog", "the cat") == 0.0


# --- bad input, and the whole pipeline through the CLI ----------------------------------------------
def run_main(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """`llmstages ARGS` in this process (no second torch import): exit code, stdout, stderr."""
    from llmstages.cli import main
    monkeypatch.setattr("sys.stdin", StringIO(stdin))
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_output_gives_file_and_line_and_exit_2(capsys, monkeypatch, tmp_path, store_dir, base):
    records = rows(5)
    del records[2]["output"]
    source = write_jsonl(tmp_path / "bad.jsonl", records)
    code, _, err = run_main(capsys, monkeypatch, "finetune", "--task", "instruct", f"data.source={source}",
                            "init_from=base", "train.epochs=0", "train.max_steps=1")
    assert code == 2
    assert f"{source}:3" in err.replace("\n", "") and "missing field 'output'" in err
    assert not Store(store_dir).run_dir("finetune-instruct").exists()


def test_end_to_end_on_the_real_instruction_data(cli, capsys, monkeypatch, data_file, store_dir):
    """finetune (a real subprocess) -> meta + log; then in-process: generate applies the template,
    evaluate --json (the fine-tuned model, and the base with --template), chat through stdin."""
    source = data_file("instruction-data.json")
    records = json.loads(source.read_text())
    tok = train_bpe([format_prompt("alpaca", r["instruction"], r["input"]) + r["output"] for r in records], 1024)
    save_checkpoint(Store(store_dir), "base", 1, base_model(tok, block_size=96), tok, {"task": "pretrain"})
    result = cli("finetune", "--task", "instruct", "init_from=base", "run=inst", "train.epochs=0",
                 "train.max_steps=4", "train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_every=2",
                 "train.eval_batches=2", "train.warmup_steps=1", "finetune.eval_samples=1",
                 env={"LLMSTAGES_DATA": str(source.parent)})
    assert result.returncode == 0, result.stderr
    assert "cut to the context of 96 tokens" in result.stderr and "sample 1" in result.stderr
    log = [json.loads(line) for line in (store_dir / "runs" / "inst" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(len(r["samples"]) == 1 for r in evals)
    ckpt = load_checkpoint("inst", Store(store_dir))
    assert ckpt.meta["template"] == "alpaca" and ckpt.meta["task"] == "instruct"

    # generate formats the prompt with the stored template (unless --raw)
    asked = "Name a primary color."
    code, out, err = run_main(capsys, monkeypatch, "generate", "inst", asked, "-t", "0", "-n", "8", "--json")
    assert code == 0, err
    templated = json.loads(out)
    code, out, err = run_main(capsys, monkeypatch, "generate", "inst", format_prompt("alpaca", asked), "--raw",
                              "-t", "0", "-n", "8", "--json")
    assert code == 0, err
    assert templated["completion"] == json.loads(out)["completion"] and templated["prompt"] == asked
    assert templated["completion"] == greedy_reply(ckpt, format_prompt("alpaca", asked), 8)

    # evaluate on the held-out split written by prepare: the fine-tuned model, and the base with --template
    test_file = str(next((store_dir / "data").glob("*/test.jsonl")))
    code, out, err = run_main(capsys, monkeypatch, "evaluate", "inst", "--data", test_file, "--limit", "3", "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert {"loss", "perplexity", "exact_match", "rouge_l", "examples", "samples"} <= set(scores)
    assert scores["examples"] == 3 and scores["template"] == "alpaca" and len(scores["samples"]) == 3
    expected_rouge = [rouge_l_oracle(x["response"], x["reference"]) for x in scores["samples"]]
    assert scores["rouge_l"] == pytest.approx(sum(expected_rouge) / 3, abs=1e-9)
    assert scores["exact_match"] == sum(" ".join(x["response"].split()) == " ".join(x["reference"].split())
                                        for x in scores["samples"]) / 3
    code, out, err = run_main(capsys, monkeypatch, "evaluate", "base", "--data", test_file, "--limit", "3",
                              "--template", "alpaca", "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] == 3

    # chat through stdin: two messages (one of two lines), /reset, /quit
    code, out, err = run_main(capsys, monkeypatch, "chat", "inst", "-t", "0", "-n", "5",
                              stdin="Name a color.\n/reset\nSay \\\nhello.\n/quit\nignored\n")
    assert code == 0, err
    expected = [greedy_reply(ckpt, format_prompt("alpaca", m), 5) for m in ("Name a color.", "Say \nhello.")]
    assert out == f"{expected[0]}\n{expected[1]}\n" and "(conversation cleared)" in err


def test_lora_instruction_tuning_of_a_modern_base_with_muon_learns(tmp_path, store_dir, tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, arch="modern",
                       pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False, tie_embeddings=False,
                       logit_softcap=15.0)
    save_checkpoint(Store(store_dir), "base", 1, GPT(config), tokenizer, {"task": "pretrain"})
    source = write_jsonl(tmp_path / "inst.jsonl", rows())
    recipe = instruct_recipe(source, run="lora", train={"lr": 0.05, "max_steps": 12, "optimizer": "muon"},
                             finetune={"trainable": "lora", "lora_rank": 4, "eval_samples": 0})
    finetune(recipe, Store(store_dir), console=quiet())
    log = [json.loads(line) for line in (Store(store_dir).run_dir("lora") / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "lr" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses  # adapters on a random base: slowly
    lora = load_checkpoint("lora", Store(store_dir))
    assert lora.model.config.pos_emb == "rope" and lora.model.config.lora_rank == 4
    out = list(generate_tokens(lora.model, [1, 2, 3], max_new_tokens=5))  # the KV cache path runs
    assert len(out) == 5
