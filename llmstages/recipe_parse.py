"""Reading recipes: safe YAML, conversion by declared type, validation, "did you mean" suggestions.

The recipe schema itself (the dataclasses) is in recipe_schema.py; this module turns raw YAML and KEY=VALUE
overrides into it, collecting every problem with its dotted path instead of stopping at the first.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from llmstages.errors import UserError


def _field_paths(cls: type, prefix: str = "") -> dict[str, tuple[type, dataclasses.Field]]:
    """Every dotted leaf path of a recipe dataclass -> (declared type, field)."""
    paths: dict[str, tuple[type, dataclasses.Field]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths.update(_field_paths(tp, f"{prefix}{f.name}."))
        else:
            paths[prefix + f.name] = (tp, f)
    return paths




def _unquote(text: str) -> str:
    """`"a.txt"` or `'a.txt'` -> `a.txt`: list items in an override may be quoted as in YAML."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _type_name(tp: Any) -> str:
    if tp in (int, float, str, bool):
        return tp.__name__
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}"
    if type(None) in args:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    return str(tp)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def convert(value: Any, tp: Any, *, from_text: bool) -> Any:
    """Convert `value` to the declared type `tp`; raise ValueError with a short reason.

    `from_text` marks a command-line override: the string is parsed by the field's type, so
    `3e-4` becomes a float and `none` becomes None only where the field allows null.
    """
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        if value is None or (from_text and isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return convert(value, inner, from_text=from_text)
    if typing.get_origin(tp) is list:
        if from_text and isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [_unquote(part.strip()) for part in text.split(",") if part.strip()]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list):
            raise ValueError(f"expected {_type_name(tp)}, got {type(value).__name__}")
        return [convert(v, args[0], from_text=from_text) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
                if number.is_integer() and re.fullmatch(r"[+-]?[\d_]+(\.0*)?([eE]\+?\d+)?", value.strip()):
                    return int(number)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
            if math.isfinite(number):
                return number
        raise ValueError(f"expected a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {type(value).__name__}")
    raise TypeError(f"unsupported field type {tp}")  # a bug in this file, not user input


def _check_bounds(path: str, value: Any, meta: dict, problems: list[tuple[str, str]]) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta.get("choices") and v not in meta["choices"]:
            hint = difflib.get_close_matches(str(v), [str(c) for c in meta["choices"]], n=1)
            extra = f" (did you mean `{hint[0]}`?)" if hint else ""
            problems.append((path, f"{v!r} is not one of {', '.join(map(str, meta['choices']))}{extra}"))
        if isinstance(v, (int, float)):
            if meta.get("ge") is not None and v < meta["ge"]:
                problems.append((path, f"{v} is below the minimum {meta['ge']}"))
            if meta.get("gt") is not None and v <= meta["gt"]:
                problems.append((path, f"{v} must be greater than {meta['gt']}"))
            if meta.get("le") is not None and v > meta["le"]:
                problems.append((path, f"{v} is above the maximum {meta['le']}"))


class RecipeParser:
    """Builds a root dataclass (the recipe) from raw YAML data plus KEY=VALUE overrides.

    `aliases` maps names from other tools (learning_rate, batch_size, ...) to our dotted paths so an
    unknown key can be answered with the right suggestion.
    """

    def __init__(self, root: type, aliases: dict[str, str]):
        self.root = root
        self.aliases = aliases
        self.paths = _field_paths(root)
        self.sections = sorted({p.split(".")[0] for p in self.paths if "." in p})

    def suggest(self, key: str, section: str = "") -> str | None:
        """The known dotted path closest to an unknown `key` found in `section` ("" = top level)."""
        leaf = key.rsplit(".", 1)[-1].lower()
        candidates: dict[str, str] = {}  # spelling -> dotted path
        for path in self.paths:
            candidates.setdefault(path.rsplit(".", 1)[-1], path)
            candidates.setdefault(path, path)
        for name in self.sections:
            candidates.setdefault(name, name)
        for alias, path in self.aliases.items():
            candidates.setdefault(alias, path)
        if section and f"{section}.{leaf}" in self.paths:  # prefer the section where the typo was made
            return f"{section}.{leaf}"
        match = difflib.get_close_matches(leaf, list(candidates), n=1, cutoff=0.7)
        return candidates[match[0]] if match else None

    def parse(self, raw: dict, overrides: list[str] | tuple = ()) -> tuple[Any, list[tuple[str, str]]]:
        """(the built dataclass, the problems found); the object is meaningless when there are problems."""
        raw = _deep_copy(raw)
        problems: list[tuple[str, str]] = []
        overridden: dict[str, str] = {}
        for text in overrides:
            self._apply_override(raw, text, problems, overridden)
        return self._build(self.root, raw, "", problems, overridden), problems

    def _build(self, cls: type, raw: dict, prefix: str, problems: list[tuple[str, str]], overridden: dict) -> Any:
        """Build dataclass `cls` from a raw YAML mapping, appending every problem found."""
        hints = typing.get_type_hints(cls)
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            path = f"{prefix}{key}"
            if key not in names:
                hint = self.suggest(str(key), prefix.rstrip("."))
                problems.append((path, "unknown key" + (f"; did you mean `{hint}`?" if hint else "")))
                continue
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    problems.append((path, f"expected a section (mapping), got {type(value).__name__}"))
                    continue
                kwargs[key] = self._build(tp, value, path + ".", problems, overridden)
                continue
            try:
                kwargs[key] = convert(value, tp, from_text=path in overridden)
            except ValueError as err:
                source = f" (from {path}={overridden[path]})" if path in overridden else ""
                problems.append((path, f"{err}{source}"))
                continue
            _check_bounds(path, kwargs[key], names[key].metadata, problems)
        for key in names:
            if key not in kwargs and dataclasses.is_dataclass(hints[key]):
                kwargs[key] = self._build(hints[key], {}, f"{prefix}{key}.", problems, overridden)
        return cls(**kwargs)

    def _apply_override(self, raw: dict, text: str, problems: list[tuple[str, str]], overridden: dict) -> None:
        if "=" not in text:
            problems.append(("", f"override {text!r} is not KEY=VALUE (e.g. train.lr=3e-4)"))
            return
        path, value = text.split("=", 1)
        path = path.strip()
        if path not in self.paths:
            hint = self.suggest(path, path.rsplit(".", 1)[0] if "." in path else "")
            problems.append((path, "unknown key in override" + (f"; did you mean `{hint}`?" if hint else "")))
            return
        node = raw
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
        overridden[path] = value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also rejects duplicate keys (a silent overwrite is a common recipe bug)."""


def _mapping_no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping safely; a syntax error or a Python tag is a UserError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file", hint="`llmstages recipes` lists the built-in ones") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a recipe file",
                        hint="give a .yaml file, or the name of a built-in recipe (`llmstages recipes`)") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = err.problem or str(err)
        if "python/" in str(err):
            problem += " (recipes are data: Python object tags are refused)"
        raise UserError(f"{where}: invalid recipe YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid recipe YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def recipe_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted paths whose values differ between two recipe dicts: (path, old, new)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += recipe_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append((f"{prefix}{key}", a, b))
    return diffs
