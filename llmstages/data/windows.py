"""Pretraining batches: random windows of block_size + 1 tokens from memory-mapped token shards.

Window starts are drawn with NumPy from a generator seeded by (seed, micro-batch index), so any
batch can be rebuilt from its index alone (exact resume, identical data under DDP). The tokens are
gathered with one fancy-indexing read per shard, no Python work per token.
"""

from __future__ import annotations

import numpy as np
import torch

from llmstages.errors import UserError


class WindowSampler:
    """`sampler(index)` -> {"input_ids": (B, T), "targets": (B, T), "n_tokens": B*T}, targets shifted by one."""

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int, seed: int, split: str = "train"):
        self.shards = [s for s in shards if len(s) > block_size]
        if not self.shards:
            total = sum(len(s) for s in shards)
            raise UserError(f"the {split} split has {total:,} tokens, too few for one window of "
                            f"block_size+1={block_size + 1} tokens",
                            hint="use more text, a smaller model.block_size, or a larger data.val_fraction")
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        starts = np.array([len(s) - block_size for s in self.shards], dtype=np.float64)
        self.shard_p = starts / starts.sum()  # every window start equally likely, across shards
        self.offsets = np.arange(block_size + 1)

    def __call__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        which = rng.choice(len(self.shards), size=self.batch_size, p=self.shard_p)
        rows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for shard_id in np.unique(which):
            shard = self.shards[shard_id]
            picked = np.flatnonzero(which == shard_id)
            starts = rng.integers(0, len(shard) - self.block_size, size=len(picked))
            rows[picked] = shard[starts[:, None] + self.offsets]  # (n, T+1) in one read
        data = torch.from_numpy(rows)
        return {"input_ids": data[:, :-1], "targets": data[:, 1:], "n_tokens": self.batch_size * self.block_size}


def fixed_windows(shards: list[np.ndarray], block_size: int, batch_size: int, n_batches: int) -> list[dict]:
    """Validation batches: up to n_batches * batch_size non-overlapping windows spread evenly over the split.

    The same windows at every evaluation, so successive val losses are comparable.
    """
    # Window i of the split is the i-th block_size stride of the shards laid end to end; only the
    # picked windows are read (no list of every window: a split may have billions of tokens).
    counts = np.array([max(0, (len(shard) - 1) // block_size) for shard in shards], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise UserError(f"the validation split has fewer than block_size+1={block_size + 1} tokens",
                        hint="raise data.val_fraction or lower model.block_size")
    wanted = min(total, n_batches * batch_size)
    picks = np.linspace(0, total - 1, wanted).round().astype(np.int64)
    ends = np.cumsum(counts)
    which = np.searchsorted(ends, picks, side="right")       # the shard of each picked window
    starts = (picks - (ends[which] - counts[which])) * block_size
    offsets = np.arange(block_size + 1)
    rows = np.stack([shards[w][s + offsets] for w, s in zip(which, starts)]).astype(np.int64)
    data = torch.from_numpy(rows)
    return [{"input_ids": data[i:i + batch_size, :-1], "targets": data[i:i + batch_size, 1:],
             "n_tokens": int(data[i:i + batch_size, :-1].numel())} for i in range(0, len(rows), batch_size)]
