"""What a recipe's prepared dataset is: its input files, its tokenizer, and its fingerprint.

The fingerprint is the sha256 of everything that shapes the output: the content hash of every input
file (by role: source / val_source / test_source), every `data.*` setting that affects the output,
the task, the tokenizer (its fingerprint, or the settings it is trained with), the instruction
template, and PREPARE_VERSION. Paths, mirror locations and the pinned URL hashes are left out: the
same bytes found elsewhere make the same dataset. The dataset lives in
`store.data_dir(f"{data.name}-{fingerprint[:12]}")`, so a re-run with the same input finds it and any
change makes a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from llmstages.config import Recipe, builtin_recipes, to_dict
from llmstages.data.prepared import FORMAT_VERSION, PreparedDataset
from llmstages.data.readers import detect_format
from llmstages.data.sources import SourceFile, data_root, resolve_sources
from llmstages.errors import UserError
from llmstages.store import RUN_NAME_RE, Store, is_committed, now_iso
from llmstages.tokenizer import Tokenizer

# Bump when prepare's output changes for the same input and settings (old datasets are then not reused).
PREPARE_VERSION = 1
# data.* settings that do not change the prepared bytes (input identity is the files' content hashes).
NOT_IN_FINGERPRINT = ("name", "source", "sha256", "mirror", "val_source", "test_source", "tokenizer", "batch_chars")
TRAINING_ONLY = ("vocab_size", "tokenizer_sample_bytes")
PRETRAIN_ONLY = ("streaming", "max_tokens", "max_document_chars")
# How pretraining documents are split (split.DocumentSplit); a change makes new datasets.
PRETRAIN_SPLIT = "hash-v1"


@dataclass
class TokenizerChoice:
    """Where the dataset's tokenizer comes from: trained on the corpus, a file, or the parent model."""

    kind: str                       # "train" | "file" | "parent"
    ref: str | None = None          # the file, or the init_from reference
    tokenizer: Tokenizer | None = None  # loaded now for "file" / "parent"

    def identity(self) -> dict:
        """What the fingerprint needs: the tokenizer's own fingerprint, not where it was found."""
        if self.kind == "train":
            return {"train": True}  # the training settings are in the data settings
        return {"fingerprint": self.tokenizer.fingerprint}


@dataclass
class Plan:
    recipe: Recipe
    name: str
    files: dict[str, list[SourceFile]]      # role (train / val / test) -> files
    formats: dict[Path, str]                # file -> format
    tokenizer: TokenizerChoice
    fingerprint: str
    folder: Path


def make_plan(recipe: Recipe, store: Store, *, console: Console | None = None, reuse: bool = True) -> Plan:
    """Resolve the sources (mirror, cache or download), pick the tokenizer and compute the fingerprint.

    The plan's folder is `data/<name>-<fingerprint[:12]>`; with `reuse`, when that is not prepared yet, a
    committed dataset of the same fingerprint under another name (a fine-tune with a new run name) instead."""
    data = recipe.data
    if not data.source:
        raise UserError("data.source is empty", hint="give a file, folder, glob, URL or hf:ORG/NAME in the recipe's data section")
    if (data.streaming or data.max_tokens) and recipe.task != "pretrain":
        raise UserError(f"data.streaming and data.max_tokens are for pretraining text, not {recipe.task} data",
                        hint="remove them from the recipe")
    streaming = data.streaming
    files = {"train": resolve_sources(data.source, data.sha256, data.mirror, store, fmt=data.format,
                                      console=console, streaming=streaming)}
    for role, specs in (("val", data.val_source), ("test", data.test_source)):
        if specs:
            files[role] = resolve_sources(specs, [], [], store, fmt=data.format, console=console, streaming=streaming)
    formats = {}
    for role_files in files.values():
        for f in role_files:
            fmt = "hf-stream" if f.streamed else "parquet" if f.hf else detect_format(f.path, data.format)
            if fmt == "txt" and recipe.task != "pretrain":
                raise UserError(f"{f.display}: {recipe.task} data needs named fields, not plain text",
                                hint="use jsonl, json, csv, tsv or parquet (data.format)")
            formats[f.path] = fmt
    choice = choose_tokenizer(recipe, store)
    fingerprint = compute_fingerprint(recipe, files, choice)
    name = data.name or recipe.run or "dataset"
    if not RUN_NAME_RE.fullmatch(name):
        raise UserError(f"data.name: {name!r} cannot name a folder in the store", hint="use letters, digits, '.', '_' and '-'")
    folder = store.data_dir(f"{name}-{fingerprint[:12]}")
    if reuse and not is_committed(folder):
        folder = same_fingerprint(store, fingerprint) or folder
    return Plan(recipe, name, files, formats, choice, fingerprint, folder)


def same_fingerprint(store: Store, fingerprint: str) -> Path | None:
    """A committed dataset in the store with exactly this fingerprint, whatever its name (the newest)."""
    root = store.data_dir("x").parent
    found = []
    for folder in root.glob(f"*-{fingerprint[:12]}") if root.is_dir() else ():
        if is_committed(folder) and not folder.name.startswith("."):
            with contextlib.suppress(OSError, ValueError):  # an unreadable manifest: not a match
                if json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                    found.append(folder)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def find_prepared(recipe: Recipe, store: Store) -> PreparedDataset | None:
    """The prepared dataset matching `recipe`'s data and settings right now, or None when there is none.

    Resolves the sources (mirror / cache; a URL not yet downloaded is downloaded) to hash them.
    """
    plan = make_plan(recipe, store)
    return PreparedDataset.open(plan.folder) if is_committed(plan.folder) else None


def fingerprint_settings(recipe: Recipe, choice: TokenizerChoice) -> dict:
    settings = {k: v for k, v in to_dict(recipe.data).items() if k not in NOT_IN_FINGERPRINT}
    if recipe.task == "pretrain":
        settings["split_method"] = PRETRAIN_SPLIT  # pretraining text is split by hash since issue 19
    else:
        for key in PRETRAIN_ONLY:  # so that fine-tuning datasets prepared before keep their fingerprint
            settings.pop(key)
    if choice.kind != "train":
        for key in TRAINING_ONLY:
            settings.pop(key)
    if not settings["lowercase"]:
        settings.pop("lowercase")  # off: datasets prepared before the setting existed keep their fingerprint
    return settings


def compute_fingerprint(recipe: Recipe, files: dict[str, list[SourceFile]], choice: TokenizerChoice) -> str:
    parts = {
        "format_version": FORMAT_VERSION,
        "prepare_version": PREPARE_VERSION,
        "task": recipe.task,
        "files": {role: [f.sha256 for f in role_files] for role, role_files in sorted(files.items())},
        "settings": fingerprint_settings(recipe, choice),
        "tokenizer": choice.identity(),
        "template": recipe.finetune.template if recipe.task == "instruct" else None,
    }
    if recipe.task == "instruct" and recipe.finetune.template == "hf":  # the model's own template and end token
        parts["chat_template"] = [choice.tokenizer.chat_template, choice.tokenizer.eot]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def choose_tokenizer(recipe: Recipe, store: Store) -> TokenizerChoice:
    """data.tokenizer: auto (the init_from model's, else train), train, or a tokenizer.json / folder.
    An instruction recipe with template hf ends responses with the chat template's end-of-turn token."""
    choice = _choose_tokenizer(recipe, store)
    if choice.tokenizer is None and recipe.task == "instruct" and recipe.finetune.template == "hf":
        raise UserError("finetune.template=hf uses the chat template of the model's tokenizer, but this "
                        "recipe trains a new tokenizer", hint="set init_from to a model with a chat_template "
                        "(e.g. hf:HuggingFaceTB/SmolLM2-135M), or use template alpaca or chat")
    if choice.tokenizer is not None:
        choice.tokenizer = recipe_tokenizer(recipe, choice.tokenizer)
    return choice


def recipe_tokenizer(recipe: Recipe, tokenizer: Tokenizer) -> Tokenizer:
    """A model's (or file's) tokenizer as the recipe tokenizes: lowercasing with data.lowercase; for an
    instruction recipe with template hf, ending at the chat template's end of turn. The data is prepared
    with this one, a run from init_from trains with it, and its checkpoints keep it."""
    if recipe.data.lowercase:
        tokenizer = tokenizer.lowercased()
    if recipe.task == "instruct" and recipe.finetune.template == "hf":
        from llmstages.templates import chat_tokenizer
        tokenizer = chat_tokenizer("hf", tokenizer)
    return tokenizer


def _choose_tokenizer(recipe: Recipe, store: Store) -> TokenizerChoice:
    setting = recipe.data.tokenizer.strip()
    if setting == "train" or (setting == "auto" and not recipe.init_from):
        return TokenizerChoice("train")
    if setting == "auto":
        return TokenizerChoice("parent", recipe.init_from, parent_tokenizer(recipe.init_from, store))
    path = Path(setting).expanduser()
    root = data_root()
    if not path.exists() and not path.is_absolute() and root is not None and (root / path).exists():
        path = root / path
    if not path.exists():
        raise UserError(f"data.tokenizer: {setting}: no such tokenizer file or folder",
                        hint="use auto, train, or the path of a tokenizer.json (or a folder holding one)")
    return TokenizerChoice("file", str(path), Tokenizer.from_file(path))


def parent_tokenizer(ref: str, store: Store) -> Tokenizer:
    """The tokenizer of the model fine-tuning starts from; a missing run says which command makes it."""
    from llmstages.checkpoint import load_tokenizer  # imports torch: only fine-tuning data needs it

    try:
        return load_tokenizer(ref, store)
    except UserError as err:
        if ref.startswith("hf:") or Path(ref).exists():
            raise
        run = ref.partition("@")[0]
        maker = f"llmstages pretrain {run}" if run in {p.stem for p in builtin_recipes()} else \
            "llmstages pretrain RECIPE (with run: " + run + ")"
        raise UserError(f"init_from: {ref}: there is no trained model to fine-tune from yet ({err.message})",
                        hint=f"make it first with `{maker}`, or set data.tokenizer to a tokenizer.json") from None


def manifest_head(plan: Plan, tokenizer: Tokenizer, tok_info: dict, dtype: str) -> dict:
    """The fields every prepared dataset's manifest.json starts with (what was read, how, which tokenizer)."""
    recipe = plan.recipe
    return {
        "format_version": FORMAT_VERSION,
        "task": recipe.task,
        "name": plan.name,
        "fingerprint": plan.fingerprint,
        "created": now_iso(),
        "sources": [dict(f.manifest_entry(), role=role) for role, files in plan.files.items() for f in files],
        "settings": to_dict(recipe.data),
        "init_from": recipe.init_from,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype,
        "tokenizer": tok_info,
    }


def split_stats(splits: dict, count_key: str, text_tokens: int, *, seconds: float, encode_seconds: float) -> dict:
    """manifest.json's "stats": totals over the splits and speed. `text_tokens`: the measured split's
    tokens without end-of-text tokens (compression is UTF-8 bytes per token of the text itself)."""
    tokens = sum(s["tokens"] for s in splits.values())
    measured = splits.get("val") or splits["train"]
    return {
        "documents": sum(s[count_key] for s in splits.values()),
        "tokens": tokens,
        "bytes": sum(s["bytes"] for s in splits.values()),
        "bytes_per_token": round(measured["bytes"] / max(text_tokens, 1), 4),
        "bytes_per_token_split": "val" if "val" in splits else "train",
        "seconds": round(seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
    }
