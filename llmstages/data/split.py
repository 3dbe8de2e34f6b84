"""Deterministic train / val / test splits.

The split depends only on the records, the fractions and the seed, never on the machine or on hash
randomisation. Within each stratum (the class label, for classification) the groups of records are
shuffled with `numpy.random.default_rng(seed)` and dealt to test, then val, until each holds its
fraction of the stratum's records; the rest is train. Records of one group (exact duplicate texts,
or one instruction prompt) always land in the same split, so duplicates cannot leak from train into
val or test. Each split keeps the records' original order.

Pretraining splits by document without holding the corpus (`DocumentSplit`): each document draws a
number in [0, 1) from a seeded hash of its source (the file's sha256) and its position in it, and goes
to test below test_fraction, to val below test_fraction + val_fraction, else to train. The draw needs
nothing but the document's identity, so documents can be written as they are read, and the split is
the same on every run and machine. When no document drew val (or test), the prepare's first reading
pass names the train document with the smallest draw, which moves there (`SplitScan`): val is never
empty. When there are too few documents for the fractions asked (fewer than one document's worth for
val or test, e.g. a single .txt file), documents are first cut into pseudo-documents at line breaks
(`cut_document`), and the manifest says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmstages.data.examples import Document
from llmstages.errors import UserError

# How many pieces each held-out split should get at least when documents are cut into pseudo-documents.
PIECES_PER_SPLIT = 5


def split_indices(n: int, *, val_fraction: float, test_fraction: float, seed: int,
                  strata: Sequence[Hashable] | None = None,
                  groups: Sequence[Hashable] | None = None) -> dict[str, np.ndarray]:
    """Indices (sorted, int64) of the records in each split: train, and val / test when their fraction > 0."""
    fractions = {"test": test_fraction, "val": val_fraction}
    held = [name for name, frac in fractions.items() if frac > 0]
    assignment = np.zeros(n, dtype=np.int8)  # 0 train, 1 val, 2 test
    code = {"val": 1, "test": 2}
    rng = np.random.default_rng(seed)
    strata = list(strata) if strata is not None else [0] * n
    groups = list(groups) if groups is not None else list(range(n))
    by_stratum: dict[Hashable, dict[Hashable, list[int]]] = {}
    for i, (stratum, group) in enumerate(zip(strata, groups)):
        by_stratum.setdefault(stratum, {}).setdefault(group, []).append(i)
    for stratum in sorted(by_stratum, key=str):
        members = list(by_stratum[stratum].values())  # groups in first-seen order
        size = sum(len(m) for m in members)
        targets = {name: round(size * fractions[name]) for name in held}
        filled = dict.fromkeys(held, 0)
        for g in rng.permutation(len(members)):
            target = next((name for name in held if filled[name] < targets[name]), None)
            if target is None:
                break
            assignment[members[g]] = code[target]
            filled[target] += len(members[g])
    # Tiny data: make sure every split asked for gets at least one group, taken from train.
    for name in held:
        if not (assignment == code[name]).any():
            train = np.flatnonzero(assignment == 0)
            train_groups = {groups[i] for i in train}
            if len(train_groups) < 2:
                raise UserError(f"too few records to split: {n} record(s), val_fraction={val_fraction}, "
                                f"test_fraction={test_fraction}",
                                hint="add data, or set data.val_fraction=0 / data.test_fraction=0")
            pick = train[rng.integers(len(train))]
            assignment[[i for i in train if groups[i] == groups[pick]]] = code[name]
    out = {"train": np.flatnonzero(assignment == 0)}
    for name in ("val", "test"):
        if name in held:
            out[name] = np.flatnonzero(assignment == code[name])
    if len(out["train"]) == 0:
        raise UserError(f"no records left for training out of {n}",
                        hint="lower data.val_fraction / data.test_fraction")
    return out


def needs_pseudo_documents(n_docs: int, fractions: Sequence[float]) -> bool:
    """True when whole documents cannot honour a held-out fraction (less than one document's worth)."""
    return any(0 < f and n_docs * f < 1 for f in fractions)


def pseudo_document_chars(total_chars: int, fractions: Sequence[float]) -> int:
    """Size of the pseudo-documents that give every held-out split PIECES_PER_SPLIT pieces."""
    smallest = min(f for f in fractions if f > 0)
    pieces_wanted = int(np.ceil(PIECES_PER_SPLIT / smallest))
    return max(1, total_chars // pieces_wanted)


def cut_document(doc: Document, size: int) -> list[Document]:
    """`doc` cut at line breaks into pieces of about `size` characters, each naming its first line."""
    path, _, line = doc.where.rpartition(":")
    line_no = int(line) if line.isdigit() else 1
    text, start, out = doc.text, 0, []
    while start < len(text):
        end = _cut(text, start, size)
        piece = text[start:end]
        out.append(Document(piece, f"{path}:{line_no}" if path else doc.where, len(piece.encode("utf-8"))))
        line_no += piece.count("\n")
        start = end
    return out


def _cut(text: str, start: int, size: int) -> int:
    """End of the piece starting at `start`: just after the first line break past `start + size`
    (else the first space), looking no further than another `size` characters."""
    goal = start + size
    if goal >= len(text):
        return len(text)
    for sep in ("\n", " "):
        found = text.find(sep, goal, goal + size)
        if found != -1:
            return found + 1
    return goal  # a long stretch without breaks: cut it anyway (the pieces still join up exactly)


# ---------------------------------------------------------------------------------------------------
# streamed pretraining split: a seeded hash per document
# ---------------------------------------------------------------------------------------------------
Key = tuple[str, int, int]  # (source: the file's sha256, record number in the file, pseudo-document piece)


def draw(seed: int, key: Key) -> float:
    """The document's number in [0, 1): blake2b of (seed, source, position), the same everywhere."""
    digest = hashlib.blake2b(f"{seed}\0{key[0]}\0{key[1]}\0{key[2]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass
class DocumentSplit:
    """Which split a document goes to, from its key alone (see the module docstring)."""

    val_fraction: float
    test_fraction: float
    seed: int
    moved: dict[Key, str] = field(default_factory=dict)   # train documents moved to an empty val / test

    def __call__(self, key: Key) -> str:
        if key in self.moved:
            return self.moved[key]
        u = draw(self.seed, key)
        if u < self.test_fraction:
            return "test"
        return "val" if u < self.test_fraction + self.val_fraction else "train"


@dataclass
class SplitScan:
    """Counts each split's documents during a reading pass, and keeps the documents that can fill an
    empty split: the two train documents with the smallest draws (for val / test) and the held-out
    document with the largest draw (for train)."""

    split: DocumentSplit
    counts: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0, "test": 0})
    spare: list[tuple[float, Key]] = field(default_factory=list)
    held: tuple[float, Key] | None = None

    def add(self, key: Key) -> str:
        name = self.split(key)
        self.counts[name] += 1
        u = draw(self.split.seed, key)
        if name == "train":
            self.spare = sorted([*self.spare, (u, key)])[:2]
        elif self.held is None or u > self.held[0]:
            self.held = (u, key)
        return name

    def moves(self) -> dict[Key, str]:
        """Documents to move so that train and every split asked for have one; raises when there are too few."""
        counts, moves = dict(self.counts), {}
        if counts["train"] == 0 and self.held is not None:
            moves[self.held[1]] = "train"
            counts[self.split(self.held[1])] -= 1
            counts["train"] += 1
        wanted = [name for name, frac in (("val", self.split.val_fraction), ("test", self.split.test_fraction))
                  if frac > 0 and counts[name] == 0]
        spare = [key for _, key in self.spare if key not in moves]
        if len(wanted) >= counts["train"]:
            total = sum(counts.values())
            raise UserError(f"too few documents to split: {total} document(s), val_fraction="
                            f"{self.split.val_fraction}, test_fraction={self.split.test_fraction}",
                            hint="add data, or set data.val_fraction=0 / data.test_fraction=0")
        moves.update(zip(spare, wanted))
        return moves


def stratified_folds(strata: Sequence[Hashable], groups: Sequence[Hashable], k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1, int64) of every record for k-fold cross-validation.

    Within each stratum (class label) the groups (e.g. exact duplicate texts) are shuffled with
    `numpy.random.default_rng(seed)`, largest first after the shuffle, and each is dealt whole to the
    fold that holds the fewest records of that stratum so far: every fold gets about 1/k of each class,
    and the copies of one message never sit in two folds (so none is both trained on and scored).
    A group whose records carry different strata goes with the stratum of its first record.
    """
    if k < 2:
        raise UserError(f"{k} folds: cross-validation needs at least 2")
    strata, groups = list(strata), list(groups)
    members: dict[Hashable, list[int]] = {}
    stratum_of: dict[Hashable, Hashable] = {}
    for i, (stratum, group) in enumerate(zip(strata, groups)):
        members.setdefault(group, []).append(i)
        stratum_of.setdefault(group, stratum)
    if len(members) < k:
        raise UserError(f"{len(members)} distinct records cannot fill {k} folds", hint="use fewer folds")
    rng = np.random.default_rng(seed)
    fold = np.full(len(strata), -1, dtype=np.int64)
    for stratum in sorted(set(stratum_of.values()), key=str):
        keys = [g for g in members if stratum_of[g] == stratum]  # first-seen order: independent of hashing
        keys = [keys[j] for j in rng.permutation(len(keys))]
        keys.sort(key=lambda g: -len(members[g]))  # stable: big duplicate groups first, else shuffled order
        filled = np.zeros(k, dtype=np.int64)
        for g in keys:
            target = int(np.argmin(filled))  # the first of the emptiest folds
            fold[members[g]] = target
            filled[target] += len(members[g])
    return fold
