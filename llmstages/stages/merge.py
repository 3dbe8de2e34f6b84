"""`llmstages merge`: fold a LoRA run's adapters into its weights, as a new run in the store.

The merged checkpoint is a plain model (no adapters; W' = W + B A * alpha / rank) with the same
tokenizer, task, template and metrics, whose parent is the LoRA checkpoint, so `show` prints the
lineage. It has no train state: it is for generate / chat / evaluate / export, not for --resume.
"""

from __future__ import annotations

from pathlib import Path

from llmstages.checkpoint import load_checkpoint, parent_info, save_checkpoint
from llmstages.errors import UserError
from llmstages.lora import merge_lora
from llmstages.store import RUN_NAME_RE, Store, now_iso

# meta.json entries that describe the source checkpoint itself, not the model
_OWN = ("run", "step", "fingerprint", "tokenizer_fingerprint", "created", "parent")


def merge(model_ref: str, store: Store, *, run: str | None = None) -> Path:
    """Write MODEL with its LoRA adapters merged as run `run` (default: `<run>-merged`); returns the checkpoint."""
    ckpt = load_checkpoint(model_ref, store)
    if ckpt.model.config.lora_rank == 0:
        raise UserError(f"{model_ref} has no LoRA adapters: there is nothing to merge",
                        hint="merge a run fine-tuned with finetune.trainable=lora")
    run = run or f"{ckpt.meta.get('run') or 'model'}-merged"
    if not RUN_NAME_RE.fullmatch(run):
        raise UserError(f"--run {run}: not a run name; nothing was written",
                        hint="use letters, digits, '.', '_' and '-' (a run is one folder in the store)")
    if store.checkpoints(run):
        raise UserError(f"run {run!r} already exists in {store.root}", hint="choose another name with --run NAME")
    merge_lora(ckpt.model)
    meta = {k: v for k, v in ckpt.meta.items() if k not in _OWN}
    meta.update(stage="merge", parent=parent_info(model_ref, ckpt, store), created=now_iso())
    return save_checkpoint(store, run, int(ckpt.meta.get("step") or 0), ckpt.model, ckpt.tokenizer, meta)
