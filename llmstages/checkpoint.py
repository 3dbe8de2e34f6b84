"""Model checkpoints: every file of a committed store folder, and the only code that opens them.

    model.safetensors   weights (safetensors: loading executes no code)
    model.json          GPTConfig (vocab, sizes, head type, class names, LoRA)
    tokenizer.json      the exact tokenizer
    meta.json           stage, step, metrics, parent checkpoint (lineage), data + tokenizer fingerprints
    train_state.pt      optimizer state and torch RNG states (loaded with torch.load(weights_only=True))
    train_state.json    step, tokens seen, best, loss window, sampler position, Python/NumPy RNG states
    optimizer/          train.strategy=fsdp only: the optimizer state sharded, one file per rank
                        (fsdp.py), instead of the one in train_state.pt
    MANIFEST            sha256 + size of every file above (store.py writes it last)

Saving goes through `Store.commit` (atomic: a hidden folder, MANIFEST, one rename). Loading checks
every sha256 against MANIFEST first, for `generate` as for `--resume` (`load_for_resume`). What the
train state holds is RunState's business (runstate.py); here it is only written and read.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from llmstages.ckptmeta import CONFIG, META, TOKENIZER, WEIGHTS, check_meta, lineage, parent_record  # noqa: F401
from llmstages.ckptmeta import ENSEMBLE_KEY
from llmstages.ckptmeta import read_meta, read_model_json  # noqa: F401 (re-exported: the torch-free readers)
from llmstages.config import Recipe, read_yaml, recipe_diff, to_dict
from llmstages.errors import UserError
from llmstages.jsonio import read_json
from llmstages.model import GPT
from llmstages.store import Store, manifest_fingerprint, step_name, verify
from llmstages.tokenizer import Tokenizer
from llmstages.weights import load_plain_tensors, load_weights, load_weights_into, nonfinite, read_model_config

STATE_TENSORS, STATE_INFO = "train_state.pt", "train_state.json"


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


def write_model_files(folder: Path, model: GPT, tokenizer: Tokenizer, meta: dict,
                      weights: dict[str, torch.Tensor] | None = None) -> None:
    """Weights, config, tokenizer and meta of `model` into `folder` (the caller makes it atomic);
    `weights`: the state to write instead of the model's own (a sharded model's, gathered)."""
    state = {k: v.to("cpu") for k, v in (weights if weights is not None else model.state_for_saving()).items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2))
    tokenizer.save(folder / TOKENIZER)
    meta = dict(meta, tokenizer_fingerprint=tokenizer.fingerprint)
    (folder / META).write_text(json.dumps(meta, indent=2, default=str))


def write_train_state(folder: Path, tensors: dict[str, Any], info: dict) -> None:
    torch.save(tensors, folder / STATE_TENSORS)
    (folder / STATE_INFO).write_text(json.dumps(info, indent=2))


def save_checkpoint(store: Store, run: str, step: int, model: GPT, tokenizer: Tokenizer, meta: dict,
                    train_state: tuple[dict, dict] | None = None, *, weights: dict[str, torch.Tensor] | None = None,
                    shards: Callable[[Path], None] | None = None) -> Path:
    """Commit one checkpoint of `run` at `step`; returns its folder. A full disk is a DiskFull error
    (exit 3): the temporary folder is removed by store.commit and the committed checkpoints are untouched.

    `weights` replaces the model's own state (fsdp: gathered on rank 0); `shards(tmp)` writes the files
    every rank writes together (fsdp: the optimizer shards; the other ranks call it with None)."""
    try:
        with store.commit(run, step) as tmp:
            if shards is not None:
                shards(tmp)
            write_model_files(tmp, model, tokenizer, dict(meta, run=run, step=step), weights)
            if train_state is not None:
                write_train_state(tmp, *train_state)
    except (OSError, SafetensorError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        raise DiskFull(f"no space left on the device of {store.run_dir(run)} while writing {step_name(step)} "
                       f"(about {checkpoint_bytes(model) / 2**20:.1f} MiB needed, {free_bytes(store.root) / 2**20:.1f} "
                       "MiB free); nothing was committed or pruned, the earlier checkpoints are intact",
                       hint="free some space (or move the store with --store), then resume with --resume") from None
    return store.run_dir(run) / step_name(step)


class DiskFull(UserError):
    """The store's disk filled up: its own exit code, 3 (documented in the README)."""

    exit_code = 3


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC as an OSError, or as the text of safetensors' / torch's own write errors."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `path` (or of its nearest parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def checkpoint_bytes(model: GPT) -> int:
    """An upper estimate of one checkpoint of `model` on disk: the weights, two fp32 optimizer moments per
    trainable value (AdamW; Muon keeps one), and 1 MiB for the tokenizer and the JSON files."""
    weights = sum(t.numel() * t.element_size() for t in model.state_for_saving().values())
    moments = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + moments + (1 << 20)


def check_disk(store: Store, run: str, model: GPT) -> None:
    """Before step 1: refuse a run whose store cannot hold two checkpoints (the new one is written
    before the old one is pruned)."""
    needed, free = 2 * checkpoint_bytes(model), free_bytes(store.run_dir(run))
    if free < needed:
        raise UserError(f"{store.run_dir(run)}: {free:,} bytes free, two checkpoints of this model need about "
                        f"{needed:,} bytes; nothing was trained",
                        hint="free some space, or put the store on a larger disk (--store DIR or $LLMSTAGES_STORE)")


def load_checkpoint(ref: str | Path, store: Store | None = None, *, device: str | torch.device = "cpu",
                    check_hashes: bool = True, ensemble_ok: bool = False) -> Checkpoint:
    """Load a MODEL reference: a run name (`run`, `run@best`, `run@500`), a checkpoint folder, or hf:DIR_OR_ID.

    An ensemble of classifiers (finetune.ensemble, ensemble.py) loads only with `ensemble_ok`: the
    callers that classify with it say so; every other use needs one model and gets a clear refusal."""
    ref = str(ref)
    if ref.startswith("hf:"):
        from llmstages.interop import load_hf  # imported here: only hf: references need it
        hf = load_hf(ref[3:], device=device)
        return Checkpoint(hf.model, hf.tokenizer, hf.meta, None)
    store = store or Store()
    path = store.resolve(ref)
    if check_hashes and (problems := verify(path)):
        raise UserError("\n".join(problems), hint="load an earlier checkpoint of the run (run@STEP)")
    config = read_model_config(path / CONFIG)
    meta = read_meta(path)
    if (members := meta.get(ENSEMBLE_KEY, 0)) and not ensemble_ok:  # checked by read_meta
        raise UserError(f"{path} is an ensemble of {members} classifiers (finetune.ensemble): only `classify`, "
                        "`evaluate` and the test split use one; this needs one model",
                        hint=f"use one of its members instead: {path.parent.name}-member1 ... -member{members}")
    model = load_weights(path / WEIGHTS, config, device, members=members)  # names, shapes, finite values checked
    tokenizer = Tokenizer.from_file(path / TOKENIZER)
    meta["fingerprint"] = manifest_fingerprint(path)
    return Checkpoint(model, tokenizer, meta, path)


def load_tokenizer(ref: str | Path, store: Store | None = None) -> Tokenizer:
    """Only the tokenizer of a MODEL reference (no weights loaded): used to prepare fine-tuning data."""
    ref = str(ref)
    if ref.startswith("hf:"):
        from llmstages.interop import load_hf_tokenizer
        return load_hf_tokenizer(ref[3:])
    return Tokenizer.from_file((store or Store()).resolve(ref) / TOKENIZER)


def load_train_state(path: Path) -> tuple[dict, dict]:
    """(tensors, info) of a checkpoint's train state; refuses a checkpoint that has none."""
    if not (path / STATE_TENSORS).exists():
        raise UserError(f"{path}: has no train state to resume from (an exported or final-only checkpoint)")
    tensors = load_plain_tensors(path / STATE_TENSORS)
    info = read_json(path / STATE_INFO, what="train state")
    if not isinstance(tensors, dict) or not isinstance(info.get("step"), int):
        raise UserError(f"{path}: corrupt train state ({STATE_TENSORS} is not a mapping, or {STATE_INFO} "
                        "has no integer step)", hint="resume from an earlier checkpoint")
    return tensors, info


def parent_info(ref: str, ckpt: Checkpoint, store: Store | None = None) -> dict:
    """What a child checkpoint records about where it started (shown by `llmstages show` as lineage);
    the parent's folder is stored relative to `store` when it lies inside it, so a copied store keeps working."""
    return parent_record(ref, ckpt.meta, ckpt.path, store.root if store is not None else None)


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------
# Recipe fields that fix the shapes of the weights or the optimizer state: a checkpoint cannot be
# resumed with other values, --allow-change or not.
FIXED_ON_RESUME = ("model.size", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
                   "model.vocab_size", "model.bias", "finetune.trainable", "finetune.lora_rank",
                   "finetune.lora_targets", "model.arch", "model.pos_emb", "model.norm", "model.mlp",
                   "model.mlp_hidden", "model.n_kv_head", "model.qk_norm", "model.tie_embeddings")


def load_for_resume(store: Store, recipe: Recipe, model: GPT, tokenizer: Tokenizer, data_fingerprint: str, *,
                    allow_change: bool, warn: Callable[[str], None] = print) -> tuple[dict, dict]:
    """The newest checkpoint of `recipe.run` that verifies (every sha256, finite weights of the right shapes,
    a readable train state), checked against the recipe, data and tokenizer, its weights loaded into
    `model`; returns its train state (tensors, info) for RunState, info["loaded_from"] naming the folder.

    A newer checkpoint that fails verification is skipped with a warning naming the bad file: a resume
    never continues from (and so never commits on top of) unverified state."""
    found = store.checkpoints(recipe.run)
    if not found:
        raise UserError(f"run {recipe.run!r} has no checkpoint to resume from",
                        hint=f"start it without --resume (store: {store.root})")
    rejected = []
    for path in reversed(found):
        try:
            return _load_verified(store, recipe, model, tokenizer, data_fingerprint, allow_change, path)
        except CorruptCheckpoint as err:
            rejected.append(err.message)
            warn(f"warning: skipping {path.name} of {recipe.run}, it does not verify:\n{err.message}")
    raise UserError(f"no checkpoint of run {recipe.run!r} verifies:\n" + "\n".join(rejected),
                    hint="start the run again without --resume (after deleting its folder), or restore the files")


class CorruptCheckpoint(UserError):
    """A checkpoint whose files fail verification (a resume falls back to an older one)."""


def verify_checkpoint(path: Path) -> list[str]:
    """Every problem of a committed checkpoint folder: sha256 against MANIFEST, then model.json, the
    weights (names, shapes, finite values) and the train state (readable, finite; a sharded optimizer
    state read whole). Empty = it verifies."""
    if problems := verify(path):
        return problems
    try:
        members = read_meta(path).get(ENSEMBLE_KEY, 0)  # a number read_meta checked
        model = load_weights(path / WEIGHTS, read_model_config(path / CONFIG), members=members)
        del model
        if (path / STATE_TENSORS).exists():
            tensors, _ = load_train_state(path)
            if bad := nonfinite(tensors):
                return [f"{path / STATE_TENSORS}: refused: non-finite values in {', '.join(bad[:5])}"]
        if (path / "optimizer").is_dir():
            return _verify_sharded_optimizer(path)
    except UserError as err:
        return [err.message]
    return []


def _verify_sharded_optimizer(path: Path) -> list[str]:
    from llmstages import fsdp  # imported here: torch.distributed is needed only for fsdp checkpoints

    state = fsdp.read_optimizer_files(path)  # a UserError naming the folder when it does not read
    if bad := nonfinite(state):
        return [f"{path / fsdp.OPTIMIZER_DIR}: refused: non-finite values in {', '.join(bad[:5])}"]
    return []


def restore_optimizer(saved: tuple[dict, dict], model: GPT, optimizer: Any, *, sharded: bool) -> None:
    """Load into `optimizer` the state of the checkpoint `saved` (tensors, info) came from: the one in
    train_state.pt, or (train.strategy=fsdp) the sharded one beside it, resharded onto this run
    (`sharded`: the model is, by FSDP)."""
    tensors, info = saved
    if "optimizer" not in tensors:
        from llmstages import fsdp  # imported when used: torch.distributed.checkpoint takes ~0.7 s
        fsdp.load_optimizer(Path(info["loaded_from"]), model, optimizer)
    elif sharded:
        raise UserError(f"{info['loaded_from']}: its optimizer state is one file (a train.strategy=ddp run); "
                        "a train.strategy=fsdp run reads a sharded one",
                        hint="resume with the train.strategy the run started with")
    else:
        optimizer.load_state_dict(tensors["optimizer"])


def _load_verified(store: Store, recipe: Recipe, model: GPT, tokenizer: Tokenizer, data_fingerprint: str,
                   allow_change: bool, path: Path) -> tuple[dict, dict]:
    if problems := verify(path):
        raise CorruptCheckpoint("\n".join(problems))
    _check_resume(store.run_dir(recipe.run), recipe, allow_change, path, data_fingerprint, tokenizer)
    tensors, info = load_state(path, model, verified=True)
    return tensors, dict(info, loaded_from=str(path))


def load_state(path: Path, model: GPT, *, verified: bool = False) -> tuple[dict, dict]:
    """Load checkpoint `path`'s weights into `model` and return its train state (tensors, info), every
    file checked first (sha256 unless `verified`, shapes, finite values); CorruptCheckpoint if not."""
    if not verified and (problems := verify(path)):
        raise CorruptCheckpoint("\n".join(problems))
    try:
        load_weights_into(model, path / WEIGHTS)  # names, shapes, finite values checked
        tensors, info = load_train_state(path)
    except UserError as err:
        raise CorruptCheckpoint(err.message) from None
    if bad := nonfinite(tensors):
        raise CorruptCheckpoint(f"{path / STATE_TENSORS}: refused: non-finite values in {', '.join(bad[:5])}")
    return tensors, info


def _check_resume(run_dir: Path, recipe: Recipe, allow_change: bool, latest: Path, data_fingerprint: str,
                  tokenizer: Tokenizer) -> None:
    """Refuse a resume that would not continue the same run: another recipe (unless allowed), other
    shapes, another tokenizer (never allowed), or other training data (unless allowed)."""
    saved = run_dir / "recipe.yaml"
    diffs = recipe_diff(read_yaml(saved), to_dict(recipe)) if saved.exists() else []
    diffs = [d for d in diffs if not _harmless_change(*d)]
    lines = "\n".join(f"    {path}: {old!r} -> {new!r}" for path, old, new in diffs)
    fixed = [path for path, _, _ in diffs if path in FIXED_ON_RESUME]
    if fixed:
        raise UserError(f"{run_dir.name} cannot be resumed with another {', '.join(fixed)}:\n{lines}",
                        hint="these fix the shapes of the saved weights; start a new run with run=NEW_NAME")
    if diffs and not allow_change:
        raise UserError(f"the recipe differs from the one {run_dir.name} was started with:\n{lines}",
                        hint="resume with the same recipe, or pass --allow-change to continue with the new one")
    meta = read_meta(latest)
    if meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise UserError(f"{latest.name} of {run_dir.name} was trained with another tokenizer than the one now "
                        f"prepared (fingerprint {meta['tokenizer_fingerprint'][:12]} vs {tokenizer.fingerprint[:12]})",
                        hint="the data changed since the run started: start a new run with run=NEW_NAME")
    if meta.get("data_fingerprint") not in (None, data_fingerprint) and not allow_change:
        raise UserError(f"the training data differs from the data {run_dir.name} was started with "
                        f"(dataset {meta['data_fingerprint'][:12]} vs {data_fingerprint[:12]})",
                        hint="resume on the same files, or pass --allow-change to continue on the new data")


def _harmless_change(path: str, old, new) -> bool:
    """A recipe difference that does not change the training a resume continues: the experiment loggers,
    the generation defaults, or a field the saved recipe.yaml predates (absent there) left at its default."""
    if path == "train.loggers" or path.startswith("generate."):
        return True
    default: object = to_dict(Recipe())
    for key in path.split("."):
        default = default.get(key) if isinstance(default, dict) else None
    return old is None and new == default

