"""Builds the onnxruntime custom-op library (`libmla_zoo_ort_ops.so`) with CMake, and finds it.

`BuildSettings(cuda=True)` (`mla-zoo build-kernels --cuda`) adds the CUDA kernels to the same library
(registered for CUDAExecutionProvider; the CUDA runtime linked statically, so the library still loads
without a GPU) and builds the standalone harness `mla_zoo_cuda_harness` beside it; it needs nvcc.
`build_emulation()` is for tests without a GPU: the CUDA kernels and their onnxruntime glue compiled
as C++ for the CPU (export/kernels/cuda_emulation.h), registered for the CPU provider; it is never
returned by `get_library_path()`.

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
SOURCES = ("CMakeLists.txt", "mla_attention.cc", "mla_attention_common.h", "mla_attention_ort.h",
           "mla_attention_cuda.h", "mla_attention_cuda.cc", "mla_attention_cuda.cu", "mla_attention_cuda_warps.cuh",
           "cuda_harness.cu", "cuda_emulation.h")
LIBRARY_NAME = "libmla_zoo_ort_ops.so"
HARNESS_NAME = "mla_zoo_cuda_harness"
VARIANTS = ("cpu", "cuda", "cuda-emulation")  # MlaZooHasCuda() of each: 0, 1, 2
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
    cuda: bool = setting(False, help="also build the CUDA kernels (CUDAExecutionProvider, in the same library) and "
                                     "the standalone harness mla_zoo_cuda_harness; needs nvcc (CUDA >= 12)")
    force: bool = setting(False, help="rebuild even if a library for these sources exists")
    quiet: bool = setting(True, help="hide cmake's output unless it fails")


@dataclass
class BuildReport:
    library: str
    ort_include: str
    source_hash: str
    rebuilt: bool
    variant: str = "cpu"  # cpu, cuda or cuda-emulation
    harness: str | None = None  # the standalone CUDA harness (cuda and cuda-emulation builds)


def cache_root() -> Path:
    """The mla-zoo cache: the rule of mla_zoo.modeling.sources.cache_dir, kept here so that finding the
    library does not import torch (an onnxruntime-only process stays small)."""
    return Path(os.environ.get("MLA_ZOO_CACHE", Path.home() / ".cache" / "mla-zoo"))


ISAS = ("native", "avx2", "portable")


def source_hash(isa: str = "native", variant: str = "cpu") -> str:
    h = hashlib.sha256(isa.encode())
    if variant != "cpu":  # (the CPU build's hash is unchanged by the variant's introduction)
        h.update(variant.encode())
    for name in SOURCES:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def library_dir(isa: str = "native", variant: str = "cpu") -> Path:
    return cache_root() / "kernels" / source_hash(isa, variant)


def get_library_path(cuda: bool | None = None) -> str:
    """The path of the kernel library built from the current sources, for
    `SessionOptions.register_custom_ops_library`: the best instruction set first (native, avx2,
    portable), and for each a build with the CUDA kernels (it holds the CPU kernels too) before a
    CPU-only one; cuda=True: only builds with the CUDA kernels, cuda=False: only CPU-only builds.
    Raises KernelLibraryNotBuilt if there is none."""
    variants = {None: ("cuda", "cpu"), True: ("cuda",), False: ("cpu",)}[cuda]
    for isa in ISAS:
        for variant in variants:
            lib = library_dir(isa, variant) / LIBRARY_NAME
            if lib.is_file():
                return str(lib)
    if cuda:
        raise KernelLibraryNotBuilt("the mla_zoo kernel library with CUDA kernels is not built for these sources: "
                                    "build it with `mla-zoo build-kernels --cuda` (needs nvcc)")
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


NVCC_FALLBACKS = ("/usr/local/cuda/bin/nvcc",)


def find_nvcc() -> str:
    """nvcc from $CUDACXX, PATH or /usr/local/cuda/bin; a KernelBuildError saying so when there is none."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), *NVCC_FALLBACKS):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise KernelBuildError("the CUDA kernels need nvcc (the CUDA toolkit, >= 12): none on $CUDACXX, PATH or "
                           "/usr/local/cuda/bin; build without --cuda for the CPU kernels only")


def check_library(path: Path, variant: str = "cpu") -> None:
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
    if lib.MlaZooHasCuda() != VARIANTS.index(variant):
        raise KernelBuildError(f"{path} reports CUDA mode {lib.MlaZooHasCuda()}, expected a {variant} build")


def build_kernels(settings: BuildSettings | None = None) -> BuildReport:
    """Builds the library for the current sources (cached); returns where it is."""
    settings = settings or BuildSettings()
    return _build(settings.isa, "cuda" if settings.cuda else "cpu", settings.ort_include, settings.force,
                  settings.quiet)


def build_emulation(isa: str = "native", force: bool = False) -> BuildReport:
    """Tests only: the CUDA kernels and their onnxruntime glue compiled for the CPU (cuda_emulation.h),
    registered for CPUExecutionProvider, and the harness likewise. Needs no GPU and no nvcc."""
    return _build(isa, "cuda-emulation", None, force, True)


def _build(isa: str, variant: str, ort_include: str | None, force: bool, quiet: bool) -> BuildReport:
    if isa not in ISAS:
        raise KernelBuildError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    out_dir = library_dir(isa, variant)
    lib = out_dir / LIBRARY_NAME
    harness = str(out_dir / HARNESS_NAME) if variant != "cpu" else None
    if lib.is_file() and not force:  # up to date: no headers needed (a library built elsewhere and copied in)
        known = ort_include or os.environ.get("MLA_ZOO_ORT_INCLUDE") or cache_root() / "ort-headers-trixie"
        include = known if (Path(known) / HEADER).is_file() else ""
        return BuildReport(str(lib), str(include), source_hash(isa, variant), False, variant, harness)
    include = find_headers(ort_include)
    if shutil.which("cmake") is None:
        raise KernelBuildError(f"cmake is not installed: {BUILD_HINT}")
    options = []
    if variant == "cuda":
        options = ["-DMLA_ZOO_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={find_nvcc()}"]
    elif variant == "cuda-emulation":
        options = ["-DMLA_ZOO_CUDA_EMULATION=ON"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mla-zoo-build-", dir=out_dir.parent) as tmp:
        build = Path(tmp)
        _run(["cmake", "-S", str(SOURCE_DIR), "-B", str(build), f"-DORT_INCLUDE_DIR={include}",
              f"-DMLA_ZOO_ISA={isa}", "-DCMAKE_BUILD_TYPE=Release", *options], quiet=quiet)
        _run(["cmake", "--build", str(build), "--parallel", "2"], quiet=quiet)
        built = build / LIBRARY_NAME
        if not built.is_file():
            raise KernelBuildError(f"cmake finished but {LIBRARY_NAME} is missing")
        check_library(built, variant)
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        shutil.copy2(built, staging / LIBRARY_NAME)
        if harness:
            shutil.copy2(build / HARNESS_NAME, staging / HARNESS_NAME)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    return BuildReport(str(lib), str(include), source_hash(isa, variant), True, variant, harness)
