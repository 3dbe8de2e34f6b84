"""Combining checkpoints of one model shape: the mean of their weights, or an ensemble of them.

Weight averaging serves two recipe options: `finetune.average_last` (the last checkpoints of one run)
and `finetune.soup` (the final checkpoints of runs that differ only in their seed, stages/soup.py);
`finetune.ensemble` keeps such runs' models side by side instead (ensemble.py). LoRA adapters are
merged into their weights first, so the mean is the mean of the adapted weights W + BA, not of A and of
B apart (their product's mean is not the product of their means).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmstages.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from llmstages.ckptmeta import ENSEMBLE_KEY
from llmstages.ensemble import Ensemble
from llmstages.errors import UserError
from llmstages.lora import merge_lora
from llmstages.model import GPT
from llmstages.store import Store


def load_merged(store: Store, paths: list[Path]) -> list[Checkpoint]:
    """The checkpoints `paths`, LoRA adapters merged, after checking that they hold tensors of the same
    names and shapes."""
    loaded = [load_checkpoint(p, store) for p in paths]
    for ckpt in loaded:
        merge_lora(ckpt.model)
    shapes = [{k: tuple(v.shape) for k, v in c.model.state_for_saving().items()} for c in loaded]
    if any(s != shapes[-1] for s in shapes):
        raise UserError(f"cannot combine {', '.join(map(str, paths))}: their tensors differ",
                        hint="average checkpoints of one model shape (a run resumed with --allow-change to "
                             "another model.* setting is another model)")
    return loaded


def commit_combined(store: Store, run: str, last: Checkpoint, model: GPT | Ensemble, meta: dict) -> Path:
    """Commit `model` as run `run` at the step of checkpoint `last`, with `last`'s tokenizer and meta.json
    plus `meta` (an earlier checkpoint of the run at that step is replaced atomically, any other pruned).
    `last`'s validation metrics are left out: they are one input's, not the combined model's."""
    dropped = ("run", "step", "tokenizer_fingerprint", "metrics")
    kept = {k: v for k, v in last.meta.items() if k not in dropped}
    path = save_checkpoint(store, run, int(last.meta.get("step", 0)), model, last.tokenizer, dict(kept, **meta))
    store.prune(run, 1)
    return path


def commit_average(store: Store, run: str, paths: list[Path], meta: dict) -> Path:
    """Commit the mean of the weights of checkpoints `paths` as run `run`, at the step of the last of
    them; its meta.json is the last one's plus `meta`. Returns the new checkpoint folder."""
    loaded = load_merged(store, paths)
    states = [c.model.state_for_saving() for c in loaded]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(dim=0).to(states[-1][k].dtype) for k in states[-1]}
    last = loaded[-1]
    last.model.load_saved_state(mean)
    return commit_combined(store, run, last, last.model, meta)


def commit_ensemble(store: Store, run: str, paths: list[Path], meta: dict) -> Path:
    """Commit the models of checkpoints `paths` side by side as one ensemble checkpoint of run `run`
    (ensemble.py), at the step of the last of them; meta.json is the last one's plus `meta` and the
    number of members. Returns the new checkpoint folder."""
    loaded = load_merged(store, paths)
    if len({c.tokenizer.fingerprint for c in loaded}) > 1:
        raise UserError(f"cannot make an ensemble of {', '.join(map(str, paths))}: their tokenizers differ",
                        hint="the members must be fine-tuned on the same prepared data")
    ensemble = Ensemble([c.model for c in loaded])
    return commit_combined(store, run, loaded[-1], ensemble, dict(meta, **{ENSEMBLE_KEY: len(loaded)}))
