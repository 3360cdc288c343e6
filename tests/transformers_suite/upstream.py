"""transformers' own test files, at the INSTALLED transformers version, importable as upstream expects.

The wheel ships `transformers.testing_utils` but no test files, and we commit none. They come from:

1. The PyPI sdist of `transformers==<installed version>` (fetched with `pip download`, the one route CI
   has): `tests/test_modeling_common.py` (ModelTesterMixin), `tests/test_configuration_common.py`
   (ConfigTester) and the other top-level `tests/*.py`. Cached once per version under
   `$MLA_ZOO_CACHE/transformers-tests/<version>/tests/` (default `~/.cache/mla-zoo`).
2. The sdist has no subfolders, and `test_modeling_common.py` imports two of them:
   `tests/generation/test_utils.py` (GenerationTesterMixin) and `tests/exporters/test_export.py`
   (ExportTesterMixin: the torch.export / ONNX export tests). No package on PyPI ships them. They are
   taken from a transformers source tree when `$MLA_ZOO_TRANSFORMERS_SRC` names one (a checkout of
   huggingface/transformers, best at the installed version's tag; its `tests/utils/` also gives
   ConfigTester its `config_common_kwargs`). Without it both mixins are stand-ins that add no tests,
   so ModelTesterMixin still runs at the exact installed version, and the test module reports the
   missing mixins as skipped.

The files form the package `tests`, the name their absolute imports use
(`from tests.exporters.test_export import ...`). The sdist's files come first on its path, so the
top-level modules always match the installed version. Our own tests/ folder is no package; if it
was imported as a namespace package already (`from tests.hub_server import ...`), its path stays
on the package's path, after upstream's, so both kinds of import keep working.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import transformers
from mla_zoo.modeling.sources import cache_dir

PACKAGE = "tests"
SOURCE_ENV = "MLA_ZOO_TRANSFORMERS_SRC"
# Subpackages of upstream's tests/ that `test_modeling_common.py` imports and the sdist lacks.
SUBPACKAGES = ("generation", "exporters")


class UpstreamUnavailable(RuntimeError):
    """The upstream test files cannot be had here (offline, no sdist for this version, ...)."""


@dataclass(frozen=True)
class UpstreamTests:
    version: str  # the installed transformers version; the sdist's files are of exactly this version
    sdist_dir: Path  # the sdist's top-level tests/*.py (cached)
    source_dir: Path | None  # tests/ of $MLA_ZOO_TRANSFORMERS_SRC, or None
    source_version: str | None  # the version that source tree declares
    stand_ins: tuple[str, ...]  # subpackages replaced by empty stand-ins (no source tree given)

    def describe(self) -> str:
        """One line: where each part came from."""
        parts = [f"ModelTesterMixin from the transformers {self.version} sdist"]
        if self.source_dir is not None:
            parts.append(f"generation/exporters tests from {self.source_dir.parent} ({self.source_version})")
        if self.stand_ins:
            parts.append(f"no {'/'.join(self.stand_ins)} tests ({self.missing_reason()})")
        return "; ".join(parts)

    def missing_reason(self) -> str:
        return (
            f"tests/{{{','.join(self.stand_ins)}}}/ of transformers {self.version} are in no PyPI package; "
            f"set {SOURCE_ENV} to a transformers source tree (git checkout) to run them"
        )


def download_sdist_tests(version: str, dest: Path) -> None:
    """Extract the top-level tests/*.py of the transformers sdist into `dest`, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--retries", "1", "--timeout", "20", "--quiet", "--dest", tmp, f"transformers=={version}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UpstreamUnavailable(f"`pip download transformers=={version}` did not run: {e}") from e
        tarballs = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not tarballs:  # pip may fail after saving the file (metadata preparation); the file is enough
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UpstreamUnavailable(f"the transformers {version} sdist could not be downloaded from PyPI: {last}")
        staging = Path(tmp) / "tests"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and re.fullmatch(r"[^/]+/tests/[^/]+\.py", member.name):
                    (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        if not (staging / "test_modeling_common.py").exists():
            raise UpstreamUnavailable(f"the transformers {version} sdist has no tests/test_modeling_common.py")
        (staging / "__init__.py").touch()
        if dest.exists():  # a concurrent run finished first
            return
        os.replace(staging, dest)


def source_tree() -> tuple[Path | None, str | None]:
    """tests/ of $MLA_ZOO_TRANSFORMERS_SRC and the version its src/transformers/__init__.py declares."""
    root = os.environ.get(SOURCE_ENV)
    if not root:
        return None, None
    tests = Path(root).expanduser() / "tests"
    missing = [name for name in SUBPACKAGES if not (tests / name / "__init__.py").exists()]
    if missing:  # asked for and wrong: an error, not a skip
        raise ValueError(f"{SOURCE_ENV}={root} is no transformers source tree: it has no tests/{missing[0]}/")
    init = Path(root).expanduser() / "src" / "transformers" / "__init__.py"
    found = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M) if init.exists() else None
    return tests, found.group(1) if found else "unknown version"


def locate() -> UpstreamTests:
    """Find (downloading once) the upstream test files for the installed transformers."""
    version = transformers.__version__
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise UpstreamUnavailable(f"transformers {version} is no PyPI release, so it has no sdist to take tests from")
    sdist_dir = cache_dir() / "transformers-tests" / version / "tests"
    if not (sdist_dir / "test_modeling_common.py").exists():
        if sdist_dir.exists():  # a broken earlier copy
            shutil.rmtree(sdist_dir)
        download_sdist_tests(version, sdist_dir)
    source_dir, source_version = source_tree()
    stand_ins = () if source_dir is not None else SUBPACKAGES
    return UpstreamTests(version, sdist_dir, source_dir, source_version, stand_ins)


class _StandInGenerationTesterMixin:
    """Stands in for tests/generation/test_utils.py's GenerationTesterMixin: adds no tests."""


class _StandInExportTesterMixin:
    """Stands in for tests/exporters/test_export.py's ExportTesterMixin: adds no tests."""


class _StandInExportGenerateTesterMixin(_StandInExportTesterMixin):
    """Stands in for tests/exporters/test_export.py's ExportGenerateTesterMixin: adds no tests."""


STAND_INS = {
    "generation": {"test_utils": {"GenerationTesterMixin": _StandInGenerationTesterMixin}},
    "exporters": {"test_export": {"ExportTesterMixin": _StandInExportTesterMixin,
                                  "ExportGenerateTesterMixin": _StandInExportGenerateTesterMixin}},
}


def _new_module(name: str, path: list[str] | None) -> types.ModuleType:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
    if path is not None:
        spec.submodule_search_locations = path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module


def install(up: UpstreamTests) -> None:
    """Make `tests` the upstream package (plus stand-ins), keeping any path `tests` already had."""
    ours = [str(up.sdist_dir)] + ([str(up.source_dir)] if up.source_dir is not None else [])
    package = sys.modules.get(PACKAGE)
    if package is None:
        package = _new_module(PACKAGE, list(ours))
    else:
        kept = [p for p in getattr(package, "__path__", []) if p not in ours]
        package.__path__ = ours + kept
    for sub in up.stand_ins:
        sub_module = _new_module(f"{PACKAGE}.{sub}", [])
        setattr(package, sub, sub_module)
        for leaf, classes in STAND_INS[sub].items():
            leaf_module = _new_module(f"{PACKAGE}.{sub}.{leaf}", None)
            for name, cls in classes.items():
                setattr(leaf_module, name, cls)
            setattr(sub_module, leaf, leaf_module)


def load() -> UpstreamTests:
    """Locate, download if needed, and install the upstream test package; raises UpstreamUnavailable."""
    up = locate()
    install(up)
    return up
