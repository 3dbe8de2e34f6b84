"""JSON in and out: files that may be corrupt are read with a clean error; output is always valid JSON.

Every JSON file llmstages reads back (model.json, meta.json, train_state.json, a dataset's
manifest.json, config.json of hf: folders) can be truncated, overwritten or hand-edited. `read_json`
turns each way that fails into a `UserError` naming the file (exit 2), never a traceback.

Python's `json.dumps` writes `NaN` and `Infinity` for non-finite floats, which no JSON parser
accepts; `dumps` writes them as null instead (a diverged loss, a metric of an empty class).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmstages.errors import UserError


def read_json(path: Path, *, expect: type = dict, what: str = "file") -> Any:
    """The JSON value in `path`, which must be of type `expect`; any problem is a UserError naming `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: missing ({what})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: corrupt {what}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: corrupt {what}: not valid JSON ({err.msg} at line {err.lineno} "
                        f"column {err.colno})") from None
    except RecursionError:
        raise UserError(f"{path}: corrupt {what}: JSON nested too deeply") from None
    if not isinstance(value, expect):
        raise UserError(f"{path}: corrupt {what}: expected a JSON {_json_type(expect)}, got {_json_type(type(value))}")
    return value


def finite(value: Any) -> Any:
    """`value` with every non-finite float (nan, inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strictly valid JSON text of `value`: non-finite floats become null (json.dumps would write NaN)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def _json_type(tp: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "true/false"}.get(tp, "null" if tp is type(None) else tp.__name__)
