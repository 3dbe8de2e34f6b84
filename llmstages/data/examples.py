"""Records -> what each task trains on, with the checks that make a record bad.

  pretrain  Document: one text.
  classify  LabeledExample: a text and a class label (label membership is checked once the class
            list is known: the recipe's, or the sorted labels of the training data).
  instruct  InstructExample: instruction / input / output (Alpaca style), or a chat-style `messages`
            list, turned into a prompt (the template) and a response.

A missing field, a field that is not text, an empty text, or text that cannot be encoded as UTF-8 (a
lone surrogate from a JSON "\\ud800" escape) makes the record bad; the reason names the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstages import templates
from llmstages.config import DataConfig
from llmstages.data.readers import SUFFIX_FORMATS, BadRecord, Record, detect_format, read_records
from llmstages.data.sources import local_paths
from llmstages.errors import UserError, listed


@dataclass
class Document:
    text: str
    where: str
    nbytes: int             # UTF-8 bytes of `text`


@dataclass
class LabeledExample:
    text: str
    label: str
    where: str
    nbytes: int


@dataclass
class InstructExample:
    instruction: str
    input: str
    output: str
    prompt: str             # the template applied to instruction + input (or to the chat history)
    response: str
    where: str
    nbytes: int             # UTF-8 bytes of prompt + response
    messages: list | None = field(default=None)

    def to_json(self) -> dict:
        data = {"instruction": self.instruction, "input": self.input, "output": self.output,
                "prompt": self.prompt, "response": self.response, "where": self.where}
        if self.messages is not None:
            data["messages"] = self.messages
        return data


def _fields_hint(fields: dict) -> str:
    names = ", ".join(map(str, list(fields)[:8])) + (", ..." if len(fields) > 8 else "")
    return f" (fields: {names})" if names else ""


def _text(record: Record, name: str, *, required: bool = True) -> tuple[str, int] | str:
    """(text, UTF-8 bytes) of field `name`, or the reason it is unusable."""
    if name not in record.fields:
        if not required:
            return "", 0
        return f"missing field {name!r}{_fields_hint(record.fields)}"
    value = record.fields[name]
    if value is None:
        return ("", 0) if not required else f"field {name!r} is null"
    if not isinstance(value, str):
        return f"field {name!r} is not text (got {type(value).__name__})"
    if required and not value.strip():
        return f"field {name!r} is empty"
    try:
        return value, len(value.encode("utf-8"))
    except UnicodeEncodeError as err:
        return f"field {name!r} is not valid Unicode ({err.reason} at character {err.start + 1})"


def to_document(record: Record, cfg: DataConfig) -> Document | BadRecord:
    got = _text(record, cfg.text_field)
    if isinstance(got, str):
        return BadRecord(record.where, got)
    return Document(got[0], record.where, got[1])


def to_labeled(record: Record, cfg: DataConfig) -> LabeledExample | BadRecord:
    got = _text(record, cfg.text_field)
    if isinstance(got, str):
        return BadRecord(record.where, got)
    if cfg.label_field not in record.fields:
        return BadRecord(record.where, f"missing field {cfg.label_field!r}{_fields_hint(record.fields)}")
    label = record.fields[cfg.label_field]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        return BadRecord(record.where, f"label field {cfg.label_field!r} is not a string or an integer "
                                       f"(got {type(label).__name__})")
    label = str(label).strip()
    if not label:
        return BadRecord(record.where, f"label field {cfg.label_field!r} is empty")
    return LabeledExample(got[0], label, record.where, got[1])


def label_problem(example: LabeledExample, labels: list[str], declared: bool) -> BadRecord | None:
    """A bad record when `example`'s label is not one of `labels`."""
    if example.label in labels:
        return None
    known = ", ".join(labels)
    where = "data.labels" if declared else "the labels found in the training data"
    return BadRecord(example.where, f"label {example.label!r} is not in {where} ({known})")


def to_instruction(record: Record, cfg: DataConfig, template: str) -> InstructExample | BadRecord:
    fields = record.fields
    # A conversation wins when a record has both (prepare's own test.jsonl keeps `messages` beside the
    # flattened instruction, so evaluating it must read the whole history).
    if cfg.messages_field in fields and fields[cfg.messages_field] is not None:
        return _chat(record, cfg, template)
    parts = {}
    for name, required in ((cfg.instruction_field, True), (cfg.input_field, False), (cfg.output_field, True)):
        got = _text(record, name, required=required)
        if isinstance(got, str):
            return BadRecord(record.where, got)
        parts[name] = got[0]
    instruction, input_text, output = parts[cfg.instruction_field], parts[cfg.input_field], parts[cfg.output_field]
    prompt = templates.format_prompt(template, instruction, input_text)
    nbytes = len(prompt.encode("utf-8")) + len(output.encode("utf-8"))
    return InstructExample(instruction, input_text, output, prompt, output, record.where, nbytes)


def _chat(record: Record, cfg: DataConfig, template: str) -> InstructExample | BadRecord:
    messages = record.fields[cfg.messages_field]
    name = cfg.messages_field
    if not isinstance(messages, list) or not messages:
        return BadRecord(record.where, f"field {name!r} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return BadRecord(record.where, f"{name}[{i}] must be an object with string 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            return BadRecord(record.where, f"{name}[{i}]: unknown role {message['role']!r} (system, user, assistant)")
    if not messages[-1]["content"].strip():
        return BadRecord(record.where, f"{name}: the last (assistant) message is empty")
    try:
        prompt, response = templates.split_conversation(template, messages)
        nbytes = len(prompt.encode("utf-8")) + len(response.encode("utf-8"))
    except ValueError as err:  # wrong last role, no user turn
        return BadRecord(record.where, f"{name}: {err}")
    except UnicodeEncodeError as err:
        return BadRecord(record.where, f"{name}: not valid Unicode ({err.reason})")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return InstructExample(users[-1] if users else "", "", response, prompt, response, record.where, nbytes,
                           messages=messages)


def convert(task: str, record: Record, cfg: DataConfig, template: str) -> Any:
    """The task's example for `record`, or a BadRecord saying why there is none."""
    if task == "pretrain":
        return to_document(record, cfg)
    if task == "classify":
        return to_labeled(record, cfg)
    return to_instruction(record, cfg, template)


# ---------------------------------------------------------------------------------------------------
# files -> examples (prepare reads its planned files, evaluate the files it is given)
# ---------------------------------------------------------------------------------------------------
def file_examples(path: Path, display: str, fmt: str, task: str, cfg: DataConfig,
                  template: str = "alpaca") -> Iterator[Any]:
    """Every record of one file as the task's example, or as the BadRecord that says why it is not one."""
    for record in read_records(path, display, fmt, cfg):
        yield record if isinstance(record, BadRecord) else convert(task, record, cfg, template)


def file_format(path: Path, trained_format: str) -> str:
    """The format of an evaluation file: its extension says it (a .json file is JSON even when the model
    was trained on TSV); the training data's format only for files without a known extension."""
    return SUFFIX_FORMATS.get(path.suffix.lower()) or detect_format(path, trained_format)


def read_examples(paths: list[str], task: str, cfg: DataConfig, *, template: str = "alpaca",
                  limit: int | None = None) -> list:
    """Examples of `task` from local files/folders/globs; every bad record is reported (exit 2)."""
    examples, bad = [], []
    for spec in paths:
        for path in local_paths(spec, cfg.format):
            for item in file_examples(path, str(path), file_format(path, cfg.format), task, cfg, template):
                (bad if isinstance(item, BadRecord) else examples).append(item)
    if bad:
        raise BadExamples(bad)
    if not examples:
        raise UserError(f"no examples found in {', '.join(paths)}")
    return examples[:limit] if limit else examples


class BadExamples(UserError):
    """Bad records in evaluation data, each distinct problem listed once with its count and first places
    (a whole file of the wrong kind is one problem, not a line per record)."""

    def __init__(self, bad: list[BadRecord], hint: str = "fix them, or evaluate on other files"):
        self.bad = bad
        groups: dict[str, list[str]] = {}  # reason -> where it happened
        for record in bad:
            groups.setdefault(record.reason, []).append(record.where)
        lines = [f"{wheres[0]}: {reason}" + (f"  [{len(wheres)} records like this, also {', '.join(wheres[1:3])}"
                                             f"{', ...' if len(wheres) > 3 else ''}]" if len(wheres) > 1 else "")
                 for reason, wheres in sorted(groups.items(), key=lambda item: -len(item[1]))]
        kinds = f"{len(groups)} distinct problem{'s' if len(groups) != 1 else ''}"
        super().__init__(f"{len(bad)} bad record{'s' if len(bad) != 1 else ''} in the evaluation data "
                         f"({kinds}):\n" + listed(lines), hint=hint)


def data_settings(meta: dict) -> DataConfig:
    """The data settings a checkpoint (its meta.json) was trained with; defaults for models from elsewhere."""
    saved = dict(meta.get("data_settings") or {})
    known = set(DataConfig.__dataclass_fields__)
    return DataConfig(**{k: v for k, v in saved.items() if k in known})
