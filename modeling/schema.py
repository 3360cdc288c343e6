"""The typed data that flows between stages: settings (one dataclass per stage) and reports.

Settings. A stage's settings are one dataclass (a `Settings` subclass) whose fields are made
with `setting(...)`: a default, a `help` line, and rules that `__post_init__` checks on every
construction: the field's type and `choices`, `min` / `max` (inclusive), `gt` / `lt`
(exclusive), `pattern` (+ `what` it means). The same dataclass is the command line (`mla-zoo`
generates its flags from it) and the recipe schema (a recipe section is passed to its
constructor), so the two cannot disagree. More metadata, read by those two:
`aliases` (extra CLI flags), `positional` (a CLI positional argument), `path="file"` / `"dir"` /
`"file-or-dir"` (an input: `check_files` checks that it exists, a recipe resolves it against its own
directory) and
`recipe=False` (a run option that a recipe does not set).

Reports. `Report` subclasses are dataclasses written as JSON with a `schema_version`;
`from_dict` first upgrades an older version (`upgrade`), then builds the nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from .common import MlaZooError, SettingsError, parse_json, write_text_atomic

NONE = type(None)


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, **rules: Any) -> Any:
    """A settings field: its default, a help line and the rules described in the module docstring."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **rules})


def _optional(hint) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not NONE]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _range_text(meta: dict) -> str:
    lo = ("[", meta["min"]) if "min" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["max"]) if "max" in meta else (")", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return ""


def _in_range(value, meta: dict) -> bool:
    return (("min" not in meta or value >= meta["min"]) and ("max" not in meta or value <= meta["max"])
            and ("gt" not in meta or value > meta["gt"]) and ("lt" not in meta or value < meta["lt"]))


def check_value(name: str, value: Any, hint: Any, meta: dict) -> Any:
    """`value` checked against a field's type and rules (an int given for a float becomes a float)."""
    kind, optional = _optional(hint)
    if value is None:
        if optional:
            return None
        raise SettingsError(f"`{name}` is required")
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"`{name}` must be a list (got {value!r})")
        items = [check_value(name, v, typing.get_args(kind)[0], meta) for v in value]
        return tuple(items) if origin is tuple else items
    what = {bool: "true or false", int: "an int", float: "a number", str: "a non-empty string", dict: "a table"}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str) and bool(value.strip()),
        dict: isinstance(value, dict),
    }.get(kind, True)
    if ok and kind is float and not math.isfinite(value):
        ok = False  # nan and inf pass no range check and break every computation downstream
    rule = _range_text(meta)
    if not ok or (rule and not _in_range(value, meta)):
        raise SettingsError(f"`{name}` must be {what.get(kind, kind)}{rule} (got {value!r})")
    if "choices" in meta and value not in meta["choices"]:
        raise SettingsError(f"`{name}` must be one of {', '.join(map(str, meta['choices']))} (got {value!r})")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise SettingsError(f"`{name}` must be {meta.get('what', 'of the form ' + meta['pattern'])} (got {value!r})")
    return float(value) if kind is float else value


@dataclass
class Settings:
    """Base of every stage's settings: each field is checked on construction (see the module docstring)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, check_value(f.name, getattr(self, f.name), hints[f.name], dict(f.metadata)))

    def check_files(self) -> None:
        """Every input file or directory named by a `path="file"` / `path="dir"` field exists (before
        any slow work starts)."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.metadata.get("path")
            if value is None:
                continue
            if kind == "file" and not Path(value).is_file():
                what = "a directory, not a file" if Path(value).is_dir() else "a file that does not exist"
                raise SettingsError(f"`{f.name}` names {what}: {value}")
            if kind == "dir" and not Path(value).is_dir():
                raise SettingsError(f"`{f.name}` names a directory that does not exist: {value}")
            if kind == "file-or-dir" and not Path(value).exists():
                raise SettingsError(f"`{f.name}` names a file or directory that does not exist: {value}")


def recipe_fields(cls) -> list[dataclasses.Field]:
    """The fields of a settings class that a recipe may set."""
    return [f for f in fields(cls) if f.metadata.get("recipe", True)]


# ----------------------------------------------------------------------------- reports


def build(cls, data: dict, where: str = ""):
    """An instance of dataclass `cls` from JSON data, nested dataclasses included; unknown keys are refused."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise MlaZooError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MlaZooError(f"{where}: unknown field {unknown[0]!r}")
    return cls(**{k: _build_value(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def _build_value(hint, value, where: str):
    kind, _ = _optional(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where)
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        items = [_build_value(typing.get_args(kind)[0], v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return {k: _build_value(typing.get_args(kind)[1], v, f"{where}.{k}") for k, v in value.items()}
    return value


@dataclass
class Report:
    """Base of the JSON reports (conversion.json, training.json, ...): versioned, typed, read back whole."""

    SCHEMA_VERSION: ClassVar[int] = 1
    FILE: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"schema_version": self.SCHEMA_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE
        write_text_atomic(path, self.to_json())
        return path

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        """The data of an older schema version in the current one (subclasses that changed override it)."""
        return data

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        version = data.pop("schema_version", 1)  # the first reports carried no version
        if version > cls.SCHEMA_VERSION:
            raise MlaZooError(f"{cls.FILE or cls.__name__} has schema_version {version}, newer than this mla-zoo "
                              f"reads ({cls.SCHEMA_VERSION}): upgrade mla-zoo")
        if version < cls.SCHEMA_VERSION:
            data = cls.upgrade(data, version)
        return build(cls, data, cls.FILE or cls.__name__)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, path: str | Path):
        """From a file, or from the report's usual file in a directory (errors name the file)."""
        path = Path(path)
        path = path / cls.FILE if path.is_dir() else path
        return cls.from_dict(parse_json(path.read_text(encoding="utf-8"), path))
