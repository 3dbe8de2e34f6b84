"""Weight averaging: one model whose weights are the mean of several checkpoints' of the same shapes.

Two recipe options use it: `finetune.average_last` (the last checkpoints of one run) and `finetune.soup`
(the final checkpoints of runs that differ only in their seed, stages/soup.py). LoRA adapters are
merged into their weights first, so the mean is the mean of the adapted weights W + BA, not of A and of
B apart (their product's mean is not the product of their means).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.errors import UserError
from llmstages.lora import merge_lora
from llmstages.store import Store


def commit_average(store: Store, run: str, paths: list[Path], meta: dict) -> Path:
    """Commit the mean of the weights of checkpoints `paths` as run `run`, at the step of the last of
    them (an earlier average of the run at that step is replaced atomically, any other is pruned);
    its meta.json is the last one's plus `meta`. Returns the new checkpoint folder."""
    loaded = [load_checkpoint(p, store) for p in paths]
    for ckpt in loaded:
        merge_lora(ckpt.model)
    states = [c.model.state_for_saving() for c in loaded]
    if any(s.keys() != states[-1].keys() for s in states):
        raise UserError(f"cannot average {', '.join(map(str, paths))}: their tensors differ",
                        hint="average checkpoints of one model shape (a run resumed with --allow-change to "
                             "another model.* setting is another model)")
    mean = {k: torch.stack([s[k].float() for s in states]).mean(dim=0).to(states[-1][k].dtype) for k in states[-1]}
    last = loaded[-1]
    last.model.load_saved_state(mean)
    kept = {k: v for k, v in last.meta.items() if k not in ("run", "step", "tokenizer_fingerprint")}
    path = save_checkpoint(store, run, int(last.meta.get("step", 0)), last.model, last.tokenizer, dict(kept, **meta))
    store.prune(run, 1)
    return path
