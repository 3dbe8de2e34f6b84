"""File formats -> records, each carrying the `file:line` it came from.

A reader yields `Record`s (a dict of fields) and `BadRecord`s (what is wrong and where) in file order,
never raising for bad content, so the stage can report every problem at once. What the fields must
hold for a task is checked later (examples.py); readers only parse.

  .txt      one document per file, or documents split on a delimiter line (data.delimiter). The BOM is
            dropped, CRLF becomes LF, Project Gutenberg's header and footer (outside the
            `*** START OF` / `*** END OF` marker lines) are cut off, and blank lines at either end of
            a document are dropped. Fields: {text_field: text}. Read line by line (a first quick pass
            finds the Gutenberg markers), so memory holds one document, never the whole file; a
            document longer than data.max_document_chars is cut at a line break into several.
  .jsonl    one JSON object per line (blank lines skipped).
  .json     an array of objects (or a single object); records are numbered by the line they start on.
  .csv/.tsv a header row, or data.columns for files without one. Quoting is off for .tsv by default:
            the SMS Spam Collection has messages that begin with `"`, and CSV quoting would join lines.
  .parquet  one record per row; the "line" is the 1-based row number.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstages.config import DataConfig
from llmstages.errors import UserError, listed

SUFFIX_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                  ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
BOM = b"\xef\xbb\xbf"
# Bytes that are not UTF-8, after decoding with errors="surrogateescape".
_ESCAPED = re.compile("[\udc80-\udcff]")
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF[^\n]*\n?", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF", re.M)
_WS = re.compile(r"[ \t\n\r]*")
_GUTENBERG_START_B = re.compile(rb"\*\*\*\s*START OF")
_GUTENBERG_END_B = re.compile(rb"\*\*\*\s*END OF")
# Most bytes of one line read at once: a file with a 1 GB line is still read in bounded pieces.
READ_BYTES = 1 << 20


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


SHOW_BAD = 20


@dataclass
class BadRecords:
    """Every bad record counted; the first SHOW_BAD kept as `file:line: reason`."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, bad: BadRecord) -> None:
        self.count += 1
        if len(self.examples) < SHOW_BAD:
            self.examples.append(str(bad))

    def to_json(self) -> dict:
        return {"count": self.count, "examples": self.examples}

    def error(self) -> UserError:
        return UserError(f"{self.count} bad record{'s' if self.count != 1 else ''} in the data "
                         f"(nothing was written):\n{listed(self.examples, self.count, SHOW_BAD)}",
                         hint="fix them, or set data.skip_bad=true to prepare the good records "
                              "and list the bad ones in manifest.json")


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


def _line_pieces(path: Path) -> Iterator[tuple[bytes, str]]:
    """(raw, text) of each line of `path`, a long line in pieces of at most READ_BYTES bytes.

    Decoded incrementally with errors="surrogateescape" (a character split between two pieces is
    kept whole; a byte that is not UTF-8 becomes a lone surrogate that `_invalid_utf8` finds). The BOM
    is dropped. A piece ends its line when its raw bytes end with b"\\n".
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(path, "rb") as f:
        raw = f.readline(READ_BYTES).removeprefix(BOM)
        while raw:
            yield raw, decoder.decode(raw)
            raw = f.readline(READ_BYTES)
    if tail := decoder.decode(b"", final=True):  # a truncated character at the very end
        yield b"", tail


def _gutenberg_lines(path: Path) -> tuple[int, int | None] | None:
    """(START marker line, END marker line or None) of a Project Gutenberg file (1-based), or None."""
    start, line, at_start = None, 1, True
    for raw, _ in _line_pieces(path):
        if at_start and raw.startswith(b"***"):
            if start is None and _GUTENBERG_START_B.match(raw):
                start = line
            elif start is not None and _GUTENBERG_END_B.match(raw):
                return start, line
        at_start = raw.endswith(b"\n")
        line += at_start
    return (start, None) if start is not None else None


def read_txt(path: Path, display: str, cfg: DataConfig) -> Iterator[Record | BadRecord]:
    """Documents of a .txt file, read line by line (never the whole file at once); see the module docstring."""
    body = _gutenberg_lines(path) if cfg.strip_gutenberg else None
    first, last = (body[0] + 1, body[1] or sys.maxsize) if body else (1, sys.maxsize)
    delimiter = re.compile(rf"[ \t]*{re.escape(cfg.delimiter.strip())}[ \t]*") if cfg.delimiter else None
    file_blank = body_blank = True
    found = 0
    doc: list[str] = []
    doc_line, doc_chars = first, 0  # the line the current document starts on, its size so far
    line, at_start = 1, True
    longest = cfg.max_document_chars
    for raw, text in _line_pieces(path):
        complete = raw.endswith(b"\n")
        if complete and text.endswith("\r\n"):
            text = text[:-2] + "\n"  # removes only \r: line numbers stay those of the file
        file_blank = file_blank and not raw.strip()
        if first <= line < last:
            body_blank = body_blank and not text.strip()
            if at_start and complete and delimiter is not None and delimiter.fullmatch(text[:-1]):
                if (item := _txt_document(doc, doc_line, display, cfg)) is not None:
                    found += 1
                    yield item
                doc, doc_line, doc_chars = [], line + 1, 0
            else:
                doc.append(text)
                doc_chars += len(text)
                # A document past data.max_document_chars ends at this line break (or here, past twice that):
                # memory holds at most about that much of one document, whatever the file's size.
                if doc_chars >= longest and (complete or doc_chars >= 2 * longest):
                    if (item := _txt_document(doc, doc_line, display, cfg)) is not None:
                        found += 1
                        yield item
                    doc, doc_line, doc_chars = [], line + complete, 0
        at_start = complete
        line += complete
    if (item := _txt_document(doc, doc_line, display, cfg)) is not None:
        found += 1
        yield item
    if found:
        return
    if file_blank:
        yield BadRecord(f"{display}:1", "empty file")
    elif body and body_blank:
        yield BadRecord(f"{display}:{body[0]}", "no text between the Project Gutenberg START and END markers")
    else:
        yield BadRecord(f"{display}:1", "no text (only blank lines and delimiters)")


def _txt_document(lines: list[str], line: int, display: str, cfg: DataConfig) -> Record | BadRecord | None:
    """The document made of `lines` (starting on line `line`), blank lines at either end dropped; None if blank."""
    text = "".join(lines)
    lead = len(text) - len(text.lstrip("\n"))
    text = text.strip("\n")
    if not text.strip():
        return None  # nothing between two delimiters (or after the last one)
    if (bad := _invalid_utf8(text, 0, line + lead)) is not None:
        return BadRecord(f"{display}:{bad[0]}", bad[1])
    return Record(f"{display}:{line + lead}", {cfg.text_field: text})


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


# ---------------------------------------------------------------------------------------------------
# hf: datasets in streaming mode
# ---------------------------------------------------------------------------------------------------
def read_hf_stream(spec: str, skip: int = 0) -> Iterator[Record | BadRecord]:
    """Rows of `hf:ORG/NAME[:split]` read with `datasets` in streaming mode (nothing downloaded ahead),
    numbered from 1 like Parquet rows; `skip` rows are passed over first (a resumed prepare)."""
    from llmstages.data.sources import parse_hf, quiet_datasets

    datasets = quiet_datasets()

    name, split = parse_hf(spec)
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # datasets raises many types (hub, network, missing split, bad files)
        raise UserError(f"{spec}: cannot stream the dataset ({type(err).__name__}: {err})",
                        hint="check the name and split; offline, use a local copy of the files as data.source") from None
    if skip:
        stream = stream.skip(skip)
    for row, fields in enumerate(stream, skip + 1):
        yield Record(f"{spec}:{row}", fields)
