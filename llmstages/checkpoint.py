"""Model checkpoints: what goes into a committed store folder and how it comes back.

    model.safetensors   weights (safetensors: loading executes no code)
    model.json          GPTConfig (vocab, sizes, head type, class names, LoRA)
    tokenizer.json      the exact tokenizer
    meta.json           stage, step, metrics, parent checkpoint, data + tokenizer fingerprints, template
    train_state.pt      optimizer state and torch RNG states (loaded with torch.load(weights_only=True))
    train_state.json    step, tokens seen, schedule, sampler position, Python/NumPy RNG states

The atomic write itself is `Store.commit` (store.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmstages.errors import UserError
from llmstages.jsonio import read_json
from llmstages.model import GPT
from llmstages.store import Store, manifest_fingerprint, step_name, verify
from llmstages.tokenizer import Tokenizer
from llmstages.weights import load_plain_tensors, load_weights, read_model_config


@dataclass
class Checkpoint:
    """A loaded model with its tokenizer and metadata. `path` is None for models not from the store."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    path: Path | None

    @property
    def ref(self) -> str:
        return str(self.path) if self.path is not None else self.meta.get("source", "?")


def write_model_files(folder: Path, model: GPT, tokenizer: Tokenizer, meta: dict) -> None:
    """Weights, config, tokenizer and meta of `model` into `folder` (the caller makes it atomic)."""
    state = {k: v.to("cpu") for k, v in model.state_for_saving().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tokenizer.save(folder / "tokenizer.json")
    meta = dict(meta, tokenizer_fingerprint=tokenizer.fingerprint)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def write_train_state(folder: Path, tensors: dict[str, Any], info: dict) -> None:
    torch.save(tensors, folder / "train_state.pt")
    (folder / "train_state.json").write_text(json.dumps(info, indent=2))


def save_checkpoint(store: Store, run: str, step: int, model: GPT, tokenizer: Tokenizer, meta: dict,
                    train_state: tuple[dict, dict] | None = None) -> Path:
    """Commit one checkpoint of `run` at `step`; returns its folder."""
    with store.commit(run, step) as tmp:
        write_model_files(tmp, model, tokenizer, dict(meta, run=run, step=step))
        if train_state is not None:
            write_train_state(tmp, *train_state)
    return store.run_dir(run) / step_name(step)


def load_checkpoint(ref: str | Path, store: Store | None = None, *, device: str | torch.device = "cpu",
                    check_hashes: bool = True) -> Checkpoint:
    """Load a MODEL reference: a run name (`run`, `run@best`, `run@500`), a checkpoint folder, or hf:DIR_OR_ID."""
    ref = str(ref)
    if ref.startswith("hf:"):
        from llmstages.interop import load_hf  # imported here: only hf: references need it
        return load_hf(ref[3:], device=device)
    store = store or Store()
    path = store.resolve(ref)
    if check_hashes and (problems := verify(path)):
        raise UserError("\n".join(problems), hint="load an earlier checkpoint of the run (run@STEP)")
    config = read_model_config(path / "model.json")
    meta = read_json(path / "meta.json", what="checkpoint metadata (meta.json)")
    check_meta(meta, path / "meta.json")
    model = load_weights(path / "model.safetensors", config, device)  # names, shapes, finite values checked
    tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    meta["fingerprint"] = manifest_fingerprint(path)
    return Checkpoint(model, tokenizer, meta, path)


def check_meta(meta: dict, where: Path) -> None:
    """Refuse a meta.json whose fields the stages use (task, template, sampling defaults, data settings)
    hold values llmstages never writes; unknown keys (older or newer versions) are ignored."""
    import dataclasses

    from llmstages.config import PARSER, DataConfig, GenerateConfig
    from llmstages.templates import TEMPLATES

    problems = []
    if not isinstance(meta.get("task", ""), str):
        problems.append(("task", "expected a string"))
    template = meta.get("template")
    if template is not None and not (isinstance(template, str) and template in TEMPLATES):
        problems.append(("template", f"{template!r:.40} is not one of {', '.join(TEMPLATES)}"))
    sections = {}
    for key, section, cls in (("generate", "generate", GenerateConfig), ("data_settings", "data", DataConfig)):
        value = meta.get(key)
        if value is not None and not isinstance(value, dict):
            problems.append((key, "expected an object"))
        elif value:
            known = {f.name for f in dataclasses.fields(cls)}
            sections[section] = {k: v for k, v in value.items() if k in known}
    problems += [(p.replace("data.", "data_settings.", 1), m) for p, m in PARSER.parse(sections)[1]]
    if problems:
        raise UserError(f"{where}: corrupt checkpoint metadata:\n  " + "\n  ".join(f"{p}: {m}" for p, m in problems),
                        hint="load another checkpoint of the run")


def load_tokenizer(ref: str | Path, store: Store | None = None) -> Tokenizer:
    """Only the tokenizer of a MODEL reference (no weights loaded): used to prepare fine-tuning data."""
    ref = str(ref)
    if ref.startswith("hf:"):
        from llmstages.interop import load_hf_tokenizer
        return load_hf_tokenizer(ref[3:])
    return Tokenizer.from_file((store or Store()).resolve(ref) / "tokenizer.json")


def load_train_state(path: Path) -> tuple[dict, dict]:
    """(tensors, info) of a checkpoint's train state; refuses a checkpoint that has none."""
    if not (path / "train_state.pt").exists():
        raise UserError(f"{path}: has no train state to resume from (an exported or final-only checkpoint)")
    tensors = load_plain_tensors(path / "train_state.pt")
    info = read_json(path / "train_state.json", what="train state")
    if not isinstance(tensors, dict) or not isinstance(info.get("step"), int):
        raise UserError(f"{path}: corrupt train state (train_state.pt is not a mapping, or train_state.json "
                        "has no integer step)", hint="resume from an earlier checkpoint")
    return tensors, info


def lineage(ckpt_path: Path, store: Store) -> list[dict]:
    """The chain of parents of a checkpoint, newest first, each as its meta.json (as far as it can be read)."""
    chain, path, seen = [], ckpt_path, set()
    while path is not None and path not in seen:
        seen.add(path)
        try:
            meta = read_json(path / "meta.json", what="checkpoint metadata (meta.json)")
        except UserError:
            chain.append({"ref": str(path), "missing": True})
            break
        meta["ref"] = str(path)
        chain.append(meta)
        parent = meta.get("parent")
        if not isinstance(parent, dict) or not parent:
            break
        parent_ref = str(parent.get("ref", ""))
        if parent_ref.startswith("hf:"):
            chain.append({"ref": parent_ref, "task": "pretrained (Hugging Face)"})
            break
        candidate = Path(str(parent.get("path", "")))
        path = candidate if candidate.is_dir() else None
        if path is None:
            chain.append({"ref": parent_ref, "missing": True})
    return chain
