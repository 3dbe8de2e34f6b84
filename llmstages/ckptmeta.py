"""A checkpoint's JSON files (meta.json, model.json) and its lineage, read without torch.

`runs`, `show` and `recipes` only browse: they read these files and never the weights, so they start
in a fraction of a second (torch alone takes seconds to import). checkpoint.py, which writes every
file of a checkpoint and loads the weights, re-exports these readers.

Lineage: a child's meta.json records its parent as {"ref", "task", "step", "path", "fingerprint"}.
`path` is relative to the store root when the parent is in the same store (`runs/base/step-000500`),
so a store that is copied or moved keeps its lineage; older checkpoints hold an absolute path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmstages.errors import UserError
from llmstages.jsonio import read_json
from llmstages.store import Store, manifest_fingerprint

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "model.json", "tokenizer.json", "meta.json"
ENSEMBLE_KEY = "ensemble"  # meta.json: the number of members of an ensemble checkpoint (ensemble.py)
MAX_MEMBERS = 64  # more is a corrupt meta.json, refused before any member is built


def check_meta(meta: dict, where: Path) -> None:
    """Refuse a meta.json whose fields the stages use (task, ensemble members, template, sampling defaults,
    data settings) hold values llmstages never writes; unknown keys (older or newer versions) are ignored."""
    from llmstages.config import PARSER, DataConfig, GenerateConfig
    from llmstages.templates import TEMPLATES

    problems = []
    if not isinstance(meta.get("task", ""), str):
        problems.append(("task", "expected a string"))
    members = meta.get(ENSEMBLE_KEY, 0)
    if not isinstance(members, int) or isinstance(members, bool) or members == 1 or not 0 <= members <= MAX_MEMBERS:
        problems.append((ENSEMBLE_KEY, f"{members!r:.40} is not a number of members (2 to {MAX_MEMBERS})"))
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


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json (stage, step, metrics, parent, fingerprints, template, data settings),
    its fields checked (exit 2 naming the file when corrupt)."""
    meta = read_json(path / META, what="checkpoint metadata (meta.json)")
    check_meta(meta, path / META)
    return meta


def read_model_json(path: Path) -> dict:
    """A checkpoint's model.json as plain data, unchecked (what `show` prints)."""
    return read_json(path / CONFIG, what="model config (model.json)")


def store_root_of(ckpt_path: Path) -> Path | None:
    """The store a checkpoint folder lies in (STORE/runs/RUN/step-N), or None for a folder elsewhere."""
    parts = ckpt_path.parts
    return ckpt_path.parent.parent.parent if len(parts) >= 3 and parts[-3] == "runs" else None


def parent_location(ckpt_path: Path | None, store_root: Path | None) -> str | None:
    """Where a child records its parent: relative to `store_root` when the parent is inside it (a copied
    store keeps working), else absolute; None for a model not from a folder (hf: weights)."""
    if ckpt_path is None:
        return None
    absolute = ckpt_path.resolve()
    if store_root is not None:
        try:
            return absolute.relative_to(Path(store_root).resolve()).as_posix()
        except ValueError:
            pass  # a checkpoint folder from another store: only its absolute path finds it again
    return str(absolute)


def parent_record(ref: str, meta: dict, ckpt_path: Path | None, store_root: Path | None) -> dict:
    """What a child checkpoint records about where it started (shown by `llmstages show` as lineage)."""
    info = {"ref": ref, "task": meta.get("task"), "step": meta.get("step")}
    if ckpt_path is not None:
        info.update(path=parent_location(ckpt_path, store_root), fingerprint=manifest_fingerprint(ckpt_path))
    return info


def lineage(ckpt_path: Path, store: Store | None = None) -> list[dict]:
    """The chain of parents of a checkpoint, newest first, each as its meta.json (as far as it can be read).

    A relative parent path is looked up in the store of the child's folder (in `store` when the child
    is not inside one)."""
    chain, path, seen = [], ckpt_path, set()
    while path is not None and path not in seen:
        seen.add(path)
        try:
            meta = read_json(path / META, what="checkpoint metadata (meta.json)")
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
        path = parent_folder(parent, path, store)
        if path is None:
            chain.append({"ref": parent_ref, "missing": True})
    return chain


def parent_folder(parent: dict, child: Path, store: Store | None = None) -> Path | None:
    """The existing folder a parent record points at; a relative path is looked up in the child's store."""
    recorded = str(parent.get("path") or "")
    if not recorded:
        return None
    folder = Path(recorded)
    if not folder.is_absolute():
        root = store_root_of(child) or (store.root if store is not None else None)
        if root is None:
            return None
        folder = root / folder
    return folder if folder.is_dir() else None
