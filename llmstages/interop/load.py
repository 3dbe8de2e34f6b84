"""`hf:DIR_OR_ID` -> our GPT, tokenizer and meta: dispatch on config.json's `model_type`.

    gpt2                      interop/gpt2.py   (GPT-2's blocks)
    llama, mistral, qwen2     interop/llama.py  (rotary, RMSNorm, SwiGLU, grouped-query attention)

The model is built on the `meta` device (shapes, no memory), its tensors converted from the files one
at a time and assigned in place (`load_state_dict(assign=True)`), so a 1B model never exists twice in
memory. `transformers` is not needed: config.json and the weights are read directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmstages.errors import UserError
import llmstages.interop.gpt2 as gpt2
import llmstages.interop.llama as llama
from llmstages.interop.hub import WeightSource, fingerprint, read_hf_config, resolve_hf
from llmstages.model import GPT
from llmstages.weights import check_finite
from llmstages.tokenizer import Tokenizer

FAMILIES = {"gpt2": gpt2, **{name: llama for name in llama.FAMILY}}
SUPPORTED = tuple(sorted(FAMILIES))


@dataclass
class HFModel:
    """What `load_hf` reads: our model, its tokenizer and a meta dict (checkpoint.py wraps it as a Checkpoint)."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    path: None = None  # not a folder of the store

    @property
    def ref(self) -> str:
        return self.meta["source"]


def family_of(hf: dict, where: str):
    """The interop module for config.json's model_type; any other type is refused by name."""
    model_type = hf.get("model_type", "gpt2")
    if model_type not in FAMILIES:
        raise UserError(f"{where}: model_type={model_type!r} is not supported",
                        hint=f"llmstages loads these model_types: {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


def check_tensors(source: WeightSource, expected: dict[str, tuple[int, ...]], ignored, where: str,
                  model_type: str) -> None:
    """Every expected tensor is there with its shape, and nothing else is (bar `ignored` and a tied head)."""
    found = {k for k in source.names if not ignored.fullmatch(k) and k != "lm_head.weight"}
    missing = sorted(k for k in expected if k not in source)
    unexpected = sorted(k for k in found if k not in expected)
    if unexpected or missing:
        raise UserError(f"{where}: the weights do not match the model config.json describes "
                        f"(model_type={model_type}): "
                        f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, shape in expected.items():
        if source.shape(key) != shape:
            raise UserError(f"{where}: tensor {key} has shape {source.shape(key)}, expected {shape} from config.json")


def assign_weights(model: GPT, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype | None,
                   where: str) -> GPT:
    """Fill a model built on the `meta` device with `tensors` (our names), each cast to `dtype` (None:
    as stored) as it arrives and then owned by the model (assign, no copy). The one place imported
    weights enter a model: checks that concern every tensor belong here."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in expected or tuple(tensor.shape) != expected[name]:
            raise UserError(f"{where}: tensor {name} of shape {tuple(tensor.shape)} does not fit the model "
                            f"(expected {expected.get(name)})")
        state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    check_finite(state, where)  # NaN/inf weights make no model (issue 15)
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if model.head_is_tied else set()))
    if missing:
        raise UserError(f"{where}: no weights for {missing[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings and not model.is_classifier:
        model.lm_head.weight = model.transformer.wte.weight  # assign replaced the shared Parameter
    return model


def load_hf(dir_or_id: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> HFModel:
    """Load `hf:DIR_OR_ID` (a language model, or a sequence classifier with `score`) as model, tokenizer, meta.

    `dtype`: the weights' type in memory (fp32 by default, for training; None keeps the file's, e.g. bf16).
    """
    folder = resolve_hf(dir_or_id)
    where = f"hf:{dir_or_id}" + (f" ({folder})" if str(folder) != dir_or_id else "")
    hf = read_hf_config(folder)
    family = family_of(hf, where)
    source = WeightSource(folder, strip=family.PREFIX)
    if "score.weight" in source and len(source.shape("score.weight")) != 2:
        raise UserError(f"{where}: score.weight has shape {list(source.shape('score.weight'))}, "
                        "expected (classes, n_embd)")
    num_classes = source.shape("score.weight")[0] if "score.weight" in source else 0
    if not num_classes and any("ForSequenceClassification" in a for a in hf.get("architectures") or []):
        raise UserError(f"{where}: config.json says sequence classifier, but there is no score.weight")
    notes: list[str] = []
    if family is gpt2:
        config = gpt2.config_from_hf(hf, num_classes, where)  # hf_model_type stays "": GPT-2 is our default
    else:
        config, notes = llama.config_from_hf(hf, num_classes, where)
    tokenizer = load_hf_tokenizer(dir_or_id, folder=folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{config.vocab_size} embeddings (tokenizer files of another model?)")
    check_tensors(source, family.hf_tensor_shapes(config), family.IGNORED, where, hf.get("model_type", "gpt2"))
    with torch.device("meta"):
        model = GPT(config)
    assign_weights(model, family.to_ours(source, config, where), dtype, where)
    # `ref` is what a fine-tuned run records as its parent: a local folder as an absolute path.
    local = Path(dir_or_id).expanduser().is_dir()
    meta = {
        "task": "classify" if config.num_classes else "pretrain",
        "source": f"hf:{dir_or_id}", "ref": f"hf:{folder.resolve()}" if local else f"hf:{dir_or_id}",
        "hf_path": str(folder), "hf_model_type": hf.get("model_type", "gpt2"),
        "hf_architectures": hf.get("architectures") or [], "notes": notes,
        "fingerprint": fingerprint(folder), "tokenizer_fingerprint": tokenizer.fingerprint,
    }
    # eval mode: GPT-2 configs carry dropout 0.1, which training turns on with model.train()
    return HFModel(model.to(device).eval(), tokenizer, meta)


def load_hf_tokenizer(dir_or_id: str, *, folder: Path | None = None) -> Tokenizer:
    """The tokenizer of `hf:DIR_OR_ID` (tokenizer.json, or vocab.json + merges.txt, with the special
    tokens and chat template of tokenizer_config.json); fetches no weights."""
    folder = folder or resolve_hf(dir_or_id, weights=False)
    if not (folder / "tokenizer.json").exists() and not (folder / "vocab.json").exists():
        raise UserError(f"hf:{dir_or_id}: no tokenizer files in {folder} (tokenizer.json, or vocab.json + merges.txt)",
                        hint="copy the tokenizer files of the model into the folder "
                             "(GPT-2's are the same for every size)")
    return Tokenizer.from_file(folder)
