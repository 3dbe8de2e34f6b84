"""Prepared datasets on disk: the writers, and `PreparedDataset`, the one way to read them.

    store/data/<name>-<fingerprint[:12]>/
      MANIFEST            sha256 of every file (written last by store.atomic_dir)
      manifest.json       format_version, task, name, fingerprint, created, sources, settings,
                          tokenizer_fingerprint, vocab_size, eot_id, dtype, bad_records, splits, stats
      tokenizer.json
      pretrain:           <split>-00000.bin ...   flat little-endian `dtype` token ids; every document
                                                  is followed by eot_id; a document may span two shards
      classify/instruct:  <split>.tokens.bin      flat `dtype` token ids of all records, back to back
                          <split>.offsets.npy     int64, n + 1: record i is tokens[offsets[i]:offsets[i+1]]
                          <split>.labels.npy      int64 class indices (classify)
                          <split>.prompt_lens.npy int64 prompt tokens per record (instruct)
                          <split>.jsonl           one JSON object per record: its text and `where`

Classification records carry no end-of-text; instruction records are prompt + response + eot_id.
Nothing is truncated here: the model's context length is known only at training time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from llmstages.errors import UserError
from llmstages.jsonio import read_json
from llmstages.store import MANIFEST, is_committed
from llmstages.tokenizer import Tokenizer

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> str:
    """uint16 holds ids below 65536; larger vocabularies need uint32."""
    return "uint16" if vocab_size <= 65536 else "uint32"


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
class ShardWriter:
    """Appends token arrays to `<split>-NNNNN.bin` files of at most `max_tokens` tokens each.

    `state()` after `flush()` says how far the files are written; `resume(state)` cuts the files
    back to that point and goes on appending there (a resumed prepare)."""

    def __init__(self, folder: Path, split: str, dtype: str, max_tokens: int):
        self.folder, self.split, self.max_tokens = folder, split, max_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[str] = []
        self.shard_tokens: list[int] = []
        self._file = None

    def flush(self) -> None:
        """Push what was written to the disk (the state recorded next must be on disk first)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def state(self) -> dict:
        return {"shards": list(self.shards), "shard_tokens": list(self.shard_tokens)}

    def resume(self, state: dict) -> None:
        """Continue from `state`: later shard files are deleted, the last one is cut back to its length."""
        self.close()
        self.shards, self.shard_tokens = list(state["shards"]), list(state["shard_tokens"])
        for stale in self.folder.glob(f"{self.split}-*.bin"):
            if stale.name not in self.shards:
                stale.unlink()
        if self.shards:
            self._file = open(self.folder / self.shards[-1], "r+b")  # noqa: SIM115 - closed in close()
            self._file.truncate(self.shard_tokens[-1] * self.dtype.itemsize)
            self._file.seek(0, os.SEEK_END)

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.shard_tokens[-1] >= self.max_tokens:
                self._next_shard()
            room = self.max_tokens - self.shard_tokens[-1]
            head, tokens = tokens[:room], tokens[room:]
            head.tofile(self._file)
            self.shard_tokens[-1] += len(head)

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in close() / the next shard
        self.shards.append(name)
        self.shard_tokens.append(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(self.shard_tokens)


def write_labeled_split(folder: Path, split: str, token_arrays: Sequence[np.ndarray], dtype: str,
                        rows: Sequence[dict], *, labels: Sequence[int] | None = None,
                        prompt_lens: Sequence[int] | None = None) -> dict:
    """Write one classify/instruct split; returns its `splits[split]` manifest entry (without class_counts)."""
    lengths = np.fromiter((len(a) for a in token_arrays), dtype=np.int64, count=len(token_arrays))
    offsets = np.zeros(len(token_arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    files = {"tokens": f"{split}.tokens.bin", "offsets": f"{split}.offsets.npy", "text": f"{split}.jsonl"}
    flat = np.concatenate(token_arrays) if token_arrays else np.zeros(0, dtype=np.uint32)
    flat.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tofile(folder / files["tokens"])
    np.save(folder / files["offsets"], offsets, allow_pickle=False)
    if labels is not None:
        files["labels"] = f"{split}.labels.npy"
        np.save(folder / files["labels"], np.asarray(labels, dtype=np.int64), allow_pickle=False)
    if prompt_lens is not None:
        files["prompt_lens"] = f"{split}.prompt_lens.npy"
        np.save(folder / files["prompt_lens"], np.asarray(prompt_lens, dtype=np.int64), allow_pickle=False)
    with open(folder / files["text"], "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"records": len(token_arrays), "tokens": int(offsets[-1]), "files": files}


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
@dataclass
class LabeledSplit:
    """One split of a classify / instruct dataset: record i is `tokens[offsets[i]:offsets[i+1]]`."""

    tokens: np.ndarray                  # memmap of the flat token ids
    offsets: np.ndarray                 # int64, len(self) + 1
    labels: np.ndarray | None           # int64 class index per record (classify)
    prompt_lens: np.ndarray | None      # int64 prompt tokens per record (instruct)
    text_path: Path

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records)")
        i %= len(self)
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def texts(self) -> list[dict]:
        with open(self.text_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def _memmap(path: Path, dtype: str) -> np.ndarray:
    """A read-only memmap; an empty file (mmap cannot map it) gives an empty array."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


SPLIT_FILES = {"pretrain": (), "classify": ("tokens", "offsets", "text", "labels"),
               "instruct": ("tokens", "offsets", "text", "prompt_lens")}


def manifest_problems(path: Path, m: dict) -> list[str]:
    """What in a dataset's manifest.json the readers could not use (empty = fine).

    Checks the fields the stages read and that every file a split names is a plain file name in this
    folder (a hand-edited `../x` must not make a reader open files elsewhere).
    """
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def is_file(name) -> bool:
        return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..") \
            and (path / name).is_file()

    task = m.get("task") if isinstance(m.get("task"), str) else repr(m.get("task"))
    problems = [] if task in SPLIT_FILES else [f"task: {task!r:.40} is not pretrain, classify or instruct"]
    for key in ("fingerprint", "tokenizer_fingerprint"):
        if not isinstance(m.get(key), str):
            problems.append(f"{key}: expected a string")
    if m.get("dtype") not in ("uint16", "uint32"):
        problems.append(f"dtype: {m.get('dtype')!r:.40} is not uint16 or uint32")
    if not is_int(m.get("eot_id")):
        problems.append("eot_id: expected a token id")
    if task == "classify" and not (isinstance(m.get("labels"), list) and all(isinstance(x, str) for x in m["labels"])):
        problems.append("labels: expected a list of class names")
    if task == "instruct" and not isinstance(m.get("template"), str):
        problems.append("template: expected a template name")
    splits = m.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        return problems + ["splits: expected an object with at least a train split"]
    for name, split in splits.items():
        if not isinstance(split, dict) or not is_int(split.get("tokens")):
            problems.append(f"splits.{name}: expected an object with a token count")
        elif task == "pretrain":
            shards = split.get("shards")
            if not isinstance(shards, list) or not all(is_file(f) for f in shards):
                problems.append(f"splits.{name}.shards: expected the names of shard files in this folder")
        elif task in SPLIT_FILES:
            files = split.get("files")
            needed = SPLIT_FILES[task]
            if not is_int(split.get("records")) or not isinstance(files, dict) \
                    or not all(is_file(files.get(k)) for k in needed):
                problems.append(f"splits.{name}: expected a record count and the files {', '.join(needed)}")
    return problems


class PreparedDataset:
    """A committed prepared dataset folder, read through its manifest.json."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        """Open a prepared dataset; refuses a folder without a valid MANIFEST (an interrupted write)."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: no such prepared dataset", hint="run `llmstages prepare RECIPE` first")
        if not is_committed(path):
            raise UserError(f"{path}: not a complete prepared dataset (no valid {MANIFEST}; an interrupted write?)",
                            hint="prepare it again with `llmstages prepare RECIPE --force`")
        manifest = read_json(path / "manifest.json", what="dataset manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: prepared with format_version {manifest.get('format_version')!r:.20}, "
                            f"this llmstages reads {FORMAT_VERSION}", hint="prepare it again with --force")
        if problems := manifest_problems(path, manifest):
            raise UserError(f"{path / 'manifest.json'}: corrupt dataset manifest:\n  " + "\n  ".join(problems[:10]),
                            hint="prepare it again with `llmstages prepare RECIPE --force`")
        return cls(path, manifest)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.path / "tokenizer.json")

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise UserError(f"{self.path}: no {split!r} split (has {', '.join(self.splits)})") from None

    def shards(self, split: str) -> list[np.ndarray]:
        """The token shards of a pretraining split, memory-mapped read-only, in order."""
        if self.task != "pretrain":
            raise UserError(f"{self.path}: a {self.task} dataset has records, not token shards (use .records())")
        return [_memmap(self.path / name, self.dtype) for name in self._split(split)["shards"]]

    def records(self, split: str) -> LabeledSplit:
        """The records of a classify / instruct split."""
        if self.task == "pretrain":
            raise UserError(f"{self.path}: a pretraining dataset has token shards, not records (use .shards())")
        files = self._split(split)["files"]
        try:
            load = lambda key: np.load(self.path / files[key], allow_pickle=False) if key in files else None  # noqa: E731
            return LabeledSplit(tokens=_memmap(self.path / files["tokens"], self.dtype), offsets=load("offsets"),
                                labels=load("labels"), prompt_lens=load("prompt_lens"),
                                text_path=self.path / files["text"])
        except (OSError, ValueError, EOFError) as err:  # a hand-edited or damaged .npy / .bin file
            raise UserError(f"{self.path}: corrupt {split} split ({err})",
                            hint="prepare it again with `llmstages prepare RECIPE --force`") from None

    def __repr__(self) -> str:
        return f"PreparedDataset({str(self.path)!r}, task={self.task!r})"
