"""The small shared base of mla-zoo: errors, atomic writes, hashing and text reading.

Every other module imports from here (and from `schema`), never the other way round.

Errors: library code raises an `MlaZooError` subclass whose message names settings fields in
backticks (`` `kv_lora_rank` must be in [1, 60] ``); whoever shows the message renames them for
its reader with `name_fields`: the CLI to flags (`--kv-rank`), a recipe to keys
(`conversion.kv_lora_rank`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# ----------------------------------------------------------------------------- errors


class MlaZooError(ValueError):
    """Bad input, or a state a run cannot go on from; the message says what to do instead."""


class SettingsError(MlaZooError):
    """A settings value outside its field's type, range or choices, or an input file that is missing."""


class SourceError(MlaZooError):
    """A SOURCE model that cannot be loaded or converted."""


class ConversionError(MlaZooError):
    """Conversion settings that do not fit the source model, or unusable calibration data."""


class DataError(MlaZooError):
    """Training data that cannot be read or does not fit the model."""


class SynthError(MlaZooError):
    """A synth-data run that cannot start."""


class FinetuneError(MlaZooError):
    """A fine-tuning run that cannot start or go on."""


class EvalError(MlaZooError):
    """An evaluation that cannot be done."""


class RecipeError(MlaZooError):
    """A recipe that does not validate; the message names the recipe, the key and what is valid."""


class BuildError(MlaZooError):
    """A build that cannot go on."""


class StageUnavailable(BuildError):
    """The recipe enables a stage that this installation of mla-zoo cannot run."""


class GateFailed(BuildError):
    """An evaluation gate failed: the release is stopped."""

    def __init__(self, message: str, gates: list):
        super().__init__(message)
        self.gates = gates


class HubError(MlaZooError):
    """A publish or browse request that cannot be done."""


class VersionExists(HubError):
    """The version is already released; released versions are never overwritten."""


FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def name_fields(message: str, rename: Callable[[str], str | None]) -> str:
    """Replace each `field` of a message by rename(field) (left as it is where that gives None)."""
    return FIELD.sub(lambda m: rename(m[1]) or m[0], message)


# ----------------------------------------------------------------------------- atomic writes


def replace_directory(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing what is there, never leaving half of either."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Write a directory all or nothing: yields an empty sibling temp dir that becomes `target` on success.

    On an exception the temp dir is removed and `target` is untouched. `keep_existing`: if `target`
    appeared meanwhile (a concurrent run finished first), keep it and drop this one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if keep_existing and target.exists():
            shutil.rmtree(tmp)
        else:
            replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a temp file and a rename: readers see the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON file's content; {} when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------- hashing


def _update(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def sha256_files(files: Iterable[Path]) -> str:
    """One hash of several files (a model's weights): each file's name, then its bytes, in path order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        _update(h, f)
    return h.hexdigest()


def hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_tree(root: str | Path, top_level: bool = False) -> dict[str, dict]:
    """{relative posix path: {sha256, size}} of every file under root (or only those directly in it)."""
    root = Path(root)
    found = {}
    for path in sorted(root.iterdir() if top_level else root.rglob("*")):
        if path.is_file():
            found[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return found


def changed_files(root: str | Path, expected: dict[str, dict]) -> list[str]:
    """The files of `expected` ({path: {sha256, size}}) that are missing under root or differ."""
    root = Path(root)
    bad = []
    for rel, meta in expected.items():
        path = root / rel
        if not path.is_file() or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            bad.append(rel)
    return bad


# ----------------------------------------------------------------------------- text


def read_text(path: str | Path, field: str = "text") -> str:
    """A UTF-8 text input; `field` names the setting that gave the path, for the error message."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"`{field}` names a file that does not exist: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SettingsError(f"`{field}` names an empty file: {path} is empty")
    return text
