"""Readers: every format -> records with the right `file:line`, and bad content reported, never raised."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmstages.config import DataConfig
from llmstages.data.readers import BadRecord, Record, detect_format, gutenberg_body, read_records
from llmstages.errors import UserError


def read(path: Path, fmt: str | None = None, **settings) -> list[Record | BadRecord]:
    cfg = DataConfig(**settings)
    return list(read_records(path, path.name, fmt or detect_format(path), cfg))


def texts(items: list) -> list[str]:
    return [r.fields["text"] for r in items if isinstance(r, Record)]


def bad(items: list) -> list[str]:
    return [str(r) for r in items if isinstance(r, BadRecord)]


# --- .txt ------------------------------------------------------------------------------------------
GUTENBERG = (
    "\ufeffThe Project Gutenberg eBook of Tests\r\n"
    "Licence blah\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK TESTS ***\r\n"
    "\r\n"
    "\r\n"
    "CHAPTER I\r\n"
    "It was a “dark” night.\r\n"
    "\r\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK TESTS ***\r\n"
    "More licence\r\n"
)


def test_gutenberg_header_footer_bom_and_crlf_are_removed(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(GUTENBERG.encode("utf-8"))
    [record] = read(path)
    assert record.fields["text"] == "CHAPTER I\nIt was a “dark” night."
    assert record.where == "book.txt:6"  # the line of the first text line in the file


def test_gutenberg_marker_without_space_and_without_end(tmp_path):
    path = tmp_path / "old.txt"
    path.write_text("header\n***START OF THE PROJECT GUTENBERG EBOOK X***\nbody line\n")
    assert texts(read(path)) == ["body line"]


def test_gutenberg_stripping_can_be_turned_off(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(GUTENBERG.encode("utf-8"))
    [text] = texts(read(path, strip_gutenberg=False))
    assert text.startswith("The Project Gutenberg eBook") and "\r" not in text and "\ufeff" not in text


def test_gutenberg_markers_found_in_every_real_book(data_file):
    folder = data_file("gutenberg")
    books = sorted(folder.glob("*.txt"))
    assert len(books) == 48
    for book in books:
        text = book.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        start, end = gutenberg_body(text)
        assert 0 < start < end < len(text), book.name
        body = text[start:end].upper()
        assert "*** START OF" not in body and "FULL LICENSE" not in body and "GUTENBERG-TM" not in body, book.name
        assert text[end:].startswith("***") and "PROJECT GUTENBERG" in text[end:].upper(), book.name


def test_delimiter_splits_documents_with_their_line_numbers(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\nFirst story.\nSecond line.\n<|endoftext|>\nSecond story.\n  <|endoftext|>  \n\n<|endoftext|>\n")
    items = read(path, delimiter="<|endoftext|>")
    assert [(r.where, r.fields["text"]) for r in items] == [
        ("stories.txt:2", "First story.\nSecond line."), ("stories.txt:5", "Second story.")]


def test_tinystories_sample(data_file):
    items = read(data_file("tinystories/tinystories_sample.txt"), delimiter="<|endoftext|>")
    assert len(items) == 5 and all(isinstance(r, Record) for r in items)
    assert [r.where.rsplit(":", 1)[1] for r in items] == ["2", "8", "12", "17", "22"]
    assert all(t.startswith(("Once upon a time", "One day")) and "<|endoftext|>" not in t for t in texts(items))


def test_text_field_name_is_used_for_txt(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    assert read(path, text_field="body")[0].fields == {"body": "hello"}


def test_empty_and_blank_txt_files_are_bad(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    assert bad(read(tmp_path / "empty.txt")) == ["empty.txt:1: empty file"]
    assert bad(read(tmp_path / "blank.txt")) == ["blank.txt:1: empty file"]


def test_non_utf8_txt_reports_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two\ncaf\xe9 au lait\n".encode("latin-1"))
    assert bad(read(path)) == ["latin1.txt:3: invalid UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"]


def test_non_utf8_only_spoils_its_own_document(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"good one\n---\nbad \xff here\n---\ngood two\n")
    items = read(path, delimiter="---")
    assert texts(items) == ["good one", "good two"]
    assert bad(items) == ["mixed.txt:3: invalid UTF-8 (byte 0xff at column 5); save the file as UTF-8"]


# --- .jsonl / .json --------------------------------------------------------------------------------
def test_jsonl_records_and_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n{"text": "b"}\r\n{broken\n[1, 2]\n{"text": "\xff"}\n')
    items = read(path)
    assert [(r.where, r.fields) for r in items if isinstance(r, Record)] == [
        ("d.jsonl:1", {"text": "a"}), ("d.jsonl:3", {"text": "b"})]
    problems = bad(items)
    assert re.fullmatch(r"d\.jsonl:4: invalid JSON \(.+ at column 2\)", problems.pop(0))  # words: CPython's
    assert problems == [
        "d.jsonl:5: expected a JSON object, got an array",
        "d.jsonl:6: invalid UTF-8 (byte 0xff at byte 11 of the line); save the file as UTF-8",
    ]


def test_empty_jsonl_is_bad(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    assert bad(read(tmp_path / "e.jsonl")) == ["e.jsonl:1: empty file"]


def test_json_array_records_carry_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    data = [{"instruction": "one", "input": "", "output": "1"}, {"instruction": "two", "input": "x", "output": "2"}]
    path.write_text(json.dumps(data, indent=4))
    items = read(path)
    assert [r.where for r in items] == ["d.json:2", "d.json:7"]
    assert [r.fields for r in items] == data


def test_json_syntax_error_reports_its_line_and_keeps_earlier_records(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,,},\n  {"a": 3}\n]')
    items = read(path)
    assert [r.fields for r in items if isinstance(r, Record)] == [{"a": 1}]
    assert bad(items)[0].startswith("d.json:3: invalid JSON (Expecting property name")


def test_json_single_object_and_wrong_top_level(tmp_path):
    (tmp_path / "one.json").write_text('{"text": "only"}')
    (tmp_path / "num.json").write_text("42")
    assert read(tmp_path / "one.json")[0].fields == {"text": "only"}
    assert bad(read(tmp_path / "num.json")) == ["num.json:1: expected a JSON array of objects, got a number"]


def test_instruction_data_json(data_file):
    items = read(data_file("instruction-data.json"))
    assert len(items) == 990 and all(isinstance(r, Record) for r in items)
    assert items[0].where == "instruction-data.json:2" and set(items[0].fields) == {"instruction", "input", "output"}


# --- .csv / .tsv -----------------------------------------------------------------------------------
def test_csv_with_header_and_quoting(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",a\n"two\nlines",b\n\nshort\n')
    items = read(path)
    assert [(r.where, r.fields) for r in items if isinstance(r, Record)] == [
        ("d.csv:2", {"text": "hello, world", "label": "a"}), ("d.csv:3", {"text": "two\nlines", "label": "b"})]
    assert bad(items) == ["d.csv:6: expected 2 columns (text, label), got 1"]


def test_tsv_reads_quotes_as_text(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('ham\t"Quoted start of a message\nspam\tsecond message"\nham\tthird\n')
    items = read(path, columns=["label", "text"])
    assert [r.fields["text"] for r in items] == ['"Quoted start of a message', 'second message"', "third"]
    with_quotes = read(path, columns=["label", "text"], quoting="csv")
    assert len([r for r in with_quotes if isinstance(r, Record)]) < 3  # why quoting is off for .tsv


def test_csv_non_utf8_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\nfine\nna\xefve\n")
    items = read(path)
    assert texts(items) == ["fine"]
    assert bad(items) == ["d.csv:3: invalid UTF-8 (byte 0xef at byte 3 of the line); save the file as UTF-8"]


def test_csv_header_only_is_bad(tmp_path):
    (tmp_path / "h.csv").write_text("text,label\n")
    assert bad(read(tmp_path / "h.csv")) == ["h.csv:1: no records after the header"]


def test_sms_collection_every_line_is_one_record(data_file):
    path = data_file("sms_spam/SMSSpamCollection.tsv")
    items = read(path, columns=["label", "text"])
    assert len(items) == 4738 and all(isinstance(r, Record) for r in items)
    assert [r.where for r in items[:2]] == ["SMSSpamCollection.tsv:1", "SMSSpamCollection.tsv:2"]
    labels = [r.fields["label"] for r in items]
    assert labels.count("ham") == 4103 and labels.count("spam") == 635
    assert any(r.fields["text"].startswith('"') for r in items)


# --- .parquet --------------------------------------------------------------------------------------
def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None], "label": [0, 1, 1]}), path)
    items = read(path)
    assert [(r.where, r.fields) for r in items] == [
        ("d.parquet:1", {"text": "a", "label": 0}), ("d.parquet:2", {"text": "b", "label": 1}),
        ("d.parquet:3", {"text": None, "label": 1})]


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet at all")
    [item] = read(tmp_path / "x.parquet")
    assert isinstance(item, BadRecord) and "not a readable Parquet file" in item.reason


def test_unknown_extension_needs_a_format(tmp_path):
    with pytest.raises(UserError, match="cannot tell the format"):
        detect_format(tmp_path / "SMSSpamCollection")
    assert detect_format(tmp_path / "SMSSpamCollection", "tsv") == "tsv"
