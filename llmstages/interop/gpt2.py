"""GPT-2 (`model_type: gpt2`) in Hugging Face's layout <-> our GPT with `arch: gpt2`.

HF GPT-2 uses `Conv1D` for its four linear layers, storing W as (in, out); our `nn.Linear` stores
(out, in), so those four are transposed both ways. Everything else (embeddings, LayerNorms, biases, the
class head `score` (K, C)) has the same layout. The LM head is tied to `wte`, so `lm_head.weight` is not
stored; `attn.bias` / `attn.masked_bias` are causal-mask buffers of old `transformers` versions and are
ignored. Names appear with a `transformer.` prefix (GPT2LMHeadModel, GPT2ForSequenceClassification) or
without (GPT2Model, the hub's `gpt2` files): the WeightSource strips it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from llmstages.errors import UserError
from llmstages.interop.hub import WeightSource
from llmstages.model import GPT, GPTConfig
from llmstages.weights import config_from_mapping

PREFIX = "transformer."
# HF GPT-2's Conv1D layers: weight (in, out) there, (out, in) here.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers of old transformers versions (not weights), and GPT2DoubleHeadsModel's extra head.
IGNORED = re.compile(r"h\.\d+\.(attn\.bias|attn\.masked_bias|crossattention\.bias)|multiple_choice_head\..*")
# The activations that are GELU with the tanh approximation, as our MLP computes it.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


# config.json keys read below, by the type they must have (anything else would fail deep inside).
HF_INT_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd")
HF_OPTIONAL_INT_KEYS = ("n_positions", "n_ctx", "n_inner")  # null = the default
HF_FLOAT_KEYS = ("layer_norm_epsilon", "resid_pdrop")


def _check_types(hf: dict, where: str) -> None:
    def not_int(value) -> bool:
        return not isinstance(value, int) or isinstance(value, bool)

    problems = [f"{k}={hf[k]!r:.40} (expected an integer)" for k in HF_INT_KEYS if k in hf and not_int(hf[k])]
    problems += [f"{k}={hf[k]!r:.40} (expected an integer or null)" for k in HF_OPTIONAL_INT_KEYS
                 if hf.get(k) is not None and not_int(hf[k])]
    problems += [f"{k}={hf[k]!r:.40} (expected a number)" for k in HF_FLOAT_KEYS
                 if k in hf and (not isinstance(hf[k], (int, float)) or isinstance(hf[k], bool))]
    if not isinstance(hf.get("id2label") or {}, dict) or not isinstance(hf.get("architectures") or [], list):
        problems.append("id2label must be an object and architectures a list")
    if problems:
        raise UserError(f"{where}: corrupt config.json:\n  " + "\n  ".join(problems))


def config_from_hf(hf: dict, num_classes: int, where: str) -> GPTConfig:
    """Our GPTConfig for an HF GPT-2 config.json; refuses settings our model would compute differently."""
    _check_types(hf, where)
    problems = []

    def expect(key: str, ok: bool, ours: str) -> None:
        if not ok:
            problems.append(f"{key}={hf.get(key)!r} (llmstages supports {ours})")

    expect("activation_function", hf.get("activation_function", "gelu_new") in TANH_GELU, "gelu_new")
    expect("layer_norm_epsilon", abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-5")
    n_embd, n_head = hf.get("n_embd", 768), hf.get("n_head", 12)
    expect("n_inner", hf.get("n_inner") in (None, 4 * n_embd), f"4 * n_embd = {4 * n_embd}")
    expect("n_head", n_head > 0 and n_embd % n_head == 0, "a divisor of n_embd")
    expect("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "true")
    expect("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "false")
    expect("add_cross_attention", not hf.get("add_cross_attention", False), "false")
    if problems:
        raise UserError(f"{where}: this GPT-2 variant cannot be loaded exactly:\n  " + "\n  ".join(problems),
                        hint="only standard GPT-2 configurations are supported (the logits would be wrong)")
    class_names: list[str] = []
    if num_classes:
        id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items() if str(k).isdigit()}
        class_names = [id2label.get(i, f"LABEL_{i}") for i in range(num_classes)]
    return config_from_mapping(dict(  # every field type-checked and bounded before anything is allocated
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions") or hf.get("n_ctx") or 1024,
        n_layer=hf.get("n_layer", 12), n_head=n_head, n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.0)),  # GPT-2 uses one rate everywhere (0.1 in the originals)
        bias=True, num_classes=num_classes, class_names=class_names,
    ), where)


def hf_config(config: GPTConfig, eot_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for `transformers`: GPT2LMHeadModel, or GPT2ForSequenceClassification with labels."""
    hf = {
        "architectures": ["GPT2ForSequenceClassification" if config.num_classes else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "dtype": str(dtype).removeprefix("torch."),
    }
    if config.num_classes:
        names = config.class_names or [f"LABEL_{i}" for i in range(config.num_classes)]
        hf["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf["label2id"] = {name: i for i, name in enumerate(names)}
        hf["problem_type"] = "single_label_classification"
        # HF pools each row at its last token that is not the pad token: pad with end-of-text, as we do.
        hf["pad_token_id"] = eot_id
    return hf


def hf_tensor_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF GPT-2 with this config, by HF name (without `transformer.`), in HF layout."""
    C, V, P, K = config.n_embd, config.vocab_size, config.block_size, config.num_classes
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (P, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),  # Conv1D (in, out)
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    if K:
        shapes["score.weight"] = (K, C)  # nn.Linear in HF too: (out, in)
    return shapes


def our_name(hf_name: str) -> str:
    return hf_name if hf_name == "score.weight" else PREFIX + hf_name


def to_ours(source: WeightSource, config: GPTConfig, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs, one HF tensor at a time; a stored lm_head must equal wte (tied)."""
    wte = None
    for key in hf_tensor_shapes(config):
        tensor = source.take(key)
        if key == "wte.weight":
            wte = tensor
        # Conv1D (in, out) -> Linear (out, in); contiguous so the model owns plain tensors.
        yield our_name(key), (tensor.t() if key.endswith(CONV1D) else tensor).contiguous()
    head = source.take("lm_head.weight") if "lm_head.weight" in source else None
    if head is not None and not torch.equal(head, wte):
        raise UserError(f"{where}: lm_head.weight differs from wte.weight (an untied output head)",
                        hint="GPT-2 ties the LM head to the token embedding; a model with its own head "
                             "is not a GPT-2")


def from_ours(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """Our model's weights under HF names (`transformer.` prefix), Conv1D-transposed, on the CPU.

    A model without biases gets zero biases, which computes the same function.
    """
    state = model.state_for_saving()  # lm_head is tied: not saved, as transformers' save_pretrained does
    for key, shape in hf_tensor_shapes(model.config).items():
        tensor = state.get(our_name(key))
        if tensor is None:  # bias=False
            tensor = torch.zeros(shape, dtype=model.transformer.wte.weight.dtype)
        tensor = tensor.t() if key.endswith(CONV1D) else tensor
        yield our_name(key), tensor.detach().to("cpu").contiguous()


def exportable(config: GPTConfig) -> str | None:
    """Why `config` cannot be written as a GPT-2 (None: it can)."""
    return None if config.is_gpt2() else "its blocks are not GPT-2's"
