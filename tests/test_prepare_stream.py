"""Streamed pretraining prepare (issue 19): same tokens as encoding each document whole, a seeded
document-level split, resume after a kill, hf: streaming with data.max_tokens, many shards."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from llmstages.config import build_recipe
from llmstages.data.encode import encode_many
from llmstages.data.plan import find_prepared
from llmstages.data.prepared import PreparedDataset
from llmstages.data.readers import gutenberg_body
from llmstages.data.split import DocumentSplit, SplitScan
from llmstages.data.windows import WindowSampler, fixed_windows
from llmstages.stages.prepare import prepare
from llmstages.store import Store
from llmstages.tokenizer import Tokenizer

WORDS = ("the a of and to in is was he she it they we you that with for on as at by from this had not but "
         "river mountain quiet 1984 3.14 naïve café — “quoted” don't it's (aside) e-mail").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def documents(seed: int, n: int, sentences: int = 12) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(sentence(rng, rng.randint(3, 14)) for _ in range(rng.randint(1, sentences))) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def recipe(**data):
    data.setdefault("vocab_size", 300)
    return build_recipe({"description": "t", "task": "pretrain", "run": "t", "data": data})


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


def segments(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eot)
    return [seg[:-1] for seg in np.split(tokens, ends + 1)[:-1]]


def flat(ds: PreparedDataset, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in ds.shards(split)])


# --- same tokens as encoding whole documents ---------------------------------------------------------
def test_streamed_tokens_equal_each_document_encoded_whole(tmp_path, store_dir):
    texts = documents(0, 60)
    texts[7] = " ".join(texts[:40]) * 30  # one document longer than an encoder piece (cut and joined back)
    source = write_jsonl(tmp_path / "d.jsonl", texts)
    ds = prepare(recipe(source=[str(source)], val_fraction=0.2, shard_tokens=2048, batch_chars=5000),
                 Store(store_dir), console=quiet())
    tok, eot = ds.tokenizer, ds.manifest["eot_id"]
    assert len(texts[7]) > (1 << 18)
    got = {split: segments(flat(ds, split), eot) for split in ("train", "val")}
    split = DocumentSplit(0.2, 0.0, 1234)
    sha = ds.manifest["sources"][0]["sha256"]
    expected = {"train": [], "val": []}
    for i, text in enumerate(texts):
        expected[split((sha, i, 0))].append(text)
    for name in ("train", "val"):
        assert len(got[name]) == len(expected[name]) == ds.manifest["splits"][name]["documents"]
        # the old path's encoder (pieces, batches) and a plain whole-text encode give the same ids
        for ids, old, text in zip(got[name], encode_many(tok, expected[name]), expected[name]):
            assert ids.tolist() == old.tolist() == tok.encode(text)


def test_real_books_give_the_ids_of_the_whole_books(data_file, store_dir, gpt2_tokenizer_dir):
    books = sorted(data_file("gutenberg").glob("*.txt"))[:3]
    ds = prepare(recipe(source=[str(b) for b in books], val_fraction=0, tokenizer=str(gpt2_tokenizer_dir)),
                 Store(store_dir), console=quiet())
    gpt2 = Tokenizer.from_file(gpt2_tokenizer_dir)
    expected = []
    for book in books:
        text = book.read_bytes().decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
        start, end = gutenberg_body(text)
        expected += gpt2.encode(text[start:end].strip("\n")) + [gpt2.eot_id]
    assert flat(ds, "train").tolist() == expected


def test_a_huge_txt_without_delimiters_is_read_in_bounded_documents(tmp_path):
    from llmstages.config import DataConfig
    from llmstages.data.readers import Record, read_txt

    lines = [sentence(random.Random(i), 12) for i in range(3000)]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n" + "x" * 5000 + "\n")  # and one line longer than the limit
    records = list(read_txt(path, "big.txt", DataConfig(max_document_chars=2048)))
    assert all(isinstance(r, Record) for r in records) and len(records) > 40
    texts = [r.fields["text"] for r in records]
    # each about the limit; a line is read in pieces of at most READ_BYTES, so one long line may add that
    assert all(len(t) < 2048 + 200 for t in texts[:-1]) and texts[-1].endswith("x" * 5000)
    assert "".join(texts).replace("\n", "") == "".join(lines) + "x" * 5000  # nothing lost, in order
    assert records[1].where == f"big.txt:{texts[0].count(chr(10)) + 2}"  # each names the line it starts on
    whole = list(read_txt(path, "big.txt", DataConfig()))
    assert len(whole) == 1 and whole[0].fields["text"] == "\n".join(lines) + "\n" + "x" * 5000


# --- the split ---------------------------------------------------------------------------------------
def test_split_is_deterministic_document_level_and_seeded(tmp_path, store_dir):
    texts = documents(1, 80)
    source = write_jsonl(tmp_path / "d.jsonl", texts)
    first = prepare(recipe(source=[str(source)], val_fraction=0.25), Store(store_dir), console=quiet())
    again = prepare(recipe(source=[str(source)], val_fraction=0.25), Store(tmp_path / "other"), console=quiet())
    reseeded = prepare(recipe(source=[str(source)], val_fraction=0.25, split_seed=99), Store(store_dir), console=quiet())

    def docs(ds, split):
        return [ds.tokenizer.decode(s.tolist()) for s in segments(flat(ds, split), ds.manifest["eot_id"])]

    for split in ("train", "val"):
        assert flat(first, split).tolist() == flat(again, split).tolist()
    # whole documents, each in exactly one split, in their original order
    order = {t: i for i, t in enumerate(texts)}
    train, val = docs(first, "train"), docs(first, "val")
    assert sorted(train + val) == sorted(texts) and not set(train) & set(val)
    assert [order[t] for t in val] == sorted(order[t] for t in val)
    assert 8 <= len(val) <= 32  # about a quarter
    assert set(docs(reseeded, "val")) != set(val)


def test_val_is_never_empty_the_smallest_train_draw_moves_there(tmp_path, store_dir):
    texts = documents(2, 25)
    source = write_jsonl(tmp_path / "d.jsonl", texts)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    # a seed for which no document draws val at 5%
    seed = next(s for s in range(1000) if all(DocumentSplit(0.05, 0, s)((sha, i, 0)) == "train" for i in range(25)))
    scan = SplitScan(DocumentSplit(0.05, 0, seed))
    for i in range(25):
        scan.add((sha, i, 0))
    [(moved_key, where)] = scan.moves().items()
    ds = prepare(recipe(source=[str(source)], val_fraction=0.05, split_seed=seed), Store(store_dir), console=quiet())
    assert ds.manifest["splits"]["val"]["documents"] == 1 and where == "val"
    [val] = segments(flat(ds, "val"), ds.manifest["eot_id"])
    assert ds.tokenizer.decode(val.tolist()) == texts[moved_key[1]]


def test_split_scan_refuses_too_few_documents():
    scan = SplitScan(DocumentSplit(0.5, 0.4, 0))
    scan.add(("x", 0, 0))
    with pytest.raises(Exception, match="too few documents to split"):
        scan.moves()


# --- resume after a kill -----------------------------------------------------------------------------
KILL_AFTER_FIRST_SHARD = """
import os, sys
from pathlib import Path
from llmstages.config import build_recipe
from llmstages.stages import prepare_text
from llmstages.stages.prepare import prepare
from llmstages.store import Store
save = prepare_text.ShardSet.save_if_shard_done
def save_then_die(self, position):
    before = self.saved_shards
    save(self, position)
    if self.saved_shards != before:
        os._exit(3)  # like kill -9 right after the first finished shard was recorded
prepare_text.ShardSet.save_if_shard_done = save_then_die
recipe = build_recipe({"description": "t", "task": "pretrain", "run": "t", "data": %r})
prepare(recipe, Store(sys.argv[1]))
"""


@pytest.mark.parametrize("long_first", [False, True], ids=["short documents", "killed inside a long document"])
def test_a_prepare_killed_after_its_first_shard_resumes_to_the_same_bytes(tmp_path, long_first):
    texts = documents(3, 120)
    if long_first:
        texts.insert(0, " ".join(texts) * 12)  # > one encoder piece: the kill falls inside it
    source = write_jsonl(tmp_path / "d.jsonl", texts)
    data = {"source": [str(source)], "vocab_size": 300, "val_fraction": 0.1, "shard_tokens": 1024,
            "batch_chars": 3000}
    killed = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_SHARD % data, str(killed)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
    assert run.returncode == 3, run.stderr
    r = recipe(**data)
    # nothing half-written is visible: no dataset, only the hidden working folder with its progress record
    assert find_prepared(r, Store(killed)) is None
    [work] = (killed / "data").iterdir()
    assert work.name.startswith(".partial-") and (work / "progress.json").exists()
    progress = json.loads((work / "progress.json").read_text())
    assert 1 <= sum(len(w["shards"]) for w in progress["writers"].values())
    if long_first:
        assert progress["position"]["record"] == 0 and not progress["position"]["done"]

    out = StringIO()
    resumed = prepare(r, Store(killed), console=Console(file=out, width=200))
    assert "resuming" in out.getvalue() and "peak memory" in out.getvalue()  # the summary says it
    whole = prepare(r, Store(tmp_path / "whole"), console=quiet())
    assert resumed.path.name == whole.path.name and not work.exists()
    names = sorted(p.name for p in whole.path.iterdir())
    assert names == sorted(p.name for p in resumed.path.iterdir()) and len(names) > 6
    for name in names:
        if name not in ("manifest.json", "MANIFEST"):
            assert (resumed.path / name).read_bytes() == (whole.path / name).read_bytes(), name
    timing = lambda m: ({k: v for k, v in m.items() if k not in ("created", "stats", "tokenizer")},  # noqa: E731
                        {k: v for k, v in m["stats"].items() if "seconds" not in k and k != "tokens_per_s"},
                        {k: v for k, v in m["tokenizer"].items() if k != "seconds"})
    assert timing(resumed.manifest) == timing(whole.manifest)


# --- hf: streaming -------------------------------------------------------------------------------------
def test_streamed_hf_parquet_respects_max_tokens(tmp_path, store_dir, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = documents(4, 150)
    for i in range(3):  # three parquet shards, read in streaming mode
        pq.write_table(pa.table({"text": texts[i * 50:(i + 1) * 50]}), folder / f"part-{i}.parquet")
    base = {"source": [f"hf:{folder}"], "streaming": True, "val_fraction": 0.1, "tokenizer_sample_bytes": 20_000}
    full = prepare(recipe(**base), Store(store_dir), console=quiet())
    budget = full.manifest["stats"]["tokens"] // 2 + 17
    cut = prepare(recipe(**base, max_tokens=budget), Store(store_dir), console=quiet())
    assert full.manifest["sources"][0] == {"hf": f"hf:{folder}", "streamed": True, "role": "train"}
    assert full.manifest["stats"]["documents"] == 150 and not full.manifest["stopped_at_max_tokens"]
    assert cut.manifest["stats"]["tokens"] == budget and cut.manifest["stopped_at_max_tokens"]
    assert sum(len(s) for split in cut.splits for s in cut.shards(split)) == budget
    assert cut.path != full.path and cut.manifest["tokenizer_fingerprint"] == full.manifest["tokenizer_fingerprint"]
    for split in ("train", "val"):  # the first tokens of the same stream
        head = flat(cut, split)
        assert 0 < len(head) and flat(full, split)[:len(head)].tolist() == head.tolist()


def test_streaming_is_refused_for_fine_tuning_data(tmp_path, store_dir):
    from llmstages.errors import UserError

    source = write_jsonl(tmp_path / "d.jsonl", ["a"])
    r = build_recipe({"description": "t", "task": "classify", "run": "t",
                      "data": {"source": [str(source)], "streaming": True}})
    with pytest.raises(UserError, match="for pretraining text"):
        prepare(r, Store(store_dir), console=quiet())


# --- many shards -----------------------------------------------------------------------------------------
def test_many_shards_are_sampled_through_memory_maps(tmp_path, store_dir):
    source = write_jsonl(tmp_path / "d.jsonl", documents(5, 400))
    ds = prepare(recipe(source=[str(source)], shard_tokens=1024, val_fraction=0.2), Store(store_dir), console=quiet())
    shards = ds.shards("train")
    assert len(shards) >= 20 and all(isinstance(s, np.memmap) for s in shards)
    sampler = WindowSampler(shards, block_size=64, batch_size=16, seed=0)
    batch = sampler(3)
    assert batch["input_ids"].shape == (16, 64)
    # every row is a real window of one shard, targets shifted by one
    assert (batch["input_ids"][:, 1:] == batch["targets"][:, :-1]).all()
    texts = [np.asarray(s).tobytes() for s in shards]
    for row in batch["input_ids"]:
        needle = row.numpy().astype(shards[0].dtype).tobytes()
        assert any(needle in t for t in texts)
    val = fixed_windows(ds.shards("val"), block_size=64, batch_size=8, n_batches=3)
    assert len(val) == 3 and all(b["input_ids"].shape == (8, 64) for b in val)


def test_a_dataset_prepared_before_streaming_still_opens(tmp_path, store_dir):
    """The shard format did not change (format_version 1): a dataset made by the old prepare, whose
    manifest lacks the new keys, opens and reads; only its fingerprint no longer matches a recipe."""
    from llmstages.data.prepared import FORMAT_VERSION
    from llmstages.store import write_manifest

    source = write_jsonl(tmp_path / "d.jsonl", documents(6, 40))
    ds = prepare(recipe(source=[str(source)], val_fraction=0.1), Store(store_dir), console=quiet())
    manifest = ds.manifest
    for key in ("stopped_at_max_tokens",):
        manifest.pop(key)
    manifest["split"] = {"seed": 1234, "carved": {"val": 0.1}}
    manifest["settings"] = {k: v for k, v in manifest["settings"].items()
                            if k not in ("streaming", "max_tokens", "max_document_chars", "batch_chars")}
    (ds.path / "manifest.json").write_text(json.dumps(manifest))
    write_manifest(ds.path)
    old = PreparedDataset.open(ds.path)
    assert FORMAT_VERSION == 1 and old.manifest["format_version"] == 1
    assert flat(old, "train").tolist() == flat(ds, "train").tolist()


def test_tokenizer_sample_is_bounded_seeded_and_in_reading_order():
    from llmstages.data.encode import TRAIN_PIECE_CHARS, TokenizerSample

    texts = documents(7, 400)

    def draw(seed):
        sample = TokenizerSample(5_000, seed)
        for i, text in enumerate(texts):
            sample.add(text, i)
        return sample

    a, b, c = draw(1), draw(1), draw(2)
    assert a.pieces() == b.pieces() != c.pieces()
    assert 5_000 <= a.size < 5_000 + TRAIN_PIECE_CHARS and a.seen == sum(map(len, texts)) > 15 * a.size
    assert len(a.heap) < 60  # it never held the corpus: only the pieces it keeps
    where = [texts.index(p) for p in a.pieces()]
    assert where == sorted(where)  # in the order they were read
    a.drop([where[0]])
    assert texts[where[0]] not in a.pieces()


def test_a_stream_that_cannot_be_opened_is_a_clear_error_and_leaves_nothing(tmp_path, store_dir, monkeypatch):
    from llmstages.errors import UserError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = recipe(source=["hf:nobody/nothing-here"], streaming=True, tokenizer_sample_bytes=1000)
    with pytest.raises(UserError, match="hf:nobody/nothing-here: cannot stream the dataset"):
        prepare(r, Store(store_dir), console=quiet())
    assert not any((store_dir / "data").iterdir())
