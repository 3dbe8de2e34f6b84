"""jsonio.read_json: every way a JSON file the user points at can be broken is one clear UserError
naming the file (the loaders of model.json, meta.json, manifest.json and config.json all use it)."""

from __future__ import annotations

import json

import pytest

from llmstages.errors import UserError
from llmstages.jsonio import dumps, read_json


def test_a_good_file_is_read(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}')
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    (tmp_path / "b.json").write_text("[1]")
    assert read_json(tmp_path / "b.json", expect=list) == [1]


@pytest.mark.parametrize("content,message", [
    (None, "missing (model config)"),
    (b"\xff\xfe{", "corrupt model config: not UTF-8 text"),
    (b'{"a": 1,}', "corrupt model config: not valid JSON (Expecting property name enclosed in double quotes"
                   " at line 1 column 9)"),
    (b"[" * 100_000 + b"]" * 100_000, "corrupt model config: JSON nested too deeply"),
    (b"[1, 2]", "corrupt model config: expected a JSON object, got array"),
])
def test_each_broken_file_names_itself_and_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "model.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_json(path, what="model config")
    assert str(err.value).startswith(f"{path}: {message}")


def test_an_unreadable_path_is_a_clear_error(tmp_path):
    (tmp_path / "folder.json").mkdir()  # reading a folder is an OSError other than FileNotFoundError
    with pytest.raises(UserError, match=r"folder.json: cannot read the meta"):
        read_json(tmp_path / "folder.json", what="meta")


def test_dumps_writes_null_for_non_finite_numbers():
    text = dumps({"loss": float("nan"), "xs": [float("inf"), 1.5], "t": (float("-inf"),)})
    assert json.loads(text) == {"loss": None, "xs": [None, 1.5], "t": [None]}
