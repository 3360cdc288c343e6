"""Builds the onnxruntime custom-op library (`libmla_zoo_ort_ops.so`) with CMake, and finds it.

No pip wheel ships onnxruntime's C/C++ headers, so the build takes them from Debian trixie's
`libonnxruntime-dev` (1.21; a library built on them loads in onnxruntime 1.21 to 1.32): the .deb is
downloaded with `apt-get download` against a private package list and unpacked, never installed.
Elsewhere, point `MLA_ZOO_ORT_INCLUDE` (or `BuildSettings.ort_include`) at any onnxruntime >= 1.17
include directory. Everything lands under the mla-zoo cache (`$MLA_ZOO_CACHE`, default
~/.cache/mla-zoo): headers in `ort-headers-<version>/`, the library in `kernels/<source hash>/`, so
a changed kernel source is rebuilt and a stale library is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mla_zoo.modeling.common import MlaZooError
from mla_zoo.modeling.schema import Settings, setting

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("CMakeLists.txt", "mla_attention.cc")
LIBRARY_NAME = "libmla_zoo_ort_ops.so"
DEBIAN_SUITE = "trixie"
DEBIAN_PACKAGE = "libonnxruntime-dev"
HEADER = "onnxruntime_lite_custom_op.h"
BUILD_HINT = "build it with `mla-zoo build-kernels` (needs cmake, a C++17 compiler and, for the headers, apt-get)"


class KernelBuildError(MlaZooError):
    """The library could not be built; the message says what is missing."""


class KernelLibraryNotBuilt(MlaZooError, FileNotFoundError):
    """get_library_path() found no library built from the current sources."""


@dataclass
class BuildSettings(Settings):
    ort_include: str | None = setting(None, path="dir", help="an onnxruntime include dir with "
                                      "onnxruntime_lite_custom_op.h (default: $MLA_ZOO_ORT_INCLUDE, else Debian "
                                      "trixie's libonnxruntime-dev, downloaded once)")
    isa: str = setting("native", choices=("native", "avx2", "portable"),
                       help="native (-march=native: AVX-512 / AVX2 kernels where this CPU has them), avx2 or portable")
    force: bool = setting(False, help="rebuild even if a library for these sources exists")
    quiet: bool = setting(True, help="hide cmake's output unless it fails")


@dataclass
class BuildReport:
    library: str
    ort_include: str
    source_hash: str
    rebuilt: bool


def cache_root() -> Path:
    """The mla-zoo cache: the rule of mla_zoo.modeling.sources.cache_dir, kept here so that finding the
    library does not import torch (an onnxruntime-only process stays small)."""
    return Path(os.environ.get("MLA_ZOO_CACHE", Path.home() / ".cache" / "mla-zoo"))


ISAS = ("native", "avx2", "portable")


def source_hash(isa: str = "native") -> str:
    h = hashlib.sha256(isa.encode())
    for name in SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def library_dir(isa: str = "native") -> Path:
    return cache_root() / "kernels" / source_hash(isa)


def get_library_path() -> str:
    """The path of the kernel library built from the current sources, for
    `SessionOptions.register_custom_ops_library`. Raises KernelLibraryNotBuilt if there is none."""
    for isa in ISAS:
        lib = library_dir(isa) / LIBRARY_NAME
        if lib.is_file():
            return str(lib)
    raise KernelLibraryNotBuilt(f"the mla_zoo onnxruntime kernel library is not built for these sources: {BUILD_HINT}")


# ----------------------------------------------------------------------------------------------
# Headers
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None, quiet: bool = True) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=quiet, text=True)
    except FileNotFoundError as e:
        raise KernelBuildError(f"`{cmd[0]}` is not installed: {BUILD_HINT}") from e
    if proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:]
        raise KernelBuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")


def download_headers(dest: Path) -> Path:
    """Downloads Debian trixie's libonnxruntime-dev with apt-get (private lists, nothing installed),
    unpacks its include dir to `dest`; returns the dir holding the headers."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise KernelBuildError(
            "the onnxruntime C++ headers come from Debian's libonnxruntime-dev, which needs apt-get and dpkg-deb; "
            "on other systems set MLA_ZOO_ORT_INCLUDE to an onnxruntime (>= 1.17) include directory")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    with tempfile.TemporaryDirectory(prefix="mla-zoo-apt-") as tmp:
        t = Path(tmp)
        (t / "sources").mkdir()
        (t / "lists" / "partial").mkdir(parents=True)
        (t / "cache" / "archives" / "partial").mkdir(parents=True)
        signed = f"Signed-By: {keyring}\n" if keyring.exists() else "Trusted: yes\n"
        (t / "sources" / "trixie.sources").write_text(
            f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {DEBIAN_SUITE}\nComponents: main\n{signed}")
        opts = [
            "-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={t / 'sources'}",
            "-o", f"Dir::State::Lists={t / 'lists'}", "-o", f"Dir::Cache={t / 'cache'}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Sandbox::User=root", "-qq",
        ]
        _run(["apt-get", *opts, "update"])
        _run(["apt-get", *opts, "download", DEBIAN_PACKAGE], cwd=t)
        debs = sorted(t.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise KernelBuildError(f"apt-get download {DEBIAN_PACKAGE} produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(t / "x")])
        include = t / "x" / "usr" / "include" / "onnxruntime"
        if not (include / HEADER).is_file():
            raise KernelBuildError(f"{debs[0].name} has no {HEADER}")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(include, staging)
        (staging / "SOURCE").write_text(debs[0].name + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)  # atomic: a half-copied header dir is never used
    return dest


def find_headers(ort_include: str | None = None) -> Path:
    """The onnxruntime include dir: the argument, $MLA_ZOO_ORT_INCLUDE, or trixie's (downloaded once)."""
    given = ort_include or os.environ.get("MLA_ZOO_ORT_INCLUDE")
    if given:
        if not (Path(given) / HEADER).is_file():
            raise KernelBuildError(f"{given} has no {HEADER}")
        return Path(given)
    dest = cache_root() / "ort-headers-trixie"
    if (dest / HEADER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    return download_headers(dest)


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def check_library(path: Path) -> None:
    """The built library loads, has the onnxruntime entry point, and implements this op version."""
    import ctypes

    from ..contract import OP_VERSION

    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildError(f"{path} does not load: {e}") from e
    if not hasattr(lib, "RegisterCustomOps"):
        raise KernelBuildError(f"{path} has no RegisterCustomOps entry point")
    if lib.MlaZooOpVersion() != OP_VERSION:
        raise KernelBuildError(
            f"{path} implements op version {lib.MlaZooOpVersion()}, the exporter writes {OP_VERSION}")


def build_kernels(settings: BuildSettings | None = None) -> BuildReport:
    """Builds the library for the current sources (cached); returns where it is."""
    settings = settings or BuildSettings()
    if settings.isa not in ISAS:
        raise KernelBuildError(f"isa must be one of {', '.join(ISAS)}, got {settings.isa!r}")
    out_dir = library_dir(settings.isa)
    lib = out_dir / LIBRARY_NAME
    include = find_headers(settings.ort_include)
    if lib.is_file() and not settings.force:
        return BuildReport(str(lib), str(include), source_hash(settings.isa), rebuilt=False)
    if shutil.which("cmake") is None:
        raise KernelBuildError(f"cmake is not installed: {BUILD_HINT}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mla-zoo-build-", dir=out_dir.parent) as tmp:
        build = Path(tmp)
        _run(["cmake", "-S", str(SOURCE_DIR), "-B", str(build), f"-DORT_INCLUDE_DIR={include}",
              f"-DMLA_ZOO_ISA={settings.isa}", "-DCMAKE_BUILD_TYPE=Release"],
             quiet=settings.quiet)
        _run(["cmake", "--build", str(build), "--parallel", "2"], quiet=settings.quiet)
        built = build / LIBRARY_NAME
        if not built.is_file():
            raise KernelBuildError(f"cmake finished but {LIBRARY_NAME} is missing")
        check_library(built)
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        shutil.copy2(built, staging / LIBRARY_NAME)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    return BuildReport(str(lib), str(include), source_hash(settings.isa), rebuilt=True)
