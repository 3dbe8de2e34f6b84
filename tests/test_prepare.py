"""The prepare stage: on-disk output (pretrain shards, classify / instruct records), reuse, splits, exactness."""

from __future__ import annotations

import json
import random
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from llmstages.config import build_recipe
from llmstages.data.encode import _SAFE_CUT, cut_text, encode_many
from llmstages.data.plan import find_prepared
from llmstages.data.prepared import PreparedDataset, ShardWriter, token_dtype
from llmstages.errors import UserError
from llmstages.stages.prepare import prepare
from llmstages.store import MANIFEST, Store
from llmstages.templates import format_prompt
from llmstages.tokenizer import Tokenizer, train_bpe

WORDS = ("the a of and to in was he she it that his her with as had for you not be but at on said all "
         "naïve café — “quoted” 😀 don't it's we'll 1984 3.14 (aside) [note] e-mail well-known").split()


def sentence(rng: random.Random, n: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    return text[0].upper() + text[1:] + rng.choice([".", "!", "?", "..."])


def document(rng: random.Random) -> str:
    paragraphs = [" ".join(sentence(rng, rng.randint(3, 15)) for _ in range(rng.randint(1, 4)))
                  for _ in range(rng.randint(1, 5))]
    return rng.choice(["\n\n", "\n", "\n  \n\t"]).join(paragraphs)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(task: str = "pretrain", *, init_from: str | None = None, finetune: dict | None = None, **data):
    data.setdefault("vocab_size", 300)
    raw = {"task": task, "data": data, "finetune": finetune or {}}
    if init_from:
        raw["init_from"] = init_from
    return build_recipe(raw, stem="t")


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


def run(r, store_dir: Path, **kw) -> PreparedDataset:
    return prepare(r, Store(store_dir), console=quiet(), **kw)


def segments(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    """Split a flat token stream on end-of-text (which ends every document)."""
    ends = np.flatnonzero(tokens == eot)
    assert len(ends) and ends[-1] == len(tokens) - 1
    return [seg[:-1] for seg in np.split(tokens, ends + 1)[:-1]]


# --- pretrain ---------------------------------------------------------------------------------------
def test_pretrain_shards_decode_back_to_the_documents_exactly(tmp_path, store_dir):
    rng = random.Random(0)
    docs = [document(rng) for _ in range(40)]
    source = write_jsonl(tmp_path / "docs.jsonl", [{"body": d} for d in docs])
    ds = run(recipe(source=[str(source)], text_field="body", val_fraction=0.1, split_seed=7), store_dir)

    m = ds.manifest
    assert ds.path.parent == store_dir / "data" and ds.path.name == f"t-{m['fingerprint'][:12]}"
    assert (ds.path / MANIFEST).exists() and (ds.path / "tokenizer.json").exists()
    assert m["format_version"] == 1 and m["task"] == "pretrain" and m["dtype"] == "uint16"
    assert m["vocab_size"] == ds.tokenizer.vocab_size and m["eot_id"] == ds.tokenizer.eot_id
    assert m["tokenizer_fingerprint"] == ds.tokenizer.fingerprint
    assert m["sources"][0]["bytes"] == source.stat().st_size and len(m["sources"][0]["sha256"]) == 64
    assert m["bad_records"] == {"count": 0, "examples": []} and m["pseudo_documents"] is None
    assert set(m["stats"]) >= {"documents", "tokens", "bytes_per_token", "seconds", "tokens_per_s"}
    # The split is by a seeded hash per document: about 10% in val, never none (see test_prepare_stream.py).
    assert 1 <= m["splits"]["val"]["documents"] <= 10 and m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 40

    decoded = {}
    for split in ("train", "val"):
        info = m["splits"][split]
        shards = ds.shards(split)
        assert isinstance(shards[0], np.memmap) and shards[0].dtype == np.uint16
        assert [len(s) for s in shards] == info["shard_tokens"] and sum(info["shard_tokens"]) == info["tokens"]
        decoded[split] = [ds.tokenizer.decode(seg.tolist()) for seg in segments(np.concatenate(shards), m["eot_id"])]
        assert len(decoded[split]) == info["documents"]
        assert info["bytes"] == sum(len(t.encode()) for t in decoded[split])
    # Every document comes back exactly, in one split, and each split keeps the documents' order.
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    order = {d: i for i, d in enumerate(docs)}
    for split in ("train", "val"):
        assert [order[d] for d in decoded[split]] == sorted(order[d] for d in decoded[split])
    val_text_tokens = m["splits"]["val"]["tokens"] - m["splits"]["val"]["documents"]
    assert m["stats"]["bytes_per_token"] == pytest.approx(m["splits"]["val"]["bytes"] / val_text_tokens, rel=1e-3)


def test_documents_span_shards_of_bounded_size(tmp_path, store_dir):
    rng = random.Random(1)
    docs = [document(rng) for _ in range(30)]
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    ds = run(recipe(source=[str(source)], val_fraction=0.0, shard_tokens=1024), store_dir)
    info = ds.manifest["splits"]["train"]
    assert set(ds.manifest["splits"]) == {"train"}
    assert len(info["shards"]) > 2 and all(n == 1024 for n in info["shard_tokens"][:-1])
    assert info["shards"][:2] == ["train-00000.bin", "train-00001.bin"]
    flat = np.concatenate(ds.shards("train"))
    assert [ds.tokenizer.decode(s.tolist()) for s in segments(flat, ds.manifest["eot_id"])] == docs


def test_same_input_reuses_changed_input_or_settings_make_a_new_one(tmp_path, store_dir):
    source = tmp_path / "a.txt"
    source.write_text("One document.\n" * 50)
    (tmp_path / "b.txt").write_text("Another document.\n" * 50)
    r = recipe(source=[str(tmp_path / "*.txt")], val_fraction=0.5)
    assert find_prepared(r, Store(store_dir)) is None
    first = run(r, store_dir)
    console = quiet()
    again = prepare(r, Store(store_dir), console=console)
    assert again.path == first.path and "up to date" in console.file.getvalue()
    assert find_prepared(r, Store(store_dir)).path == first.path
    (first.path / "left-by-the-first-build").write_text("x")  # a forced rebuild replaces the whole folder
    console = quiet()
    forced = prepare(r, Store(store_dir), console=console, force=True)
    assert forced.path == first.path  # the fingerprint only depends on input + settings: same name
    assert "up to date" not in console.file.getvalue()
    assert not (first.path / "left-by-the-first-build").exists()
    assert forced.manifest["fingerprint"] == first.manifest["fingerprint"]
    assert np.array_equal(np.concatenate(forced.shards("train")), np.concatenate(first.shards("train")))
    other = run(recipe(source=[str(tmp_path / "*.txt")], val_fraction=0.5, vocab_size=280), store_dir)
    assert other.path != first.path
    source.write_text("One changed document.\n" * 50)
    changed = run(r, store_dir)
    assert changed.path not in (first.path, other.path)
    assert sorted(p.name for p in (store_dir / "data").iterdir()) == sorted(
        p.name for p in (first.path, other.path, changed.path))


def test_single_text_file_is_cut_into_pseudo_documents_for_val(tmp_path, store_dir):
    rng = random.Random(2)
    text = "\n".join(sentence(rng, 8) for _ in range(400))
    (tmp_path / "one.txt").write_text(text)
    ds = run(recipe(source=[str(tmp_path / "one.txt")], val_fraction=0.1), store_dir)
    pseudo = ds.manifest["pseudo_documents"]
    assert pseudo["documents"] == 1 and pseudo["pieces"] >= 40 and "pseudo-documents" in pseudo["reason"]
    pieces = []
    for split in ("train", "val"):
        flat = np.concatenate(ds.shards(split))
        pieces += [ds.tokenizer.decode(s.tolist()) for s in segments(flat, ds.manifest["eot_id"])]
        assert ds.manifest["splits"][split]["documents"] > 0
    assert all(p in text for p in pieces) and sum(map(len, pieces)) == len(text)
    assert ds.manifest["splits"]["val"]["documents"] == pytest.approx(0.1 * pseudo["pieces"], abs=1)


def test_val_source_is_used_instead_of_carving(tmp_path, store_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"train doc {i}"} for i in range(5)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out doc"}])
    ds = run(recipe(source=[str(train)], val_source=[str(val)], val_fraction=0.2), store_dir)
    assert ds.manifest["splits"]["train"]["documents"] == 5 and ds.manifest["splits"]["val"]["documents"] == 1
    assert [s["role"] for s in ds.manifest["sources"]] == ["train", "val"]


def test_tokenizer_is_trained_on_a_bounded_sample_of_train(tmp_path, store_dir):
    rng = random.Random(3)
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": document(rng)} for _ in range(300)])
    ds = run(recipe(source=[str(source)], tokenizer="train", tokenizer_sample_bytes=20_000), store_dir)
    info = ds.manifest["tokenizer"]
    assert info["kind"] == "trained" and info["sampled"] is True
    assert 20_000 <= info["trained_on_chars"] < 20_000 + (1 << 16)


@pytest.mark.parametrize("task", ["pretrain", "classify"])
def test_lowercase_trains_a_lowercasing_tokenizer(tmp_path, store_dir, task):
    rng = random.Random(4)
    rows = [{"text": document(rng).upper() if i % 2 else document(rng), "label": "ab"[i % 2]} for i in range(40)]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = run(recipe(task, source=[str(source)], tokenizer="train", lowercase=True), store_dir)
    assert ds.tokenizer.lowercases and ds.tokenizer.encode("The END") == ds.tokenizer.encode("the end")


def test_gpt2_tokenizer_file_gives_gpt2_ids(tmp_path, store_dir, gpt2_tokenizer_dir):
    docs = ["Hello world, it's a test.", "Second   document\twith\nodd   spacing 123."]
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    ds = run(recipe(source=[str(source)], tokenizer=str(gpt2_tokenizer_dir), val_fraction=0), store_dir)
    gpt2 = Tokenizer.from_file(gpt2_tokenizer_dir)
    assert ds.manifest["eot_id"] == 50256 and ds.manifest["dtype"] == "uint16"
    assert ds.manifest["tokenizer_fingerprint"] == gpt2.fingerprint
    expected = [t for d in docs for t in gpt2.encode(d) + [50256]]
    assert np.concatenate(ds.shards("train")).tolist() == expected


def test_dtype_and_little_endian_shards(tmp_path):
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    writer = ShardWriter(tmp_path, "train", "uint32", max_tokens=1024)
    writer.write(np.array([1, 70000, 2**31], dtype=np.uint32))
    writer.close()
    assert (tmp_path / "train-00000.bin").read_bytes() == b"\x01\x00\x00\x00\x70\x11\x01\x00\x00\x00\x00\x80"


# --- exact encoding in pieces ------------------------------------------------------------------------
def _nasty_text(rng: random.Random, n: int) -> str:
    alphabet = ["a", "b", "Z", "é", "ß", "1", "7", " ", " ", "  ", "\n", "\n\n", " \n", "\t", "'s", "'ll", ".",
                ",", "—", "“", "”", "😀", "<|endoftext|>", "\r", "\u00a0", "x" * 30]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_encoding_in_pieces_equals_encoding_whole(which, request):
    rng = random.Random(4)
    if which == "gpt2":
        tokenizer = Tokenizer.from_file(request.getfixturevalue("gpt2_tokenizer_dir"))
    else:
        tokenizer = train_bpe([_nasty_text(rng, 3000) for _ in range(20)], 400)
    # Every safe cut point, in text full of whitespace runs, contractions, specials and non-ASCII.
    checked = 0
    for _ in range(150):
        text = _nasty_text(rng, rng.randint(50, 400))
        whole = tokenizer.encode(text)
        for match in list(_SAFE_CUT.finditer(text))[:10]:
            cut = match.start()
            assert tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:]) == whole, (text, cut)
            checked += 1
    assert checked > 300
    # cut_text on prose cuts only at safe points: many pieces, same ids.
    for _ in range(20):
        text = document(rng) + "\n" + document(rng)
        pieces = cut_text(text, rng.randint(10, 60))
        assert "".join(pieces) == text and len(pieces) >= 2
        assert [t for p in pieces for t in tokenizer.encode(p)] == tokenizer.encode(text)
    big = "\n".join(_nasty_text(rng, 200) for _ in range(1000))  # > PIECE_CHARS: cut inside encode_many
    [ids] = encode_many(tokenizer, [big], batch_chars=100_000)
    assert ids.tolist() == tokenizer.encode(big)


def test_a_long_run_without_cut_points_is_cut_hard_and_still_round_trips():
    tokenizer = train_bpe(["abc " * 100], 270)
    text = "x" * 1000 + " tail"
    pieces = cut_text(text, 100)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 200
    ids = np.concatenate(encode_many(tokenizer, [text]))
    assert tokenizer.decode(ids.tolist()) == text


def test_encoding_a_real_book_in_pieces_is_exact(data_file):
    tokenizer = Tokenizer.from_file(data_file("gpt2-tokenizer"))
    text = data_file("gutenberg/pg11_alice_in_wonderland.txt").read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    pieces = cut_text(text, 2000)
    assert len(pieces) > 50
    whole = tokenizer.encode(text)
    assert [t for ids in encode_many(tokenizer, pieces, cut=False) for t in ids.tolist()] == whole


# --- classify -----------------------------------------------------------------------------------------
def test_classify_records_labels_and_stratified_split(tmp_path, store_dir):
    rng = random.Random(5)
    rows = [{"msg": sentence(rng, rng.randint(2, 12)), "cls": "spam" if i % 5 == 0 else "ham"} for i in range(200)]
    rows += [{"msg": "Exact duplicate", "cls": "ham"}] * 6
    source = write_jsonl(tmp_path / "sms.jsonl", rows)
    ds = run(recipe("classify", source=[str(source)], text_field="msg", label_field="cls", labels=["ham", "spam"],
                    val_fraction=0.1, test_fraction=0.2), store_dir)
    m = ds.manifest
    assert m["labels"] == ["ham", "spam"] and set(m["splits"]) == {"train", "val", "test"}
    counts = {split: m["splits"][split]["class_counts"] for split in m["splits"]}
    assert counts["val"]["spam"] == 4 and counts["test"]["spam"] == 8  # 10% / 20% of the 40 spam
    assert sum(c["ham"] for c in counts.values()) == 166 and sum(c["spam"] for c in counts.values()) == 40
    seen_duplicate = []
    for split in m["splits"]:
        rec = ds.records(split)
        texts = rec.texts()
        assert len(rec) == m["splits"][split]["records"] == len(texts) == len(rec.labels)
        assert rec.offsets.dtype == np.int64 and rec.offsets[0] == 0 and rec.offsets[-1] == len(rec.tokens)
        assert rec.labels.dtype == np.int64 and rec.prompt_lens is None
        for i in range(len(rec)):
            assert ds.tokenizer.decode(rec.example(i).tolist()) == texts[i]["text"]  # no end-of-text appended
            assert m["labels"][rec.labels[i]] == texts[i]["label"]
            assert texts[i]["where"].startswith(f"{source}:")
        seen_duplicate.append(sum(t["text"] == "Exact duplicate" for t in texts))
    assert sorted(seen_duplicate) == [0, 0, 6]  # exact duplicates never straddle splits


def test_classify_labels_default_to_the_sorted_training_labels(tmp_path, store_dir):
    rows = [{"text": f"message {i}", "label": ["b", "a", "c"][i % 3]} for i in range(30)]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = run(recipe("classify", source=[str(source)], val_fraction=0.2), store_dir)
    assert ds.manifest["labels"] == ["a", "b", "c"] and "test" not in ds.manifest["splits"]


def test_real_sms_collection_with_gpt2_tokenizer(data_file, store_dir):
    r = recipe("classify", source=[str(data_file("sms_spam/SMSSpamCollection.tsv"))], columns=["label", "text"],
               labels=["ham", "spam"], tokenizer=str(data_file("gpt2-tokenizer")), val_fraction=0.1,
               test_fraction=0.15)
    m = run(r, store_dir).manifest
    assert sum(s["records"] for s in m["splits"].values()) == 4738
    assert sum(s["class_counts"]["spam"] for s in m["splits"].values()) == 635
    # Stratified: each class gives round(fraction * its records) to test, then to val (groups are single
    # records here: the collection's exact duplicates are one record each after deduplication).
    for label, total in (("ham", 4738 - 635), ("spam", 635)):
        assert m["splits"]["test"]["class_counts"][label] == round(0.15 * total)
        assert m["splits"]["val"]["class_counts"][label] == round(0.1 * total)


# --- instruct -----------------------------------------------------------------------------------------
def test_instruct_tokens_are_prompt_response_eot_with_prompt_lens(tmp_path, store_dir):
    rows = [{"instruction": f"Say {i}", "input": "" if i % 2 else f"context {i}", "output": f"The answer is {i}."}
            for i in range(20)]
    rows.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                              {"role": "assistant", "content": "Hello."}]})
    source = write_jsonl(tmp_path / "inst.jsonl", rows)
    ds = run(recipe("instruct", source=[str(source)], val_fraction=0.1, finetune={"template": "alpaca"}), store_dir)
    m = ds.manifest
    assert m["template"] == "alpaca" and m["task"] == "instruct"
    eot = m["eot_id"]
    total = 0
    for split in m["splits"]:
        rec = ds.records(split)
        assert rec.labels is None and rec.prompt_lens.dtype == np.int64
        for i, row in enumerate(rec.texts()):
            tokens = rec.example(i).tolist()
            plen = rec.prompt_lens[i]
            assert tokens[-1] == eot and eot not in tokens[:-1]
            assert ds.tokenizer.decode(tokens[:plen]) == row["prompt"]
            assert ds.tokenizer.decode(tokens[plen:-1]) == row["response"]
            if "messages" not in row:
                assert row["prompt"] == format_prompt("alpaca", row["instruction"], row["input"])
                assert row["response"] == row["output"]
            else:
                assert row["response"] == "Hello." and row["prompt"].endswith("### Response:\n")
            total += 1
    assert total == 21


def test_template_is_part_of_the_fingerprint(tmp_path, store_dir):
    source = write_jsonl(tmp_path / "i.jsonl", [{"instruction": f"do {i}", "output": "ok"} for i in range(10)])
    a = run(recipe("instruct", source=[str(source)], finetune={"template": "alpaca"}), store_dir)
    b = run(recipe("instruct", source=[str(source)], finetune={"template": "chat"}), store_dir)
    assert a.path != b.path and b.records("train").texts()[0]["prompt"].startswith("<|user|>")


def test_real_instruction_data(data_file, store_dir):
    r = recipe("instruct", source=[str(data_file("instruction-data.json"))],
               tokenizer=str(data_file("gpt2-tokenizer")), val_fraction=0.05, test_fraction=0.1)
    m = run(r, store_dir).manifest
    assert sum(s["records"] for s in m["splits"].values()) == 990
    assert m["splits"]["test"]["records"] == pytest.approx(99, abs=3)


# --- tokenizer of the parent model, reading, errors -----------------------------------------------------
def test_fine_tuning_data_from_a_missing_run_names_the_command(tmp_path, store_dir):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(UserError) as err:
        run(recipe("classify", init_from="quickstart", source=[str(source)]), store_dir)
    assert "no trained model to fine-tune from yet" in err.value.message and "llmstages pretrain quickstart" in err.value.hint


def test_open_refuses_a_folder_without_manifest(tmp_path):
    folder = tmp_path / "half-written"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="not a complete prepared dataset"):
        PreparedDataset.open(folder)


def test_records_and_shards_refuse_the_wrong_task(tmp_path, store_dir):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(4)])
    ds = run(recipe(source=[str(source)], val_fraction=0), store_dir)
    with pytest.raises(UserError, match="token shards, not records"):
        ds.records("train")
    with pytest.raises(UserError, match="no 'val' split"):
        ds.shards("val")


def test_the_tokenizer_s_location_is_not_part_of_the_fingerprint(tmp_path, store_dir):
    rng = random.Random(6)
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": document(rng)} for _ in range(20)])
    tokenizer = train_bpe([document(rng) for _ in range(50)], 300)
    for place in ("a", "b"):
        (tmp_path / place).mkdir()
        tokenizer.save(tmp_path / place / "tokenizer.json")
    first = run(recipe(source=[str(source)], tokenizer=str(tmp_path / "a")), store_dir)
    second = run(recipe(source=[str(source)], tokenizer=str(tmp_path / "b" / "tokenizer.json")), store_dir)
    assert first.path == second.path and first.manifest["tokenizer"]["kind"] == "file"


def test_an_uncommitted_folder_in_the_way_is_replaced(tmp_path, store_dir):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    r = recipe(source=[str(source)])
    first = run(r, store_dir)
    (first.path / MANIFEST).unlink()  # a damaged dataset: no longer exists for readers
    assert find_prepared(r, Store(store_dir)) is None
    again = run(r, store_dir)
    assert again.path == first.path and (again.path / MANIFEST).exists()


def test_progress_is_shown_on_a_terminal(tmp_path, store_dir):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i}"} for i in range(10)])
    out = StringIO()
    prepare(recipe(source=[str(source)]), Store(store_dir), console=Console(file=out, force_terminal=True, width=150))
    shown = out.getvalue()
    assert "reading" in shown and "tokenizing train" in shown and "documents" in shown
    assert "bytes/token" in shown and "tokens/s" in shown  # the summary table
