"""export --format gguf: every tensor and the key metadata read back with gguf.GGUFReader.

GPT-2 from our own tiny model; Llama (GQA, untied, Llama 3 rope scaling) and Qwen2 from tiny random
transformers models, compared with their Hugging Face tensors by HF name (independent of our mapping).
The q/k interleaving for llama.cpp's adjacent-pair rotary is checked by its purpose: attention scores
computed llama.cpp's way from the file equal ours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import need_module
from llmstages.blocks import apply_rope, rope_frequencies
from llmstages.checkpoint import Checkpoint, save_checkpoint
from llmstages.cli import main
from llmstages.errors import UserError
from llmstages.interop.gguf_export import export_gguf, pre_tokenizer_name
from llmstages.model import GPT, GPTConfig, build_config
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer, train_bpe

gguf = need_module("gguf")

TEXT = "Hello world, this is llmstages. Ünïcödé 🙂 code: def f(x): return x ** 2\n  spaces  "


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe([TEXT] * 20, 300)


def read(path: Path) -> tuple[dict[str, np.ndarray], dict, dict[str, str]]:
    """(tensors by name in numpy order, metadata values by key, tensor type names) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return tensors, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, types


def as_stored(t: torch.Tensor) -> np.ndarray:
    """What the file should hold: matrices in f16, vectors in f32."""
    a = t.detach().float().numpy()
    return a.astype(np.float16) if a.ndim == 2 else a.astype(np.float32)


def assert_tensors(tensors: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(tensors[name], as_stored(want), err_msg=name)


# --- GPT-2 -----------------------------------------------------------------------------------------
def test_gpt2_tensors_metadata_and_tokenizer(tok, tmp_path):
    torch.manual_seed(0)
    model = GPT(build_config("tiny", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, block_size=48)).eval()
    path, arch = export_gguf(Checkpoint(model, tok, {"task": "pretrain"}, None), tmp_path / "m.gguf", force=False)
    assert arch == "gpt2"
    tensors, meta, types = read(path)
    sd = model.state_dict()
    expected = {"token_embd.weight": sd["transformer.wte.weight"], "position_embd.weight": sd["transformer.wpe.weight"],
                "output_norm.weight": sd["transformer.ln_f.weight"], "output_norm.bias": sd["transformer.ln_f.bias"],
                "output.weight": sd["transformer.wte.weight"]}  # the tied head, written for older loaders
    llama_cpp_names = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                       "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
    for i in range(2):
        for theirs, ours in llama_cpp_names.items():
            for kind in ("weight", "bias"):
                expected[f"blk.{i}.{theirs}.{kind}"] = sd[f"transformer.h.{i}.{ours}.{kind}"]
    assert_tensors(tensors, expected)
    assert types["blk.0.attn_qkv.weight"] == "F16" and types["blk.0.attn_qkv.bias"] == "F32"
    assert tensors["blk.0.attn_qkv.weight"].shape == (96, 32)  # (out, in): ggml's ne = [32, 96], as llama.cpp wants
    assert meta["general.architecture"] == "gpt2"
    assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.feed_forward_length"],
            meta["gpt2.block_count"], meta["gpt2.attention.head_count"]) == (48, 32, 128, 2, 2)
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [tok.inner.id_to_token(i) for i in range(tok.vocab_size)]
    merges = json.loads(tok.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    eot = tok.eot_id
    assert meta["tokenizer.ggml.eos_token_id"] == eot and meta["tokenizer.ggml.bos_token_id"] == eot
    assert meta["tokenizer.ggml.token_type"][eot] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.token_type"][eot - 1 if eot else eot + 1] == gguf.TokenType.NORMAL


def test_lora_is_merged_and_a_padded_vocabulary_gets_placeholder_tokens(tok, tmp_path):
    from llmstages.lora import merge_lora
    import copy

    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size + 4, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          lora_rank=2, lora_targets=["c_attn"])).eval()
    for name, p in model.named_parameters():
        if "lora" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapters count
    merged = copy.deepcopy(model)
    merge_lora(merged)
    path, _ = export_gguf(Checkpoint(model, tok, {"task": "pretrain"}, None), tmp_path / "m.gguf", force=False)
    tensors, meta, _ = read(path)
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"],
                                  as_stored(merged.state_dict()["transformer.h.0.attn.c_attn.weight"]))
    assert not np.array_equal(tensors["blk.0.attn_qkv.weight"],
                              as_stored(model.transformer.h[0].attn.c_attn.weight))
    assert meta["tokenizer.ggml.tokens"][-4:] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 4)]
    assert model.config.lora_rank == 2  # the caller's model keeps its adapters


# --- Llama and Qwen2 from transformers -------------------------------------------------------------
def hf_model(kind: str, folder: Path, tok: Tokenizer, **extra) -> torch.nn.Module:
    transformers = need_module("transformers")
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[kind]
    config = getattr(transformers, config_cls)(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                                **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.05 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return model


def export_hf_dir(folder: Path, out: Path):
    from llmstages.interop import load_hf
    return export_gguf(load_hf(str(folder)), out, force=False)


def scores(q: torch.Tensor, k: torch.Tensor, rotate) -> torch.Tensor:
    """q (T, Hq*D), k (T, Hkv*D) -> attention scores (Hq, T, T) after rotate(x (H, T, D))."""
    T, Hkv, Hq = q.shape[0], 2, 4
    q, k = q.view(T, Hq, -1).transpose(0, 1), k.view(T, Hkv, -1).transpose(0, 1)
    q, k = rotate(q), rotate(k).repeat_interleave(Hq // Hkv, dim=0)
    return q @ k.transpose(1, 2)


def test_llama_tensors_metadata_and_the_rotary_layout(tok, tmp_path):
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    theirs = hf_model("llama", tmp_path / "hf", tok, num_key_value_heads=2, tie_word_embeddings=False,
                      rope_theta=50000.0, rope_scaling=scaling)
    path, arch = export_hf_dir(tmp_path / "hf", tmp_path / "m.gguf")
    assert arch == "llama"
    tensors, meta, _ = read(path)
    sd = theirs.state_dict()
    # everything but q and k equals the HF tensor of the same role
    plain = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    roles = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    plain.update({f"blk.{i}.{a}.weight": f"model.layers.{i}.{b}.weight" for i in range(2) for a, b in roles.items()})
    for name, hf_name in plain.items():
        np.testing.assert_array_equal(tensors[name], as_stored(sd[hf_name]), err_msg=name)
    expected_names = set(plain) | {f"blk.{i}.attn_{n}.weight" for i in range(2) for n in "qk"} | {"rope_freqs.weight"}
    assert set(tensors) == expected_names
    # llama.cpp: frequency_i = theta^(-2i/D) / rope_freqs[i]; our scaled frequencies must come out
    D = 16
    freqs = rope_frequencies(D, 50000.0) / torch.from_numpy(tensors["rope_freqs.weight"])
    torch.testing.assert_close(freqs, rope_frequencies(D, 50000.0, scaling))
    # scores of llama.cpp's adjacent-pair rotation on the file's q, k == ours (rotate-half) on HF's q, k
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    angles = torch.arange(12).float()[:, None] * freqs[None, :]  # (T, D/2)

    def adjacent_pairs(h: torch.Tensor) -> torch.Tensor:  # (H, T, D): rotate (h[2i], h[2i+1])
        a, b = h[..., 0::2], h[..., 1::2]
        return torch.stack((a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()), -1).flatten(-2)

    for i in range(2):
        file_q, file_k = (torch.from_numpy(tensors[f"blk.{i}.attn_{n}.weight"].astype(np.float32)) for n in "qk")
        hf_q, hf_k = (sd[f"model.layers.{i}.self_attn.{n}_proj.weight"].half().float() for n in "qk")
        ours = scores(x @ hf_q.T, x @ hf_k.T, lambda h: apply_rope(h, angles.cos(), angles.sin()))
        llama_cpp = scores(x @ file_q.T, x @ file_k.T, adjacent_pairs)
        torch.testing.assert_close(llama_cpp, ours, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(file_q, hf_q)  # the rows were reordered
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.rope.dimension_count"], meta["llama.context_length"], meta["llama.feed_forward_length"],
            meta["llama.vocab_size"]) == (4, 2, 16, 64, 96, tok.vocab_size)
    assert meta["llama.rope.freq_base"] == 50000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(theirs.config.rms_norm_eps)


def test_qwen2_keeps_rotate_half_and_writes_qkv_biases(tok, tmp_path):
    theirs = hf_model("qwen2", tmp_path / "hf", tok, num_key_value_heads=2, tie_word_embeddings=True)
    path, arch = export_hf_dir(tmp_path / "hf", tmp_path / "m.gguf")
    assert arch == "qwen2"
    tensors, meta, _ = read(path)
    sd = theirs.state_dict()
    for i in range(2):
        for n in "qkv":
            for kind in ("weight", "bias"):
                np.testing.assert_array_equal(tensors[f"blk.{i}.attn_{n}.{kind}"],
                                              as_stored(sd[f"model.layers.{i}.self_attn.{n}_proj.{kind}"]))
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert meta["general.architecture"] == "qwen2" and meta["qwen2.attention.head_count_kv"] == 2


# --- refusals --------------------------------------------------------------------------------------
def test_models_llama_cpp_cannot_run_are_refused_by_name(tok, tmp_path):
    modern = GPT(build_config("tiny", vocab_size=tok.vocab_size, arch="modern", n_layer=1, n_embd=32))
    with pytest.raises(UserError) as err:
        export_gguf(Checkpoint(modern, tok, {}, None), tmp_path / "m.gguf", force=False)
    for what in ("mlp='relu2'", "qk_norm=True", "logit_softcap=15.0"):
        assert what in err.value.message
    classifier = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                               num_classes=2))
    with pytest.raises(UserError, match="classifier"):
        export_gguf(Checkpoint(classifier, tok, {}, None), tmp_path / "m.gguf", force=False)
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_names(tok):
    from tokenizers import Regex, pre_tokenizers

    from llmstages.interop.gguf_export import LLAMA3_REGEX, QWEN2_REGEX

    def with_pre(pre) -> Tokenizer:
        copy = Tokenizer(tok.inner.__class__.from_str(tok.to_str()))
        copy.inner.pre_tokenizer = pre
        return copy

    def split(regex: str):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    assert pre_tokenizer_name(tok, "m") == "gpt-2"
    assert pre_tokenizer_name(with_pre(split(LLAMA3_REGEX)), "m") == "llama-bpe"
    assert pre_tokenizer_name(with_pre(split(QWEN2_REGEX)), "m") == "qwen2"
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert pre_tokenizer_name(with_pre(smollm), "m") == "smollm"
    with pytest.raises(UserError, match="Whitespace"):
        pre_tokenizer_name(with_pre(pre_tokenizers.Whitespace()), "m")


def test_cli_export_gguf(tok, store_dir, tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(Store(store_dir), "tiny", 1, model, tok, {"task": "pretrain"})
    out = tmp_path / "exports" / "tiny.gguf"
    assert main(["export", "tiny", "--format", "gguf", "--out", str(out)]) == 0
    assert "llama.cpp architecture gpt2" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["export", "tiny", "--format", "gguf", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", "tiny", "--format", "gguf", "--out", str(out), "--force"]) == 0
    assert main(["export", "tiny", "--format", "gguf", "--out", str(store_dir / "x.gguf")]) == 2
    assert "llmstages manages" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    assert main(["export", "tiny", "--format", "gguf", "--out", str(tmp_path / "other.gguf")]) == 2
    assert "pip install gguf" in capsys.readouterr().err
    assert main(["export", "tiny", "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
