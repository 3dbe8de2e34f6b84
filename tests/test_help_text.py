"""Help wording: snapshots of the browse and evaluate help at 80 columns, no `<bool>` placeholder on any
flag, and every example line of every command whole on an 80-column terminal.

A changed help text fails its snapshot on purpose: read the new text, then write it with
LLMSTAGES_UPDATE_SNAPSHOTS=1 pytest tests/test_help_text.py and commit the file."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmstages.cli import app

SNAPSHOTS = Path(__file__).parent / "snapshots"
COMMANDS = [info.callback.__name__ for info in app.registered_commands]
# generate, chat and export gain options and examples in issue 16's other half (generation controls, gguf):
# their example lines are checked once that work is merged.
EXAMPLES_CHECKED = [c for c in COMMANDS if c not in ("generate", "chat", "export")]


def help_text(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "llmstages", *args, "--help"], capture_output=True, text=True,
                            env=dict(os.environ, COLUMNS="80", NO_COLOR="1", TERM="dumb"), timeout=60)
    assert result.returncode == 0, result.stderr
    return "\n".join(line.rstrip() for line in result.stdout.splitlines()) + "\n"


@pytest.mark.parametrize("command", ["", "runs", "show", "recipes", "evaluate"])
def test_help_matches_its_snapshot(command):
    text = help_text(*([command] if command else []))
    snapshot = SNAPSHOTS / f"help-{command or 'llmstages'}.txt"
    if os.environ.get("LLMSTAGES_UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(text)
    assert text == snapshot.read_text(), f"help of `{command}` changed; see the module docstring"


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_type_placeholder_and_examples_fit_80_columns(command):
    text = help_text(command)
    assert "<bool>" not in text and "<list[str]>" not in text.split("Arguments")[0]
    if command not in EXAMPLES_CHECKED:
        return
    doc = inspect.getdoc(next(i.callback for i in app.registered_commands if i.callback.__name__ == command))
    examples = [line.strip().removesuffix("\\n").strip() for line in doc.split("Example", 1)[1].splitlines()[1:]]
    shown = [line.strip() for line in text.splitlines()]
    for example in filter(None, examples):
        assert example in shown, f"`{example}` is cut at 80 columns in `{command} --help`"
    assert re.search(rf"Usage: .* {command} ", text)
