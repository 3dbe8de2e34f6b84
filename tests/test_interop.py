"""Hugging Face interop: hf: import, export for transformers, tokenizer parity with GPT-2.

`transformers` is a test-only dependency: every model here is a small randomly initialised GPT-2
saved to a temporary folder (no weights are downloaded). All parameters are randomised, LayerNorms
and biases included, so a wrong mapping of any tensor changes the logits.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FP64_TOL, float64, need_module
from safetensors.torch import load_file, save_file

from llmstages.checkpoint import Checkpoint, load_checkpoint, load_tokenizer, save_checkpoint
from llmstages.errors import UserError
from llmstages.interop import export_hf, load_hf, resolve_hf
from llmstages.lora import LoRALinear
from llmstages.model import GPT, GPTConfig
from llmstages.sampling import generate_tokens
from llmstages.store import Store
from llmstages.tokenizer import EOT, Tokenizer, train_bpe

transformers = need_module("transformers")
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Tokenizer,
)

SHAPE = dict(n_layer=2, n_head=2, n_embd=64)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: LayerNorm weights near 1, everything else N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        is_norm_weight = ".ln_" in f".{name}" and name.endswith("weight")
        p.copy_(1 + 0.1 * noise if is_norm_weight else 0.05 * noise)


def hf_folder(folder: Path, tokenizer_dir: Path, cls=GPT2LMHeadModel, **config) -> torch.nn.Module:
    """Save a random transformers GPT-2 (vocab 50257) with GPT-2's tokenizer files into `folder`."""
    torch.manual_seed(0)
    model = cls(GPT2Config(vocab_size=50257, n_positions=128, **SHAPE, **config)).eval()
    randomize(model)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return model


def our_checkpoint(root: Path, tokenizer: Tokenizer, **config) -> Checkpoint:
    """A random model of ours committed to a store under `root`, loaded back as a Checkpoint."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, **SHAPE, **config))
    randomize(model, seed=1)
    task = "classify" if model.is_classifier else "pretrain"
    path = save_checkpoint(Store(root), "ours", 1, model, tokenizer, {"task": task})
    ckpt = load_checkpoint(path, Store(root))
    ckpt.model.eval()
    return ckpt


def random_ids(vocab: int, shape: tuple[int, int], low: int = 1) -> torch.Tensor:
    return torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    """A byte-level BPE of 300 tokens trained here (<|endoftext|> = 0): keeps the exported models tiny."""
    text = "Hello world, this is llmstages. Ünïcödé 🙂 code: def f(x): return x ** 2\n  spaces  "
    return train_bpe([text] * 20, 300)


@pytest.fixture
def hf_lm(tmp_path, gpt2_tokenizer_dir) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / "hf-gpt2"
    return folder, hf_folder(folder, gpt2_tokenizer_dir)


# ---------------------------------------------------------------------------------------------------
# import: hf:DIR
# ---------------------------------------------------------------------------------------------------
def test_import_gives_transformers_logits(hf_lm):
    folder, hf = hf_lm
    ckpt = load_hf(str(folder))
    assert ckpt.path is None and ckpt.meta["task"] == "pretrain" and ckpt.ref == f"hf:{folder}"
    assert ckpt.meta["ref"] == f"hf:{folder.resolve()}" and len(ckpt.meta["fingerprint"]) == 16
    assert ckpt.model.config.n_layer == 2 and ckpt.model.config.block_size == 128
    idx = random_ids(50257, (2, 40))
    with float64(ckpt.model, hf):
        torch.testing.assert_close(ckpt.model(idx), hf(idx).logits, atol=FP64_TOL, rtol=0)


def test_greedy_generation_matches_transformers(hf_lm):
    folder, hf = hf_lm
    ckpt = load_hf(str(folder))
    prompt = ckpt.tokenizer.encode("Hello, my name is")
    ours = list(generate_tokens(ckpt.model, prompt, max_new_tokens=24, temperature=0.0, use_cache=True,
                                stop_id=ckpt.tokenizer.eot_id))
    ids = torch.tensor([prompt])
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         pad_token_id=ckpt.tokenizer.eot_id)[0, len(prompt):].tolist()
    assert ours == theirs


def test_import_sequence_classifier(tmp_path, gpt2_tokenizer_dir):
    folder = tmp_path / "hf-cls"
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    hf = hf_folder(folder, gpt2_tokenizer_dir, cls=GPT2ForSequenceClassification, num_labels=3,
                   id2label=labels, label2id={v: k for k, v in labels.items()}, pad_token_id=50256)
    ckpt = load_hf(str(folder))
    assert ckpt.meta["task"] == "classify"
    assert ckpt.model.config.num_classes == 3 and ckpt.model.config.class_names == list(labels.values())
    idx = random_ids(50256, (2, 16))
    with float64(ckpt.model, hf):
        torch.testing.assert_close(ckpt.model(idx, last_index=torch.tensor([15, 15])), hf(idx).logits,
                                   atol=FP64_TOL, rtol=0)


def _strip_prefix_add_buffers(folder: Path) -> None:
    """The hub `gpt2` layout: no `transformer.` prefix, causal-mask buffers, an explicit tied head."""
    state = load_file(str(folder / "model.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state["lm_head.weight"] = state["wte.weight"].clone()
    for i in range(SHAPE["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _shard(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model.safetensors").unlink()


def _to_pickle(folder: Path) -> None:
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize("layout", [_strip_prefix_add_buffers, _shard, _to_pickle],
                         ids=["hub-names-and-buffers", "sharded", "pytorch_model.bin"])
def test_import_weight_layouts(hf_lm, layout):
    folder, hf = hf_lm
    layout(folder)
    ckpt = load_hf(str(folder))
    idx = random_ids(50257, (1, 12))
    with float64(ckpt.model, hf):
        torch.testing.assert_close(ckpt.model(idx), hf(idx).logits, atol=FP64_TOL, rtol=0)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(hf_lm, tmp_path):
    folder, _ = hf_lm
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"wte.weight": torch.zeros(2), "x": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused"):
        load_hf(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("key, value", [("activation_function", "gelu"), ("layer_norm_epsilon", 1e-6),
                                        ("n_inner", 100), ("model_type", "llama")])
def test_unsupported_config_is_refused(hf_lm, key, value):
    folder, _ = hf_lm
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=key):
        load_hf(str(folder))


def test_wrong_or_missing_tensor_is_named(hf_lm):
    folder, _ = hf_lm
    state = load_file(str(folder / "model.safetensors"))
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:100]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"wpe\.weight has shape \(100, 64\), expected \(128, 64\)"):
        load_hf(str(folder))
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing \['h\.1\.mlp\.c_fc\.bias'\]"):
        load_hf(str(folder))


def test_folder_without_tokenizer_is_refused(hf_lm):
    folder, _ = hf_lm
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (folder / name).unlink()
    with pytest.raises(UserError, match="no tokenizer files"):
        load_hf(str(folder))


def test_hf_refs_through_checkpoint_module(hf_lm):
    folder, _ = hf_lm
    assert load_tokenizer(f"hf:{folder}").vocab_size == 50257
    assert load_checkpoint(f"hf:{folder}").meta["source"] == f"hf:{folder}"


# ---------------------------------------------------------------------------------------------------
# hub ids
# ---------------------------------------------------------------------------------------------------
def test_offline_hub_id_names_the_local_folder_way(cli, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    result = cli("generate", "hf:gpt2", "Hello", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "hf download gpt2 --local-dir ./gpt2" in result.stderr and "hf:./gpt2" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch, gpt2_tokenizer_dir):
    constants = need_module("huggingface_hub.constants")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-gpt2" / "snapshots" / ("a" * 40)
    hf_folder(snapshot, gpt2_tokenizer_dir)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_hf("tiny-org/tiny-gpt2") == snapshot
    assert load_hf("tiny-org/tiny-gpt2").meta["source"] == "hf:tiny-org/tiny-gpt2"


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resolve_hf(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------
def test_export_lm_loads_in_transformers(tmp_path, small_tokenizer):
    ckpt = our_checkpoint(tmp_path / "store", small_tokenizer)
    ckpt.meta["generate"] = {"temperature": 0.7, "top_k": 40, "max_new_tokens": 50}
    out = export_hf(ckpt, tmp_path / "export", force=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "vocab.json", "merges.txt"])
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = random_ids(small_tokenizer.vocab_size, (2, 30))
    with float64(ckpt.model, hf.eval()):
        torch.testing.assert_close(hf(idx).logits, ckpt.model(idx), atol=FP64_TOL, rtol=0)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == small_tokenizer.eot_id and gen.do_sample and gen.top_k == 40
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in ["Hello world", " Ünïcödé 🙂  x", f"a{EOT}b", "  spaces   \n\n"]:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == small_tokenizer.encode(text)
        assert hf_tok.decode(ids) == small_tokenizer.decode(ids)


def test_export_classifier_loads_as_sequence_classifier(tmp_path, small_tokenizer):
    ckpt = our_checkpoint(tmp_path / "store", small_tokenizer, num_classes=2, class_names=["ham", "spam"])
    out = export_hf(ckpt, tmp_path / "export", force=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    hf = GPT2ForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "ham", 1: "spam"} and hf.config.pad_token_id == small_tokenizer.eot_id
    # Right-padded batch: rows of 20, 13 and 7 real tokens, padded with end-of-text (id 0, never drawn).
    lengths = torch.tensor([20, 13, 7])
    idx = random_ids(small_tokenizer.vocab_size, (3, 20))
    mask = torch.arange(20)[None, :] < lengths[:, None]
    idx = idx.masked_fill(~mask, small_tokenizer.eot_id)
    with float64(ckpt.model, hf):
        theirs = hf(input_ids=idx, attention_mask=mask.long()).logits  # (3, 2)
        ours = ckpt.model(idx, last_index=lengths - 1)
    torch.testing.assert_close(theirs, ours, atol=FP64_TOL, rtol=0)


def test_export_merges_lora_on_a_copy(tmp_path, small_tokenizer):
    ckpt = our_checkpoint(tmp_path / "store", small_tokenizer, lora_rank=4, lora_targets=["c_attn", "c_proj", "c_fc"])
    assert any(isinstance(m, LoRALinear) for m in ckpt.model.modules())
    out = export_hf(ckpt, tmp_path / "export", force=False)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = random_ids(small_tokenizer.vocab_size, (2, 16))
    with float64(ckpt.model, hf):
        torch.testing.assert_close(hf(idx).logits, ckpt.model(idx), atol=FP64_TOL, rtol=0)
    assert ckpt.model.config.lora_rank == 4 and any(isinstance(m, LoRALinear) for m in ckpt.model.modules())


@pytest.mark.parametrize("extra", [dict(dropout=0.1), dict(num_classes=3, class_names=["a", "b", "c"])],
                         ids=["lm", "classifier"])
def test_round_trip_is_bit_identical(tmp_path, small_tokenizer, extra):
    ckpt = our_checkpoint(tmp_path / "store", small_tokenizer, **extra)
    back = load_hf(str(export_hf(ckpt, tmp_path / "export", force=False)))
    assert back.model.config.to_dict() == ckpt.model.config.to_dict()
    ours, theirs = ckpt.model.state_dict(), back.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    assert back.tokenizer.fingerprint == ckpt.tokenizer.fingerprint


def test_export_refuses_non_empty_folder(cli, tmp_path, store_dir, small_tokenizer):
    our_checkpoint(store_dir, small_tokenizer)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("export", "ours", "--format", "hf", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "not empty" in result.stderr and "--force" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # --force replaces the contents (done in-process: one CLI start is enough for this test)
    export_hf(load_checkpoint("ours", Store(store_dir)), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_export_refuses_to_replace_the_checkpoint_itself(tmp_path, small_tokenizer):
    ckpt = our_checkpoint(tmp_path / "store", small_tokenizer)
    with pytest.raises(UserError, match="refusing"):
        export_hf(ckpt, ckpt.path.parent, force=True)
    assert load_checkpoint(ckpt.path, Store(tmp_path / "store")).path == ckpt.path


def test_export_refuses_any_folder_in_or_over_the_store(tmp_path, small_tokenizer):
    store_root = tmp_path / "store"
    ckpt = our_checkpoint(store_root, small_tokenizer)
    other = store_root / "runs" / "other"
    other.mkdir(parents=True)
    (other / "keep.txt").write_text("mine")
    for out in (other, store_root, store_root / "runs" / "new-folder", tmp_path):
        with pytest.raises(UserError, match="refusing to export into or over"):
            export_hf(ckpt, out, force=True, store_root=store_root)
    assert (other / "keep.txt").read_text() == "mine" and not (store_root / "runs" / "new-folder").exists()
    ckpt.path = None  # an hf: model has no checkpoint folder: the store is still protected
    with pytest.raises(UserError, match="refusing"):
        export_hf(ckpt, store_root, force=True, store_root=store_root)
    assert load_checkpoint("ours", Store(store_root)).path is not None


# ---------------------------------------------------------------------------------------------------
# CLI: generate hf:DIR end to end
# ---------------------------------------------------------------------------------------------------
def test_cli_generate_from_hf_folder(cli, hf_lm, tmp_path):
    folder, hf = hf_lm
    result = cli("generate", f"hf:{folder}", "Hello", "-t", "0", "-n", "8", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt"] == "Hello" and out["tokens"] >= 1
    tok = Tokenizer.from_file(folder)
    ids = torch.tensor([tok.encode("Hello")])
    greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.eot_id)[0, 1:].tolist()
    assert out["completion"] == tok.decode([t for t in greedy if t != tok.eot_id])


# ---------------------------------------------------------------------------------------------------
# tokenizer parity with GPT-2
# ---------------------------------------------------------------------------------------------------
TEXTS = [
    "Hello world", "Hello, world!  How's it going?", "  leading spaces", "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\n", "a     run of     spaces", "\r\nwindows\r\nlines", "",
    "Ünïcödé naïve café — “quotes” ‘single’ «guillemets»", "日本語のテキスト、中文文本, 한국어", "Ελληνικά и русский",
    "emoji 🙂🚀 family 👩‍👩‍👧 flags 🇫🇷", "zero\u200bwidth and\u00a0nbsp",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n", "if (a && b) { c->d[i] = 0x1F; }",
    "numbers 1234567 3.14159 1e-5 -42", "contractions: I'm you're it's we'll they've he'd don't 'S 'T",
    EOT, f"before{EOT}after", f"a{EOT}{EOT}b", f" {EOT} spaced ", "<|endoftext", "mixed abc123 123abc ___ ...!!!???",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (OpenAI's encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class OpenAIEncoder:
    """GPT-2's reference BPE (OpenAI's encoder.py), independent of the `tokenizers` library."""

    def __init__(self, folder: Path):
        regex = need_module("regex")
        self.pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = [m for m in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if m]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_chars = _bytes_to_unicode()

    def bpe(self, word: list[str]) -> list[str]:
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for n, part in enumerate(text.split(EOT)):  # <|endoftext|> is GPT-2's one special token
            if n:
                ids.append(self.vocab[EOT])
            for piece in self.pattern.findall(part):
                ids += [self.vocab[t] for t in self.bpe([self.byte_chars[b] for b in piece.encode("utf-8")])]
        return ids


def test_tokenizer_parity_with_gpt2(gpt2_tokenizer_dir, data_file, tmp_path):
    texts = TEXTS + [data_file("the-verdict.txt").read_text(encoding="utf-8")]
    reference = OpenAIEncoder(gpt2_tokenizer_dir)
    hf_tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    ours = Tokenizer.from_file(gpt2_tokenizer_dir)
    for name in ("vocab.json", "merges.txt"):  # the two-file format alone
        shutil.copy(gpt2_tokenizer_dir / name, tmp_path / name)
    ours_two_files = Tokenizer.from_file(tmp_path)
    hf_two_files = GPT2Tokenizer.from_pretrained(tmp_path)
    assert ours.eot_id == ours_two_files.eot_id == 50256
    for text in texts:
        expected = reference.encode(text)
        assert ours.encode(text) == expected, text
        assert ours_two_files.encode(text) == expected, text
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == expected, text
        assert hf_two_files(text, add_special_tokens=False)["input_ids"] == expected, text
        assert ours.decode(expected) == text


# ---------------------------------------------------------------------------------------------------
# malformed hf: folders: each refused with the file named and what is wrong (exit 2, no traceback)
# ---------------------------------------------------------------------------------------------------
def _no_config(folder):
    (folder / "config.json").unlink()


def _config_not_json(folder):
    (folder / "config.json").write_text('{"model_type": "gpt2",')


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


def _truncated_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _bad_shard_index(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')


def _classifier_without_head(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2ForSequenceClassification"])))


def _tokenizer_of_another_model(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, vocab_size=1000)))
    state = load_file(str(folder / "model.safetensors"))
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:1000]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("damage,message", [
    (_no_config, "{folder}: no config.json (not a Hugging Face model folder)"),
    (_config_not_json, "{folder}/config.json: corrupt model config (config.json): not valid JSON"),
    (_no_weights, "{folder}: no model.safetensors (or pytorch_model.bin) in this folder"),
    (_truncated_weights, "{folder}/model.safetensors: cannot read the weights"),
    (_bad_shard_index, "{folder}/model.safetensors.index.json: not a valid shard index"),
    (_classifier_without_head, "config.json says sequence classifier, but there is no score.weight"),
    (_tokenizer_of_another_model, "the tokenizer has 50257 tokens but the model only 1000 embeddings"),
])
def test_malformed_hf_folder_is_refused_with_the_reason(hf_lm, damage, message):
    folder, _ = hf_lm
    damage(folder)
    with pytest.raises(UserError) as err:
        load_hf(str(folder))
    assert message.format(folder=folder) in err.value.message


def test_malformed_hf_folder_through_the_cli_is_exit_2(cli, hf_lm, store_dir):
    folder, _ = hf_lm
    _no_weights(folder)
    result = cli("generate", f"hf:{folder}", "Hello", "-n", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{folder}: no model.safetensors" in " ".join(result.stderr.split())
    missing = cli("generate", f"hf:{folder}-missing", "Hello")
    assert missing.returncode == 2 and f"hf:{folder}-missing: no such folder" in " ".join(missing.stderr.split())
