"""Llama-architecture families (llama, qwen2, mistral) and gpt2 through hf: against transformers.

Each case is a randomly initialised tiny transformers model saved with save_pretrained: our logits equal
theirs to 1e-6 (compared in float64: conftest.float64), greedy generation with our KV cache gives their 30 tokens, and export ->
from_pretrained gives the same logits again. The configs cover GQA, an untied head, q/k/v biases, Llama's
attention + MLP biases, Llama 3 rope scaling, a rope theta that is not the default, and a sliding window.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import FP64_TOL, float64  # noqa: E402

from llmstages.errors import UserError  # noqa: E402
from llmstages.interop import export_hf, load_hf  # noqa: E402
from llmstages.sampling import generate_tokens  # noqa: E402
from llmstages.tokenizer import train_bpe  # noqa: E402

VOCAB = 320
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-6)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)
CASES = {
    "llama-tied-mha": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-gqa-untied-llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                                     dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0,
                                          rope_scaling=LLAMA3_SCALING)),
    "llama-biases": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True,
                                                            num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen2-qkv-bias-gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                                 rope_theta=1000000.0)),
    "qwen2-untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None,
                                                               tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2,
                                                 n_head=4)),
}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    """tokenizer.json (a 300-token byte-level BPE with ChatML's markers) + a tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tok")
    text = "Hello world, this is llmstages. Ünïcödé 🙂 code: def f(x): return x ** 2\n  spaces  "
    tok = train_bpe([text] * 20, 300)
    tok.inner.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML}))
    return folder


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm gains near 1), so a wrong mapping of any tensor shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        is_norm = "norm" in name or ".ln_" in name
        p.copy_(1 + 0.1 * noise if is_norm else 0.05 * noise)


def save_hf(case: str, folder: Path, tokenizer_dir: Path) -> torch.nn.Module:
    config_cls, model_cls, extra = CASES[case]
    shape = {} if case == "gpt2" else BASE
    config = getattr(transformers, config_cls)(**shape, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return model


def ids(shape=(2, 24)) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_generation_and_export_match_transformers(case, tmp_path, tokenizer_files):
    theirs = save_hf(case, tmp_path / "hf", tokenizer_files)
    ours = load_hf(str(tmp_path / "hf"))
    config = ours.model.config
    assert config.hf_model_type == ("" if case == "gpt2" else case.split("-")[0])
    if "gqa" in case:
        assert config.n_kv_head == 2
    assert config.tie_embeddings == bool(theirs.config.tie_word_embeddings)
    assert ours.model.head_is_tied == config.tie_embeddings
    idx = ids()
    with float64(ours.model, theirs):
        torch.testing.assert_close(ours.model(idx), theirs(idx).logits, atol=FP64_TOL, rtol=0)

    prompt = ids((1, 8))
    with torch.no_grad():
        expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, min_new_tokens=30,
                                   do_sample=False, pad_token_id=0)[0, 8:].tolist()
    got = list(generate_tokens(ours.model, prompt[0].tolist(), max_new_tokens=30, temperature=0.0, use_cache=True))
    assert got == expected and len(got) == 30

    out = export_hf(ours, tmp_path / "export", force=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.model_type == theirs.config.model_type
    with float64(back, theirs):
        torch.testing.assert_close(back(idx).logits, theirs(idx).logits, atol=FP64_TOL, rtol=0)


def test_rope_settings_are_read(tmp_path, tokenizer_files):
    save_hf("llama-gqa-untied-llama3-rope", tmp_path / "hf", tokenizer_files)
    config = load_hf(str(tmp_path / "hf")).model.config
    assert config.rope_theta == 50000.0 and config.rope_scaling["rope_type"] == "llama3"
    assert config.rope_scaling["factor"] == 8.0 and config.pos_emb == "rope" and config.mlp == "swiglu"


def test_sliding_window_caps_the_context(tmp_path, tokenizer_files):
    """Mistral's window of 16 < 128 positions: the context is capped at 16, where the logits are exact."""
    config_cls, model_cls, extra = CASES["mistral-gqa"]
    folder = tmp_path / "hf"
    theirs = transformers.MistralForCausalLM(transformers.MistralConfig(**BASE, **dict(extra, sliding_window=16)))
    randomize(theirs.eval())
    theirs.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_files / name).read_bytes())
    ours = load_hf(str(folder))
    assert ours.model.config.block_size == 16 and "sliding window" in ours.meta["notes"][0]
    idx = ids((2, 16))
    with float64(ours.model, theirs):
        torch.testing.assert_close(ours.model(idx), theirs(idx).logits, atol=FP64_TOL, rtol=0)
        with pytest.raises(ValueError, match="block_size=16"):
            ours.model(ids((1, 17)))


@pytest.mark.parametrize("edit, match", [
    (dict(model_type="bert"), r"model_type='bert' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_settings_are_refused_by_name(edit, match, tmp_path, tokenizer_files):
    save_hf("llama-tied-mha", tmp_path / "hf", tokenizer_files)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters", None) if "rope_scaling" in edit else None
    path.write_text(json.dumps(dict(config, **edit)))
    with pytest.raises(UserError, match=match) as err:
        load_hf(str(tmp_path / "hf"))
    if "model_type" in edit:
        assert "gpt2, llama, mistral, qwen2" in err.value.hint


def test_loads_on_meta_and_keeps_bf16_when_asked(tmp_path, tokenizer_files):
    theirs = save_hf("qwen2-untied", tmp_path / "hf", tokenizer_files)
    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    kept = load_hf(str(tmp_path / "hf"), dtype=None).model
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in kept.parameters())
    upcast = load_hf(str(tmp_path / "hf")).model
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
