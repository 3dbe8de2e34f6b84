"""Batches of labeled records: the epoch sampler every fine-tuning task draws from, and the collate
functions that pad records into tensors.

`EpochSampler` is the indexed pattern of data/windows.py for a fixed set of examples: the stream is
one epoch after another, each a permutation seeded by (seed, epoch), and micro-batch g holds
positions g*B .. g*B + B - 1 of it. Any micro-batch is a pure function of (seed, g), so a resume is
exact and DDP ranks (which take interleaved indices) see the batches of a single process.

Shapes: B rows in a batch, T the longest of them in tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmstages.errors import UserError
from llmstages.objectives import IGNORE


class EpochSampler:
    """Micro-batch `index` -> the example indices at its positions of the endless epoch stream.

    With `groups` (index arrays, e.g. one per class), each epoch is a fresh balanced subset instead
    of every example: every group cut down to the size of the smallest one, drawn by (seed, epoch).
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int, *, groups: Sequence[np.ndarray] | None = None):
        if n_examples == 0:
            raise UserError("no training examples left to fine-tune on")
        self.n_examples, self.batch_size, self.seed = n_examples, batch_size, seed
        self.groups = list(groups) if groups is not None else None
        smallest = min(len(g) for g in self.groups) if self.groups else 0
        self.epoch_size = smallest * len(self.groups) if self.groups else n_examples
        self._orders: dict[int, np.ndarray] = {}  # the last two epochs drawn (a batch spans at most two)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example indices of epoch `epoch`, in training order (length `epoch_size`)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = self._draw(epoch)
        return self._orders[epoch]

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if not self.groups:
            return rng.permutation(self.n_examples)
        smallest = self.epoch_size // len(self.groups)
        picked = np.concatenate([rng.choice(members, size=smallest, replace=False) for members in self.groups])
        return rng.permutation(picked)

    def indices(self, index: int) -> np.ndarray:
        """The example indices of micro-batch `index` (B of them, int64)."""
        positions = index * self.batch_size + np.arange(self.batch_size)
        epochs, within = np.divmod(positions, self.epoch_size)
        return np.array([self.epoch_order(int(e))[w] for e, w in zip(epochs, within)], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# classification: texts padded to the longest, read at the last real token
# ---------------------------------------------------------------------------------------------------
def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, block_size: int) -> dict:
    """Token lists -> {"input_ids": (B, T), "last_index": (B,), "n_tokens": real tokens}.

    Each text is cut to its first `block_size` tokens and right-padded with `pad_id` to the longest.
    Every text needs at least one token (prepare and `classify` refuse empty texts).
    """
    lengths = [min(len(s), block_size) for s in sequences]
    if min(lengths) == 0:
        raise ValueError("an empty text has no last token to classify")
    ids = np.full((len(sequences), max(lengths)), pad_id, dtype=np.int64)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        ids[row, :n] = np.asarray(seq[:n], dtype=np.int64)
    return {"input_ids": torch.from_numpy(ids), "last_index": torch.tensor(lengths, dtype=torch.long) - 1,
            "n_tokens": int(sum(lengths))}


# ---------------------------------------------------------------------------------------------------
# instructions: prompt + response rows, prompt targets masked
# ---------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One row: `ids` = (kept) prompt tokens + response tokens (+ eot unless cut), int64."""

    ids: np.ndarray
    n_prompt: int
    record: int = -1        # index of the record in its split (for messages)

    def response_targets(self, mask_prompt: bool = True) -> int:
        """Targets that count in the loss: ids[1:] minus the masked prompt positions."""
        return len(self.ids) - max(self.n_prompt, 1) if mask_prompt else len(self.ids) - 1


def example_targets(example: Example, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """One row's inputs ids[:-1] and targets ids[1:] (L - 1 each), prompt targets IGNORE when mask_prompt."""
    targets = example.ids[1:].copy()
    if mask_prompt:
        # targets[j] predicts ids[j + 1]: it is a prompt token while j + 1 < n_prompt.
        targets[:max(example.n_prompt - 1, 0)] = IGNORE
    return example.ids[:-1], targets


def collate(examples: Sequence[Example], *, mask_prompt: bool, pad_id: int) -> dict:
    """Rows -> {"input_ids": (B, T), "targets": (B, T), "n_tokens": real input tokens}, T = longest row - 1.

    Padding is on the right (causal attention: real positions never see it) and its targets are IGNORE.
    """
    width = max(len(e.ids) for e in examples) - 1
    inputs = np.full((len(examples), width), pad_id, dtype=np.int64)
    targets = np.full((len(examples), width), IGNORE, dtype=np.int64)
    for row, example in enumerate(examples):
        n = len(example.ids) - 1
        inputs[row, :n], targets[row, :n] = example_targets(example, mask_prompt)
    return {"input_ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
            "n_tokens": int(sum(len(e.ids) - 1 for e in examples))}
