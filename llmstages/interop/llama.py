"""The Llama architecture family (`model_type` llama, qwen2, mistral) <-> our GPT with rotary positions,
RMSNorm, SwiGLU and grouped-query attention.

Hugging Face names -> ours, per layer i (nn.Linear both sides: (out, in), no transposes):

    model.embed_tokens                          transformer.wte
    model.layers.i.input_layernorm              transformer.h.i.ln_1
    model.layers.i.self_attn.{q,k,v}_proj       transformer.h.i.attn.c_attn   rows q | k | v, concatenated
    model.layers.i.self_attn.o_proj             transformer.h.i.attn.c_proj
    model.layers.i.post_attention_layernorm     transformer.h.i.ln_2
    model.layers.i.mlp.{gate,up}_proj           transformer.h.i.mlp.c_fc      rows gate | up, concatenated
    model.layers.i.mlp.down_proj                transformer.h.i.mlp.c_proj
    model.norm                                  transformer.ln_f
    lm_head (untied heads), score (ForSequenceClassification)

Rotary layout: HF rotates the pairs (x[i], x[i + D/2]) (`rotate_half`), as blocks.apply_rope does, so
q_proj / k_proj rows need no permutation. Biases: Qwen2 has them on q, k, v only (our `qkv_bias`);
Llama's `attention_bias` + `mlp_bias` together are our `bias`. Mistral's sliding window is exact for
contexts up to the window, so the context (`block_size`) is capped at it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from llmstages.errors import UserError
from llmstages.interop.hub import WeightSource
from llmstages.model import GPT, GPTConfig
from llmstages.weights import config_from_mapping
from llmstages.tokenizer import Tokenizer, special_token

PREFIX = ""
FAMILY = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
# Rotary-frequency buffers that old transformers versions saved with the weights.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
ROPE_TYPES = ("default", "linear", "llama3")


def _rope(hf: dict) -> tuple[float, dict]:
    """(theta, scaling) from config.json: `rope_theta` + `rope_scaling` (transformers 4.x) or
    `rope_parameters` (transformers 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(hf.get("rope_theta") or scaling.pop("rope_theta", None) or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    scaling.pop("rope_theta", None)
    return theta, ({} if kind == "default" else dict(scaling, rope_type=kind))


def config_from_hf(hf: dict, num_classes: int, where: str) -> tuple[GPTConfig, list[str]]:
    """Our GPTConfig for a Llama / Qwen2 / Mistral config.json, and notes for the user; refuses settings
    our blocks would compute differently, naming each."""
    model_type = hf["model_type"]
    C, H = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    Hkv = hf.get("num_key_value_heads") or H
    theta, scaling = _rope(hf)
    problems, notes = [], []

    def expect(key: str, ok: bool, ours: str) -> None:
        if not ok:
            problems.append(f"{key}={hf.get(key)!r} (llmstages supports {ours})")

    expect("num_attention_heads", H > 0 and C % H == 0 and H % Hkv == 0, "a divisor of hidden_size, a multiple "
           "of num_key_value_heads")
    expect("head_dim", hf.get("head_dim") in (None, C // max(H, 1)), f"hidden_size / num_attention_heads = {C // max(H, 1)}")
    expect("hidden_act", hf.get("hidden_act", "silu") in ("silu", "swish"), "silu")
    expect("rope_scaling", (scaling.get("rope_type") or "default") in ROPE_TYPES, " or ".join(ROPE_TYPES))
    expect("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0) == 1.0, "1.0")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    expect("attention_bias", attention_bias == mlp_bias, "the same value as mlp_bias")
    if problems:
        raise UserError(f"{where}: this {model_type} configuration cannot be loaded exactly:\n  "
                        + "\n  ".join(problems), hint="the logits would differ from transformers'")
    block = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if model_type == "mistral" or hf.get("use_sliding_window") else None
    if window and window < block:
        notes.append(f"context capped at the sliding window of {window} tokens (max_position_embeddings={block}): "
                     "within it, sliding-window attention is plain causal attention")
        block = window
    class_names: list[str] = []
    if num_classes:
        id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items() if str(k).isdigit()}
        class_names = [id2label.get(i, f"LABEL_{i}") for i in range(num_classes)]
    config = config_from_mapping(dict(  # every field type-checked and bounded before anything is allocated
        vocab_size=hf.get("vocab_size", 32000), block_size=block, n_layer=hf.get("num_hidden_layers", 32),
        n_head=H, n_embd=C, n_kv_head=Hkv if Hkv != H else 0, dropout=float(hf.get("attention_dropout", 0.0)),
        bias=attention_bias, qkv_bias=model_type == "qwen2", arch="modern", pos_emb="rope", rope_theta=theta,
        rope_scaling=scaling, norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
        mlp_hidden=hf.get("intermediate_size", 11008), qk_norm=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), logit_softcap=0.0,
        num_classes=num_classes, class_names=class_names, hf_model_type=model_type), where)
    return config, notes


def hf_tensor_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF model with this config, by HF name."""
    C, V, F, D = config.n_embd, config.vocab_size, config.mlp_width, config.n_embd // config.n_head
    q, kv = config.n_head * D, config.kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "self_attn.q_proj.weight": (q, C),
                       p + "self_attn.k_proj.weight": (kv, C), p + "self_attn.v_proj.weight": (kv, C)})
        if config.bias or config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        shapes[p + "self_attn.o_proj.weight"] = (C, q)
        shapes[p + "post_attention_layernorm.weight"] = (C,)
        shapes.update({p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                       p + "mlp.down_proj.weight": (C, F)})
        if config.bias:
            shapes.update({p + "self_attn.o_proj.bias": (C,), p + "mlp.gate_proj.bias": (F,),
                           p + "mlp.up_proj.bias": (F,), p + "mlp.down_proj.bias": (C,)})
    shapes["model.norm.weight"] = (C,)
    if config.num_classes:
        shapes["score.weight"] = (config.num_classes, C)
    elif not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _pairs(config: GPTConfig) -> Iterator[tuple[str, list[str]]]:
    """(our name, the HF names concatenated row-wise into it), in file order."""
    yield "transformer.wte.weight", ["model.embed_tokens.weight"]
    for i in range(config.n_layer):
        p, o = f"model.layers.{i}.", f"transformer.h.{i}."
        yield o + "ln_1.weight", [p + "input_layernorm.weight"]
        kinds = ["weight"] + (["bias"] if config.bias or config.qkv_bias else [])
        for kind in kinds:
            yield o + f"attn.c_attn.{kind}", [p + f"self_attn.{n}_proj.{kind}" for n in "qkv"]
        for kind in ["weight"] + (["bias"] if config.bias else []):
            yield o + f"attn.c_proj.{kind}", [p + f"self_attn.o_proj.{kind}"]
            yield o + f"mlp.c_fc.{kind}", [p + f"mlp.gate_proj.{kind}", p + f"mlp.up_proj.{kind}"]
            yield o + f"mlp.c_proj.{kind}", [p + f"mlp.down_proj.{kind}"]
        yield o + "ln_2.weight", [p + "post_attention_layernorm.weight"]
    yield "transformer.ln_f.weight", ["model.norm.weight"]
    if config.num_classes:
        yield "score.weight", ["score.weight"]
    elif not config.tie_embeddings:
        yield "lm_head.weight", ["lm_head.weight"]


def to_ours(source: WeightSource, config: GPTConfig, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs, reading a layer's few HF tensors at a time."""
    for ours, theirs in _pairs(config):
        parts = [source.take(name) for name in theirs]
        yield ours, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    # A tied model may still store its head (some exports do): it is the embedding, nothing to load.


def from_ours(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """Our weights under HF names on the CPU: c_attn split into q | k | v, c_fc into gate | up."""
    config, state = model.config, model.state_for_saving()
    shapes = hf_tensor_shapes(config)
    for ours, theirs in _pairs(config):
        tensor = state[ours].detach().to("cpu")
        sizes = [shapes[name][0] for name in theirs]
        for name, part in zip(theirs, tensor.split(sizes, dim=0)):
            yield name, part.contiguous()
    if config.hf_model_type == "qwen2" and not (config.bias or config.qkv_bias):  # Qwen2 always has q/k/v biases
        D, dtype = config.n_embd // config.n_head, model.transformer.wte.weight.dtype
        for i in range(config.n_layer):
            for n, heads in zip("qkv", (config.n_head, config.kv_heads, config.kv_heads)):
                yield f"model.layers.{i}.self_attn.{n}_proj.bias", torch.zeros(heads * D, dtype=dtype)


def export_type(config: GPTConfig) -> str:
    """The model_type to write: the one the weights came from, else qwen2 for q/k/v-only biases, else llama."""
    if config.hf_model_type in FAMILY:
        return config.hf_model_type
    return "qwen2" if config.qkv_bias and not config.bias else "llama"


def exportable(config: GPTConfig) -> str | None:
    """Why `config` cannot be written as a Llama-family model (None: it can)."""
    wrong = [f"{key}={getattr(config, key)!r}" for key, want in
             (("pos_emb", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"), ("qk_norm", False), ("logit_softcap", 0.0))
             if getattr(config, key) != want]
    kind = export_type(config)
    if kind == "qwen2" and config.bias:
        wrong.append("bias=True (Qwen2 has biases on q, k, v only)")
    if kind == "mistral" and (config.bias or config.qkv_bias):
        wrong.append("biases (Mistral has none)")
    if kind == "llama" and config.qkv_bias and not config.bias:
        wrong.append("qkv_bias without bias (Llama's attention_bias also covers o_proj)")
    return ", ".join(wrong) or None


def hf_config(config: GPTConfig, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for `transformers`: {Llama,Qwen2,Mistral}ForCausalLM or ...ForSequenceClassification."""
    kind = export_type(config)
    head = "ForSequenceClassification" if config.num_classes else "ForCausalLM"
    bos_token = special_token(tokenizer.config, "bos_token")
    bos = tokenizer.inner.token_to_id(bos_token) if bos_token else None
    hf = {
        "architectures": [ARCHITECTURES[kind] + head], "model_type": kind,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads, "head_dim": config.n_embd // config.n_head, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": dict(config.rope_scaling) or None,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": config.dropout,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": bos, "eos_token_id": tokenizer.eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if kind == "llama":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias, pretraining_tp=1)
    elif kind == "mistral":
        hf["sliding_window"] = None  # our context is at most the window it was capped to: full attention is exact
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    if config.num_classes:
        names = config.class_names or [f"LABEL_{i}" for i in range(config.num_classes)]
        hf.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
                  problem_type="single_label_classification", pad_token_id=tokenizer.eot_id)
    return hf
