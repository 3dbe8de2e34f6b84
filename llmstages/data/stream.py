"""Pretraining documents read as a stream, each with its place in the input (for the hash split and
for resuming), in the order of the recipe's files; and the resumable set of shards they go to.

A Unit is one document, or one pseudo-document when documents are cut (split.cut_document); its key
(source sha256, record number in the file, piece) names it for split.DocumentSplit. A Position is
where a resumed prepare goes on from. Only the current document is held, never the corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmstages.data import examples as ex
from llmstages.data.examples import Document
from llmstages.data.plan import Plan
from llmstages.data.prepared import ShardWriter
from llmstages.data.readers import BadRecord, BadRecords, read_hf_stream, read_records
from llmstages.data.split import Key, cut_document

ROLES = ("train", "val", "test")


@dataclass
class Unit:
    """One document (or pseudo-document) as it is read, with its place in the input."""

    doc: Document
    key: Key                # (source sha256, record number in the file, pseudo-document piece)
    file: int               # index of the file in its role's list


@dataclass
class Position:
    """Where the write pass goes on from: the unit at (role, file, record, piece), of which the first
    `pieces` encoder pieces are written (all of it when `done`)."""

    role: str = "train"
    file: int = 0
    record: int = 0
    piece: int = 0
    pieces: int = 0
    done: bool = False


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
def read_units(plan: Plan, role: str, *, cut_chars: int, start: Position | None = None,
               stream_chars: int = -1,
               on_bad: Callable[[BadRecord, bool], None] | None = None) -> Iterator[Unit]:
    """The documents of `role`'s files in order, as Units, from `start` on (inclusive).

    `cut_chars` > 0 cuts every document into pseudo-documents of about that size. Streamed sources are
    read up to `stream_chars` characters (-1: all of them, 0: not at all). `on_bad(record, streamed)`
    sees every bad record.
    """
    data, files = plan.recipe.data, plan.files.get(role, [])
    first = start.file if start else 0
    for index in range(first, len(files)):
        f = files[index]
        skip = start.record if start and index == first else 0
        if f.streamed:
            if stream_chars == 0:
                continue
            records, number, seen = read_hf_stream(f.hf, skip), skip, 0
        else:
            records, number, seen = read_records(f.path, f.display, plan.formats[f.path], data), 0, 0
        for record in records:
            number += 1
            if number <= skip:
                continue
            item = record if isinstance(record, BadRecord) else ex.convert("pretrain", record, data, "")
            if isinstance(item, BadRecord):
                if on_bad is not None:
                    on_bad(item, f.streamed)
                continue
            pieces = cut_document(item, cut_chars) if cut_chars else [item]
            for j, piece in enumerate(pieces):
                if start and index == first and number - 1 == start.record and j < start.piece:
                    continue
                yield Unit(piece, (f.sha256, number - 1, j), index)
            seen += len(item.text)
            if f.streamed and 0 < stream_chars <= seen:
                break


# ---------------------------------------------------------------------------------------------------
# the shards, resumable
# ---------------------------------------------------------------------------------------------------
class ShardSet:
    """Every split's ShardWriter, its counts and the reading position, saved to `work/progress.json`
    after each finished shard (a resumed prepare starts from the last one)."""

    def __init__(self, work: Path, dtype: str, shard_tokens: int, max_tokens: int, bad: BadRecords):
        self.work, self.max_tokens, self.bad = work, max_tokens, bad
        self.writers = {name: ShardWriter(work, name, dtype, shard_tokens) for name in ROLES}
        self.counts = {name: {"documents": 0, "bytes": 0} for name in ROLES}
        self.tokens = 0
        self.saved_shards = 0
        self.position = Position()

    def resume(self) -> None:
        """Back to the state of the last progress.json (none yet: start from the beginning)."""
        path = self.work / "progress.json"
        state = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        for name, writer in self.writers.items():
            writer.resume(state["writers"][name] if state else {"shards": [], "shard_tokens": []})
        if state:
            self.counts, self.tokens = state["counts"], state["tokens"]
            self.position = Position(**state["position"])
            self.bad.count, self.bad.examples = state["bad"]["count"], state["bad"]["examples"]
        self.saved_shards = self.n_shards()

    def n_shards(self) -> int:
        return sum(len(w.shards) for w in self.writers.values())

    def write(self, parts: dict[str, list[np.ndarray]]) -> None:
        """Append each split's token arrays (one write per split and batch)."""
        for name, arrays in parts.items():
            if arrays:
                tokens = np.concatenate(arrays)
                self.writers[name].write(tokens)
                self.tokens += len(tokens)

    def save_if_shard_done(self, position: Position) -> None:
        """Record progress when a shard was finished since the last record (the files flushed first)."""
        if self.n_shards() == self.saved_shards:
            return
        for writer in self.writers.values():
            writer.flush()
        write_json(self.work / "progress.json", {
            "position": vars(position), "counts": self.counts, "tokens": self.tokens, "bad": self.bad.to_json(),
            "writers": {name: w.state() for name, w in self.writers.items()}})
        self.saved_shards = self.n_shards()

    def close(self) -> dict:
        """Each split's manifest entry (splits with no documents left out)."""
        info = {}
        for name, writer in self.writers.items():
            writer.close()
            if writer.tokens:
                info[name] = {"shards": writer.shards, "shard_tokens": writer.shard_tokens, "tokens": writer.tokens,
                              **self.counts[name]}
        return info


def write_json(path: Path, data: dict) -> None:
    """Replace `path` in one step (a kill leaves the old or the new file, never half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
