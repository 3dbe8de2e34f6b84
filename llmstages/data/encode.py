r"""Fast, exact, batched tokenization; and training the tokenizer on a sample of the corpus.

`tokenizers` encodes a batch in parallel (Rust, all cores), but only across the batch's texts: one big
book is encoded by one core, and its Encoding objects cost ~100 bytes per token. So long texts are cut
into pieces of about PIECE_CHARS characters first, at points where GPT-2's pre-tokenizer splits anyway:
just before a space, tab or newline that follows a non-whitespace character. In the pre-tokenizer regex

    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

no alternative matches a non-whitespace character followed by whitespace (a space may only open a
match), so a pre-token always ends there; the next one starts there and depends only on the text
after it (the one lookahead looks forward). Pieces cut there encode to exactly the ids of the whole
text. This holds for byte-level BPE tokenizers with that pre-tokenizer and no normalizer (ours and
GPT-2's); texts for any other tokenizer are encoded whole. A stretch of more than 2 x PIECE_CHARS
characters with no such point (a 50 MB line of base64) is cut hard: it still encodes and decodes to
the same text, and only the ids next to the cut may differ from encoding it whole.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from llmstages.tokenizer import Tokenizer, train_bpe

PIECE_CHARS = 1 << 18
# Cut before a space / tab / newline that follows a non-whitespace character. (Python's \s is a superset
# of the Unicode White_Space that the pre-tokenizer's \s means, so (?<=\S) is never wrongly true.)
_SAFE_CUT = re.compile(r"(?<=\S)(?=[ \t\n])")
# Pieces of training text; small enough that the trainer's word counting spreads over all cores.
TRAIN_PIECE_CHARS = 1 << 16


def can_cut(tokenizer: Tokenizer) -> bool:
    """True when texts may be encoded in pieces with identical ids (see the module docstring)."""
    data = json.loads(tokenizer.to_str())
    pre = data.get("pre_tokenizer") or {}
    return (data.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def cut_text(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of about `size` characters, cut at safe points; the pieces join to `text`."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        match = _SAFE_CUT.search(text, start + size, start + 2 * size)
        if match:
            end = match.start()
        elif len(text) - start <= 2 * size:
            break  # the rest fits in one piece
        else:  # no cut point ahead: the last one behind, else a hard cut
            behind = None
            for behind in _SAFE_CUT.finditer(text, start + 1, start + size):
                pass
            end = behind.start() if behind else start + size
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


BATCH_CHARS = 1 << 22


@dataclass
class EncodedBatch:
    """Token ids of a batch of pieces, in order, with the text each piece belongs to."""

    ids: list[np.ndarray]       # uint32 ids of each piece
    owners: list[int]           # index (into the texts given) of each piece's text
    last: list[bool]            # whether the piece ends its text
    chars: int                  # characters encoded


def encode_pieces(tokenizer: Tokenizer, texts: Iterable[str], *, cut: bool | None = None,
                  batch_chars: int = BATCH_CHARS, skip: int = 0) -> Iterator[EncodedBatch]:
    """Encode `texts` in batches of about `batch_chars` characters (long texts cut into pieces), each
    batch one parallel `encode_batch` call: memory stays bounded whatever the size of one text.

    `skip` leaves out the first pieces of the first text (a resumed prepare has written them already)."""
    if cut is None:
        cut = can_cut(tokenizer)
    pieces: list[str] = []
    owners: list[int] = []
    last: list[bool] = []
    size = 0
    for index, text in enumerate(texts):
        parts = cut_text(text) if cut else [text]
        for j, part in enumerate(parts):
            if index == 0 and j < skip:
                continue
            pieces.append(part)
            owners.append(index)
            last.append(j == len(parts) - 1)
            size += len(part)
            if size >= batch_chars:
                yield _encode(tokenizer, pieces, owners, last, size)
                pieces, owners, last, size = [], [], [], 0
    if pieces:
        yield _encode(tokenizer, pieces, owners, last, size)


def _encode(tokenizer: Tokenizer, pieces: list[str], owners: list[int], last: list[bool], size: int) -> EncodedBatch:
    encodings = tokenizer.inner.encode_batch_fast(pieces, add_special_tokens=False)
    return EncodedBatch([np.array(e.ids, dtype=np.uint32) for e in encodings], owners, last, size)


def encode_many(tokenizer: Tokenizer, texts: Sequence[str], *, cut: bool | None = None,
                batch_chars: int = BATCH_CHARS) -> list[np.ndarray]:
    """Token ids (uint32 arrays) of each text. No end-of-text added."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    for batch in encode_pieces(tokenizer, texts, cut=cut, batch_chars=batch_chars):
        for ids, owner in zip(batch.ids, batch.owners):
            parts[owner].append(ids)
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def training_sample(texts: Sequence[str], max_bytes: int, seed: int) -> tuple[list[str], int]:
    """Pieces of `texts` to train a tokenizer on, about `max_bytes` in all (0 = everything), drawn at
    random (seeded) from the whole corpus so every document is represented; and their size in characters."""
    pieces = [p for text in texts for p in cut_text(text, TRAIN_PIECE_CHARS)]
    total = sum(len(p) for p in pieces)
    if max_bytes <= 0 or total <= max_bytes:
        return pieces, total
    chosen, size = [], 0
    for i in np.random.default_rng(seed).permutation(len(pieces)):
        if size >= max_bytes:
            break
        chosen.append(i)
        size += len(pieces[i])
    return [pieces[i] for i in sorted(chosen)], size


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, max_bytes: int, seed: int,
                    lowercase: bool = False) -> tuple[Tokenizer, dict]:
    """A byte-level BPE trained on (a sample of) `texts`; and what it was trained on, for the manifest."""
    sample, size = training_sample(texts, max_bytes, seed)
    tokenizer = train_bpe(iter(sample), vocab_size, length=len(sample), lowercase=lowercase)
    return tokenizer, {"kind": "trained", "vocab_size_asked": vocab_size, "trained_on_chars": size,
                       "sample_bytes_limit": max_bytes, "sampled": max_bytes > 0 and size < sum(map(len, texts))}


class TokenizerSample:
    """A seeded random sample of about `max_bytes` characters of text, drawn while the text streams by.

    Every text is cut into TRAIN_PIECE_CHARS pieces and each piece draws a key from
    `default_rng(seed)`; the sample is the pieces with the smallest keys, taken until they reach
    max_bytes (0 = keep everything). A heap keyed on the largest key holds only those, so memory is
    max_bytes plus one piece, whatever the size of the corpus. Pieces remember which document they
    came from, so a document moved out of train afterwards can be taken out again (`drop`).
    """

    def __init__(self, max_bytes: int, seed: int):
        self.max_bytes = max_bytes
        self.rng = np.random.default_rng(seed)
        self.heap: list[tuple[float, int, Hashable, str]] = []   # (-key, arrival, document, piece)
        self.size = 0          # characters in the sample
        self.seen = 0          # characters offered
        self.arrivals = 0

    def add(self, text: str, document: Hashable) -> None:
        pieces = cut_text(text, TRAIN_PIECE_CHARS)
        for key, piece in zip(self.rng.random(len(pieces)), pieces):
            heapq.heappush(self.heap, (-key, self.arrivals, document, piece))
            self.arrivals += 1
            self.size += len(piece)
            self.seen += len(piece)
            # Drop the largest key while the rest still reaches max_bytes without it.
            while self.max_bytes > 0 and self.size - len(self.heap[0][3]) >= self.max_bytes:
                self.size -= len(heapq.heappop(self.heap)[3])

    def drop(self, documents: Iterable[Hashable]) -> None:
        gone = set(documents)
        kept = [item for item in self.heap if item[2] not in gone]
        self.size -= sum(len(item[3]) for item in self.heap if item[2] in gone)
        self.heap = kept
        heapq.heapify(self.heap)

    def pieces(self) -> list[str]:
        """The sampled pieces in the order they arrived."""
        return [item[3] for item in sorted(self.heap, key=lambda item: item[1])]

    def train(self, vocab_size: int, *, lowercase: bool = False) -> tuple[Tokenizer, dict]:
        """A byte-level BPE trained on the sample; and what it was trained on, for the manifest."""
        sample = self.pieces()
        if not sample:
            raise ValueError("no text to train the tokenizer on")
        tokenizer = train_bpe(iter(sample), vocab_size, length=len(sample), lowercase=lowercase)
        return tokenizer, {"kind": "trained", "vocab_size_asked": vocab_size, "trained_on_chars": self.size,
                           "sample_bytes_limit": self.max_bytes, "sampled": self.size < self.seen}
