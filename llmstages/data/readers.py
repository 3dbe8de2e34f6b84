"""File formats -> records, each carrying the `file:line` it came from.

A reader yields `Record`s (a dict of fields) and `BadRecord`s (what is wrong and where) in file order,
never raising for bad content, so the stage can report every problem at once. What the fields must
hold for a task is checked later (examples.py); readers only parse.

  .txt      one document per file, or documents split on a delimiter line (data.delimiter). The BOM is
            dropped, CRLF becomes LF, Project Gutenberg's header and footer (outside the
            `*** START OF` / `*** END OF` marker lines) are cut off, and blank lines at either end of
            a document are dropped. Fields: {text_field: text}.
  .jsonl    one JSON object per line (blank lines skipped).
  .json     an array of objects (or a single object); records are numbered by the line they start on.
  .csv/.tsv a header row, or data.columns for files without one. Quoting is off for .tsv by default:
            the SMS Spam Collection has messages that begin with `"`, and CSV quoting would join lines.
  .parquet  one record per row; the "line" is the 1-based row number.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstages.config import DataConfig
from llmstages.errors import UserError

SUFFIX_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                  ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
BOM = b"\xef\xbb\xbf"
# Bytes that are not UTF-8, after decoding with errors="surrogateescape".
_ESCAPED = re.compile("[\udc80-\udcff]")
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF[^\n]*\n?", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF", re.M)
_WS = re.compile(r"[ \t\n\r]*")


@dataclass
class Record:
    where: str                  # "file:line"
    fields: dict[str, Any]


@dataclass
class BadRecord:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The format of `path`: data.format when given, else by file extension."""
    if fmt != "auto":
        return fmt
    found = SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        raise UserError(f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}",
                        hint="set data.format to txt, jsonl, json, csv, tsv or parquet")
    return found


def read_records(path: Path, display: str, fmt: str, cfg: DataConfig) -> Iterator[Record | BadRecord]:
    """Records of one file in format `fmt` (see the module docstring); `display` names it in messages."""
    if fmt == "txt":
        yield from read_txt(path, display, cfg)
    elif fmt == "jsonl":
        yield from read_jsonl(path, display)
    elif fmt == "json":
        yield from read_json(path, display)
    elif fmt in ("csv", "tsv"):
        yield from read_csv(path, display, fmt, cfg)
    elif fmt == "parquet":
        yield from read_parquet(path, display)
    else:  # config validation allows only the formats above
        raise ValueError(f"unknown format {fmt!r}")


def _invalid_utf8(text: str, start: int, base_line: int) -> tuple[int, str] | None:
    """(line, reason) of the first non-UTF-8 byte in surrogate-escaped `text`, or None when there is none."""
    match = _ESCAPED.search(text, start)
    if match is None:
        return None
    line = base_line + text.count("\n", start, match.start())
    column = match.start() - text.rfind("\n", 0, match.start())
    byte = ord(match.group()) - 0xDC00
    return line, f"invalid UTF-8 (byte 0x{byte:02x} at column {column}); save the file as UTF-8"


def _byte_reason(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); save the file as UTF-8"


# ---------------------------------------------------------------------------------------------------
# .txt
# ---------------------------------------------------------------------------------------------------
def gutenberg_body(text: str) -> tuple[int, int] | None:
    """(start, end) of the text between Project Gutenberg's START and END marker lines, or None."""
    start = _GUTENBERG_START.search(text)
    if start is None:
        return None
    end = _GUTENBERG_END.search(text, start.end())
    return start.end(), end.start() if end else len(text)


def read_txt(path: Path, display: str, cfg: DataConfig) -> Iterator[Record | BadRecord]:
    raw = path.read_bytes()
    if not raw.strip():
        yield BadRecord(f"{display}:1", "empty file")
        return
    has_bad_bytes = False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text, has_bad_bytes = raw.decode("utf-8", errors="surrogateescape"), True
    del raw
    text = text.removeprefix("\ufeff")
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")  # removes only \r: line numbers stay those of the file
    start, end = 0, len(text)
    if cfg.strip_gutenberg and (body := gutenberg_body(text)) is not None:
        start, end = body
        if not text[start:end].strip():
            marker_line = text.count("\n", 0, start)  # the body starts on the line after the marker
            yield BadRecord(f"{display}:{marker_line}", "no text between the Project Gutenberg START and END markers")
            return
    pieces = _delimited(text, start, end, cfg.delimiter) if cfg.delimiter else [(start, end)]
    line, last = 1, 0
    found = 0
    for a, b in pieces:
        line += text.count("\n", last, a)
        last = a
        doc = text[a:b]
        lead = len(doc) - len(doc.lstrip("\n"))
        doc = doc.strip("\n")
        if not doc.strip():
            continue  # nothing between two delimiters (or after the last one)
        found += 1
        where = f"{display}:{line + lead}"
        if has_bad_bytes and (bad := _invalid_utf8(doc, 0, line + lead)) is not None:
            yield BadRecord(f"{display}:{bad[0]}", bad[1])
            continue
        yield Record(where, {cfg.text_field: doc})
    if not found:
        yield BadRecord(f"{display}:1", "no text (only blank lines and delimiters)")


def _delimited(text: str, start: int, end: int, delimiter: str) -> list[tuple[int, int]]:
    """(start, end) of the documents between lines that hold only `delimiter`."""
    pattern = re.compile(rf"^[ \t]*{re.escape(delimiter.strip())}[ \t]*$", re.M)
    spans, pos = [], start
    for match in pattern.finditer(text, start, end):
        spans.append((pos, match.start()))
        pos = match.end()
    spans.append((pos, end))
    return spans


# ---------------------------------------------------------------------------------------------------
# .jsonl / .json
# ---------------------------------------------------------------------------------------------------
def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def read_jsonl(path: Path, display: str) -> Iterator[Record | BadRecord]:
    found = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            found += 1
            where = f"{display}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield BadRecord(where, _byte_reason(raw, err))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield BadRecord(where, f"invalid JSON ({err.msg} at column {err.colno})")
                continue
            if isinstance(obj, dict):
                yield Record(where, obj)
            else:
                yield BadRecord(where, f"expected a JSON object, got {_json_type(obj)}")
    if not found:
        yield BadRecord(f"{display}:1", "empty file")


def read_json(path: Path, display: str) -> Iterator[Record | BadRecord]:
    raw = path.read_bytes().removeprefix(BOM)
    if not raw.strip():
        yield BadRecord(f"{display}:1", "empty file")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        line, reason = _invalid_utf8(raw.decode("utf-8", errors="surrogateescape"), 0, 1)
        yield BadRecord(f"{display}:{line}", reason + "; the file was not read")
        return
    decoder = json.JSONDecoder()
    i = _WS.match(text).end()
    if text[i] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            yield BadRecord(f"{display}:{err.lineno}", f"invalid JSON ({err.msg} at column {err.colno})")
            return
        if isinstance(obj, dict):
            yield Record(f"{display}:{text.count(chr(10), 0, i) + 1}", obj)
        else:
            yield BadRecord(f"{display}:1", f"expected a JSON array of objects, got {_json_type(obj)}")
        return
    i = _WS.match(text, i + 1).end()
    line, last = 1, 0
    if text.startswith("]", i):
        yield BadRecord(f"{display}:1", "empty JSON array")
        return
    while True:
        line += text.count("\n", last, i)
        last = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            yield BadRecord(f"{display}:{err.lineno}",
                            f"invalid JSON ({err.msg} at column {err.colno}); the rest of the file was not read")
            return
        where = f"{display}:{line}"
        if isinstance(obj, dict):
            yield Record(where, obj)
        else:
            yield BadRecord(where, f"expected a JSON object, got {_json_type(obj)}")
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif text.startswith("]", i):
            return
        else:
            bad_line = text.count("\n", 0, i) + 1
            yield BadRecord(f"{display}:{bad_line}",
                            "invalid JSON (expected ',' or ']' after an array element); the rest of the file was not read")
            return


# ---------------------------------------------------------------------------------------------------
# .csv / .tsv
# ---------------------------------------------------------------------------------------------------
def read_csv(path: Path, display: str, fmt: str, cfg: DataConfig) -> Iterator[Record | BadRecord]:
    quoting = cfg.quoting if cfg.quoting != "auto" else ("none" if fmt == "tsv" else "csv")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # one record may be a whole book
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(BOM)
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad_lines[lineno] = _byte_reason(raw, err)
                    yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(lines(), delimiter="\t" if fmt == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
    header = list(cfg.columns) or None
    found, previous = 0, 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            yield BadRecord(f"{display}:{reader.line_num}", f"malformed {fmt.upper()} ({err})")
            previous = reader.line_num
            continue
        start, previous = previous + 1, reader.line_num
        if not any(field.strip() for field in row):
            continue  # blank line
        where = f"{display}:{start}"
        if bad_lines and (problems := [bad_lines[n] for n in range(start, previous + 1) if n in bad_lines]):
            found += 1
            yield BadRecord(where, problems[0])
            continue
        if header is None:
            header = [name.strip() for name in row]
            continue
        found += 1
        if len(row) != len(header):
            yield BadRecord(where, f"expected {len(header)} columns ({', '.join(header)}), got {len(row)}")
            continue
        yield Record(where, dict(zip(header, row)))
    if not found:
        yield BadRecord(f"{display}:1", "empty file" if header is None else "no records after the header")


# ---------------------------------------------------------------------------------------------------
# .parquet
# ---------------------------------------------------------------------------------------------------
def read_parquet(path: Path, display: str) -> Iterator[Record | BadRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        yield BadRecord(f"{display}:1", f"not a readable Parquet file ({err})")
        return
    row = 0
    try:
        for batch in table_file.iter_batches(batch_size=4096):
            for fields in batch.to_pylist():
                row += 1
                yield Record(f"{display}:{row}", fields)
    except (pa.ArrowException, OSError, ValueError) as err:  # a damaged row group: the rows before it were read
        yield BadRecord(f"{display}:{row + 1}", f"unreadable Parquet data ({err})")
        return
    if row == 0:
        yield BadRecord(f"{display}:1", "no rows")
