"""Packed instruction batches (`finetune.packing: true`): several examples share one row of up to
block_size tokens, instead of one example per row padded to the longest of its batch. Classification
packs too (pack_texts): each micro-batch's texts share as few rows as hold them.

    row       | ex 3 (prompt, response) | ex 8 ............ | ex 1 ...... | pad |
    segments    0  0  0  0  0  0  0  0    1  1  1  1  1  1    2  2  2  2   -1 -1
    positions   0  1  2  3  4  5  6  7    0  1  2  3  4  5    0  1  2  3    0  0

Each example keeps its own targets (prompt targets masked as in data/batches.collate), restarts its
positions at 0, and attends only to its own earlier tokens: the model builds a block-diagonal causal
mask from `segments` (blocks.segment_mask). So an example's loss terms are the ones it gets alone in
a padded row; only the number of padding positions changes.

Order, for exact resume and DDP: epoch e's examples come in the permutation seeded by (seed, e) (the
one data/batches.EpochSampler draws, so both modes see the examples in the same order), packed first
fit into rows with at most OPEN_ROWS rows open at a time; the rows of epoch after epoch form one endless
stream, and micro-batch g holds rows g*B .. g*B + B - 1 of it. Rows per epoch vary a little with the
permutation, so the stream position of each epoch's first row is counted as epochs are packed; any
micro-batch is a pure function of (seed, g).

Shapes: B rows in a batch, T the fullest of them in tokens (at most block_size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from llmstages.data.batches import Example, example_targets
from llmstages.errors import UserError
from llmstages.objectives import IGNORE

OPEN_ROWS = 64  # first-fit looks back over this many unfinished rows (bounds the cost per example)
PAD_SEGMENT = -1  # padding's segment: it reads only padding, and nothing reads it


def pack_rows(lengths: Sequence[int], order: Iterable[int], capacity: int,
              open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """Examples (their indices, taken in `order`) -> rows of at most `capacity` tokens in all.

    Each example goes into the first of the last `open_rows` rows with room for it, else starts a new
    row; rows are returned in the order they were started. Every length must be 1..capacity.
    """
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens of rows[start:], the open ones
    start = 0
    for index in order:
        n = int(lengths[index])
        if not 0 < n <= capacity:
            raise ValueError(f"example {index} has {n} tokens; a row holds 1..{capacity}")
        fit = next((i for i, free in enumerate(room) if free >= n), None)
        if fit is None:
            rows.append([])
            room.append(capacity)
            fit = len(room) - 1
            if len(room) > open_rows:  # the oldest open row is finished as it stands
                room.pop(0)
                start += 1
                fit -= 1
        rows[start + fit].append(int(index))
        room[fit] -= n
    return rows


def row_layout(row_lengths: Sequence[Sequence[int]], pad_id: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """Rows of segments laid out back to back: row r holds segments of `row_lengths[r]` tokens. Returns
    input ids filled with `pad_id`, positions (0..L-1 within each segment, 0 on padding) and segment
    numbers (k for the row's k-th segment, PAD_SEGMENT on padding), each (R, T) with T the fullest row,
    and each segment's (start, end) columns for the caller to fill in."""
    width = max(sum(row) for row in row_lengths)
    inputs = np.full((len(row_lengths), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(row_lengths), width), dtype=np.int64)
    segments = np.full((len(row_lengths), width), PAD_SEGMENT, dtype=np.int64)
    spans = []
    for r, row in enumerate(row_lengths):
        starts = np.concatenate([[0], np.cumsum(row)[:-1]]).astype(int)
        spans.append([(int(a), int(a + n)) for a, n in zip(starts, row)])
        for k, (a, b) in enumerate(spans[-1]):
            positions[r, a:b], segments[r, a:b] = np.arange(b - a), k
    return inputs, positions, segments, spans


def collate_packed(rows: Sequence[Sequence[Example]], *, mask_prompt: bool, pad_id: int) -> dict:
    """Packed rows -> {"input_ids", "targets", "positions", "segments": (B, T), "n_tokens": real input
    tokens}, T = the fullest row. Example k of a row is segment k, its positions 0..L-2; padding at
    the end of a row has segment PAD_SEGMENT, position 0 and target IGNORE."""
    inputs, positions, segments, spans = row_layout([[len(e.ids) - 1 for e in row] for row in rows], pad_id)
    targets = np.full(inputs.shape, IGNORE, dtype=np.int64)
    for r, row in enumerate(rows):
        for example, (a, b) in zip(row, spans[r]):
            inputs[r, a:b], targets[r, a:b] = example_targets(example, mask_prompt)
    return {"input_ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
            "positions": torch.from_numpy(positions), "segments": torch.from_numpy(segments),
            "n_tokens": int(sum(b - a for row in spans for a, b in row))}


def pack_texts(sequences: Sequence[Sequence[int]], pad_id: int, block_size: int) -> dict:
    """Classification: the texts of one micro-batch (token lists, each cut to block_size) packed first
    fit into as few rows of block_size tokens as hold them -> {"input_ids", "positions", "segments":
    (R, T), "last_row", "last_index": (B,) where text b's last token is, "n_tokens"}. The batch keeps
    its B texts, so a step's loss and gradient are those of the padded batch; only padding is saved."""
    lengths = [min(len(s), block_size) for s in sequences]
    if min(lengths) == 0:
        raise ValueError("an empty text has no last token to classify")
    rows = pack_rows(lengths, range(len(sequences)), block_size)
    inputs, positions, segments, spans = row_layout([[lengths[i] for i in row] for row in rows], pad_id)
    last_row, last_index = np.zeros(len(sequences), dtype=np.int64), np.zeros(len(sequences), dtype=np.int64)
    for r, row in enumerate(rows):
        for i, (a, b) in zip(row, spans[r]):
            inputs[r, a:b] = np.asarray(sequences[i][:b - a], dtype=np.int64)
            last_row[i], last_index[i] = r, b - 1
    return {"input_ids": torch.from_numpy(inputs), "positions": torch.from_numpy(positions),
            "segments": torch.from_numpy(segments), "last_row": torch.from_numpy(last_row),
            "last_index": torch.from_numpy(last_index), "n_tokens": int(sum(lengths))}


class PackedBatches:
    """`batches(index)` -> micro-batch `index` of packed rows (see the module docstring)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, *, block_size: int,
                 mask_prompt: bool, pad_id: int):
        if not examples:
            raise UserError("no training examples left to fine-tune on")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.block_size, self.mask_prompt, self.pad_id = block_size, mask_prompt, pad_id
        self.lengths = np.array([len(e.ids) - 1 for e in examples])  # input tokens of each example
        self._firsts = [0]  # stream position of the first row of epoch 0, 1, ... (one more than packed)
        self._rows: dict[int, list[list[int]]] = {}  # the last two epochs packed (a batch spans at most two)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The rows of epoch `epoch`, each a list of example indices."""
        if epoch not in self._rows:
            if len(self._rows) >= 2:
                self._rows.pop(next(iter(self._rows)))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._rows[epoch] = pack_rows(self.lengths, order, self.block_size)
        return self._rows[epoch]

    @property
    def rows_per_epoch(self) -> int:
        """Rows in epoch 0 (later epochs differ by a few): what train.epochs counts as an epoch's sequences."""
        return len(self.epoch_rows(0))

    def row(self, position: int) -> list[int]:
        """Row `position` of the endless stream of rows."""
        while self._firsts[-1] <= position:  # pack epochs until one holds `position`
            self._firsts.append(self._firsts[-1] + len(self.epoch_rows(len(self._firsts) - 1)))
        epoch = int(np.searchsorted(self._firsts, position, side="right")) - 1
        return self.epoch_rows(epoch)[position - self._firsts[epoch]]

    def rows(self, index: int) -> list[list[int]]:
        """The rows (example indices) of micro-batch `index`."""
        return [self.row(index * self.batch_size + i) for i in range(self.batch_size)]

    def __call__(self, index: int) -> dict:
        picked = [[self.examples[i] for i in row] for row in self.rows(index)]
        return collate_packed(picked, mask_prompt=self.mask_prompt, pad_id=self.pad_id)


def padding_share(batches: Iterable[Sequence[int]]) -> float:
    """Share of padded positions over micro-batches, each given as the real tokens of its rows: a
    batch of rows (n_1..n_B) is B * max(n) positions, of which max(n) - n_i in row i are padding."""
    real = total = 0
    for fills in batches:
        real += sum(fills)
        total += len(fills) * max(fills)
    return 1.0 - real / total if total else 0.0


def epoch_padding(lengths: Sequence[int], batch_size: int, seed: int, block_size: int) -> dict[str, float]:
    """Padding share of one epoch (epoch 0) of micro-batches, padded one example per row and packed."""
    lengths = np.asarray(lengths)
    order = np.random.default_rng([seed, 0]).permutation(len(lengths))
    padded = [lengths[order[i:i + batch_size]].tolist() for i in range(0, len(order), batch_size)]
    rows = [int(lengths[row].sum()) for row in pack_rows(lengths, order, block_size)]
    packed = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    return {"padded": padding_share(padded), "packed": padding_share(packed), "rows": len(rows)}
