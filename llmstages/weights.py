"""Checking weights before they are loaded: the config they claim, their names, shapes, dtypes and values.

A checkpoint folder or an `hf:` folder is input like any other: it may be truncated, hand-edited or
hostile even when its MANIFEST verifies. Before a model is built for real:

    read_model_config   model.json -> GPTConfig; every field type-checked and bounded (a typo'd
                        n_layer of 10**9 must not allocate), every problem named
    check_state         tensor names, shapes and dtypes against the model the config describes,
                        built on the `meta` device (no memory), naming the first bad tensors
    check_finite        no NaN / inf in any tensor (a diverged run's weights are never loaded)
    nonfinite           the same question for nested state (optimizer states, sharded or not)
    load_plain_tensors  torch.load(weights_only=True) with a refusal that names the file and does not
                        suggest weights_only=False

Every problem is a `UserError` (exit 2) naming the file and the tensor or field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from llmstages.errors import UserError
from llmstages.ensemble import Ensemble
from llmstages.jsonio import read_json
from llmstages.model import GPT, GPTConfig

# Inclusive bounds of GPTConfig's integer fields: far beyond any GPT-2-shaped model, small enough that a
# corrupt value cannot make even the meta-device model take minutes to build.
INT_BOUNDS = {"vocab_size": (1, 1 << 24), "block_size": (1, 1 << 20), "n_layer": (1, 1024), "n_head": (1, 1024),
              "n_embd": (1, 1 << 16), "num_classes": (0, 1 << 16), "lora_rank": (0, 1 << 12),
              "n_kv_head": (0, 1024), "mlp_hidden": (0, 1 << 20)}
FLOAT_BOUNDS = {"dropout": (0.0, 0.99), "lora_dropout": (0.0, 0.99), "lora_alpha": (1e-12, 1e12),
                "norm_eps": (0.0, 1.0), "logit_softcap": (0.0, 1e6), "rope_theta": (1.0, 1e12)}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
SHOWN = 5  # tensors named in one message


# ---------------------------------------------------------------------------------------------------
# model.json
# ---------------------------------------------------------------------------------------------------
def read_model_config(path: Path) -> GPTConfig:
    """model.json as a checked GPTConfig; a corrupt or impossible file is a UserError naming each field."""
    return config_from_mapping(read_json(path, what="model config (model.json)"), str(path))


def config_from_mapping(data: dict, where: str) -> GPTConfig:
    """A GPTConfig from plain data with every known field type-checked and bounded (unknown keys ignored)."""
    hints = typing.get_type_hints(GPTConfig)
    problems, kwargs = [], {}
    for f in dataclasses.fields(GPTConfig):
        if f.name not in data:
            continue
        value, problem = _check_field(f.name, data[f.name], hints[f.name])
        if problem:
            problems.append(f"{f.name}: {problem}")
        else:
            kwargs[f.name] = value
    if not problems:
        n_classes, names = kwargs.get("num_classes", 0), kwargs.get("class_names", [])
        if names and len(names) != n_classes:
            problems.append(f"class_names: {len(names)} names for num_classes={n_classes}")
        try:
            config = GPTConfig(**kwargs)
        except (ValueError, TypeError) as err:  # __post_init__'s cross-field checks
            problems.append(str(err))
    if problems:
        raise UserError(f"{where}: impossible model config:\n  " + "\n  ".join(problems),
                        hint="the checkpoint is corrupt or was edited by hand: load another checkpoint of the run")
    return config


def _check_field(name: str, value: Any, tp: Any) -> tuple[Any, str | None]:
    """(value, None) when `value` fits the declared type and bounds, else (None, what is wrong)."""
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true/false, got {value!r:.40}")
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return None, f"expected an integer, got {value!r:.40}"
        low, high = INT_BOUNDS.get(name, (0, 1 << 31))
        return (value, None) if low <= value <= high else (None, f"{value} is outside {low}..{high}")
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return None, f"expected a finite number, got {value!r:.40}"
        low, high = FLOAT_BOUNDS.get(name, (-1e12, 1e12))
        return (float(value), None) if low <= value <= high else (None, f"{value} is outside {low}..{high}")
    if tp is str:
        return (value, None) if isinstance(value, str) else (None, f"expected a string, got {value!r:.40}")
    if typing.get_origin(tp) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value, None
        return None, f"expected a list of strings, got {value!r:.40}"
    return value, None  # a field type this check does not know: GPTConfig itself decides


# ---------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------
def expected_shapes(config: GPTConfig, where: str, members: int = 0) -> dict[str, tuple[int, ...]]:
    """name -> shape of every saved tensor of a GPT with `config` (or of an ensemble of `members` of them),
    built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            model = Ensemble.build(config, members) if members else GPT(config)
    except (ValueError, TypeError, RuntimeError) as err:  # e.g. LoRA targets that match no layer
        raise UserError(f"{where}: impossible model config ({err})") from None
    return {name: tuple(t.shape) for name, t in model.state_for_saving().items()}


def check_state(found: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple[int, ...]],
                where: str) -> None:
    """`found` (name -> (shape, safetensors dtype)) against `expected` shapes; UserError naming the tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_some(unexpected)}")
    wrong = [f"{name} has shape {list(found[name][0])}, the config says {list(shape)}"
             for name, shape in expected.items() if name in found and tuple(found[name][0]) != shape]
    wrong += [f"{name} has dtype {found[name][1]}, expected floating point"
              for name in expected if name in found and found[name][1] not in FLOAT_DTYPES]
    problems += wrong[:SHOWN] + ([f"... and {len(wrong) - SHOWN} more"] if len(wrong) > SHOWN else [])
    if problems:
        raise UserError(f"{where}: the weights do not match model.json:\n  " + "\n  ".join(problems),
                        hint="the checkpoint is corrupt or its files come from different models")


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or inf, naming the tensors (a diverged run's weights make no model)."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(f"{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)")
    if bad:
        raise UserError(f"{where}: refused: {len(bad)} tensor{'s hold' if len(bad) > 1 else ' holds'} NaN or inf: "
                        f"{_some(bad)}",
                        hint="these weights come from a diverged run or are corrupt; use other weights "
                             "(for a run, an earlier checkpoint: run@STEP)")


def nonfinite(value: Any, prefix: str = "") -> list[str]:
    """Names of the floating tensors inside nested dicts/lists of `value` that hold NaN or inf. A sharded
    tensor (FSDP's DTensor) is checked on this process's shard only: the caller combines the ranks."""
    if torch.is_tensor(value):
        local = value.to_local() if hasattr(value, "to_local") else value
        return [prefix or "tensor"] if local.is_floating_point() and not bool(torch.isfinite(local).all()) else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return [name for key, v in items for name in nonfinite(v, f"{prefix}.{key}" if prefix else str(key))]


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: corrupt weights file ({_first_line(err)})") from None


def load_weights(path: Path, config: GPTConfig, device: str | torch.device = "cpu", *,
                 members: int = 0) -> GPT | Ensemble:
    """A GPT with `config` (or an ensemble of `members` of them) holding the weights of safetensors file
    `path`, after every check above."""
    expected = expected_shapes(config, str(path.parent / "model.json"), members)  # an impossible config: exit 2
    model = Ensemble.build(config, members) if members else GPT(config)
    load_weights_into(model, path, expected)
    return model.to(device)


def load_weights_into(model: GPT | Ensemble, path: Path, expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Load safetensors file `path` into a built `model` (e.g. to resume it), after the same checks:
    names and shapes against `expected` (default: the model's own), floating dtypes, finite values."""
    if expected is None:
        expected = {name: tuple(t.shape) for name, t in model.state_for_saving().items()}
    check_state(safetensors_header(path), expected, str(path))
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: corrupt weights file ({_first_line(err)})") from None
    check_finite(state, str(path))
    model.load_saved_state(state)


def load_plain_tensors(path: Path) -> Any:
    """torch.load with PyTorch's restricted unpickler: tensors and plain containers, never code.

    Anything else is refused with the file's name. The message leaves out torch's own advice to retry
    with weights_only=False, which would run whatever code the file holds.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as err:  # UnpicklingError for forbidden objects; RuntimeError/EOFError for broken files
        found = re.search(r"GLOBAL (\S+)", str(err))
        detail = f"it asks for {found.group(1)}" if found else f"{type(err).__name__}: unreadable or truncated"
        raise UserError(f"{path}: refused: not plain tensor data ({detail})",
                        hint="this file is corrupt or was not written by llmstages; do not load it") from None


def _some(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > SHOWN else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
