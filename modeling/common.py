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
import socket
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


# ----------------------------------------------------------------------------- output directories


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output_dir(out: str | Path, *, marker: str | tuple[str, ...], overwrite: bool,
                     inputs: dict[str, str | Path | list | tuple | None] | None = None, field: str = "output") -> Path:
    """The one rule of every command that writes a directory (convert, synth-data, finetune, build,
    pull, export): what may be at `out`, checked before any work starts.

    * `out` is none of the command's `inputs` ({setting name: path or paths}: its source, teacher,
      texts, data) and no directory above one of them: writing there would destroy what it reads.
    * A file at `out` is never replaced.
    * An existing directory that is not empty is replaced (or, for build and finetune --resume,
      written into) only with `overwrite`, and only when it carries this command's `marker` (a file
      or folder that mla-zoo writes there: conversion.json, synth.json, run.json, ...). A directory
      mla-zoo did not write is never deleted, whatever the flags say.

    Also removes the temporary directories that killed runs left next to `out` (`remove_stale`).
    Messages name the settings `field` that gave `out`.
    """
    out = Path(out)
    resolved = out.expanduser().resolve()
    for name, value in (inputs or {}).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None or not Path(item).expanduser().exists():
                continue  # a Hub id, a bundled name, a glob: nothing on disk at that path to protect
            source = Path(item).expanduser().resolve()
            if _is_within(source, resolved):
                where = "is" if source == resolved else "holds"
                raise SettingsError(f"`{field}` {out} {where} the `{name}` {item}: writing there would destroy it; "
                                    "choose another output directory")
    markers = (marker,) if isinstance(marker, str) else marker
    if resolved.is_file() or (out.is_symlink() and not out.is_dir()):
        raise SettingsError(f"`{field}` {out} is a file, not a directory: mla-zoo never replaces it; "
                            "choose another output directory")
    if resolved.is_dir() and any(resolved.iterdir()):
        if not any((resolved / m).exists() for m in markers):
            raise SettingsError(f"`{field}` {out} is a directory that mla-zoo did not write (it holds no "
                                f"{' or '.join(markers)}): mla-zoo replaces only its own output; choose "
                                "another output directory, or empty this one yourself")
        if not overwrite:
            raise SettingsError(f"`{field}` {out} already exists; pass `overwrite` to replace it")
    remove_stale(out)
    return out


# ----------------------------------------------------------------------------- atomic writes
#
# A directory is written into a hidden sibling `.NAME.tmp-PID@HOST-XXXXXXXX` and renamed into place
# when complete. Should the process be killed, the next run of a command that writes NAME removes
# the leftovers of processes of this host that are no longer running (`remove_stale`).

HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _temp_name(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}@{HOST}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: keep its files
    return True


def remove_stale(target: str | Path) -> list[Path]:
    """Remove the temporary files and directories that killed runs of this host left for `target`
    (`.NAME.tmp-PID@HOST-*`, `.NAME.old-PID@HOST`), when process PID is no longer running."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)@{re.escape(HOST)}(?:-.*)?")
    removed = []
    for path in target.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m is None or _running(int(m[1])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def replace_directory(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing what is there, never leaving half of either."""
    if target.exists():
        old = target.with_name(_temp_name(target, "old"))
        os.replace(target, old)
        os.replace(new, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(new, target)


def temp_dir(target: str | Path) -> Path:
    """A new empty hidden directory next to `target`, named so that `remove_stale(target)` removes it
    once this process is gone (after stale ones of killed runs are removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(target, "tmp") + "-", dir=target.parent))
    os.chmod(tmp, 0o755)
    return tmp


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Write a directory all or nothing: yields an empty sibling temp dir that becomes `target` on success.

    On an exception the temp dir is removed and `target` is untouched (a kill -9 leaves the temp
    dir, removed by the next run). `keep_existing`: if `target` appeared meanwhile (a concurrent
    run finished first), keep it and drop this one.
    """
    target = Path(target)
    tmp = temp_dir(target)
    try:
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
    tmp = path.with_name(_temp_name(path, "tmp"))
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def parse_json(text: str, path: str | Path):
    """JSON text read from `path`; a decoding error names the file (a cut-off file is the usual cause)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MlaZooError(f"{path} is not valid JSON ({e}): the file is cut off or corrupt, e.g. by an "
                          "interrupted write; restore it, or write its directory again") from None


def read_json(path: str | Path) -> dict:
    """A JSON file's content; {} when it does not exist."""
    path = Path(path)
    return parse_json(path.read_text(encoding="utf-8"), path) if path.is_file() else {}


def check_json_files(directory: str | Path) -> None:
    """Every .json file at the top of a checkpoint directory parses (MlaZooError naming the first that
    does not): libraries that read them report a cut-off tokenizer.json without naming the file."""
    directory = Path(directory)
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            read_json(path)


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
        what = "a directory, not a file" if path.is_dir() else "a file that does not exist"
        raise SettingsError(f"`{field}` names {what}: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SettingsError(f"`{field}` names an empty file: {path} is empty")
    return text


SYNTH_SHARD_GLOB = "shard-*.safetensors"  # the shards `mla-zoo synth-data` writes (token ids), in order by name


def synth_shards(directory: str | Path) -> list[Path]:
    """The shards of a `mla-zoo synth-data` directory, in order (empty: not such a directory)."""
    return sorted(Path(directory).glob(SYNTH_SHARD_GLOB))


# ----------------------------------------------------------------------------- progress


def is_main_process() -> bool:
    """RANK 0, or a single process (torchrun and accelerate launch set RANK for each process)."""
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar on stderr, shown only when stderr is a terminal (and `enabled`): logs
    that are files or pipes get no bar lines."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, **kwargs)
