"""The CUDA kernel of MultiHeadLatentAttention where there is no GPU (CI):

* its source (export/kernels/mla_attention_cuda.cu) and onnxruntime glue (mla_attention_cuda.cc),
  compiled for the CPU through export/kernels/cuda_emulation.h (GPU threads as fibers with real
  barriers, WMMA done by one lane with the real API's alignment checks) and registered for the CPU
  provider, run through onnxruntime against the torch reference: node cases in float32 and float16,
  and a tiny exported model over a prefill and 16 decode steps against PyTorch;
* the standalone harness (cuda_harness.cu), emulated, against its float64 reference, both float16
  paths (tensor cores and CUDA cores) and both attend kernels (blocks, warps); the emulation's own
  tensor-core primitives (ldmatrix, mma.m16n8k16) against the PTX ISA's fragment layouts;
* with nvcc: the real CUDA build compiles and links into the same library as the CPU kernels, loads
  without a GPU, and its CPU kernels stay exact; without nvcc, a clear build error.
On the GPU machine tests/test_onnx_cuda_gpu.py runs the real thing (bench/ort_cuda_gpu.sh)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mla_zoo.export import exporter, op, runner  # noqa: E402
from mla_zoo.export.kernels import build  # noqa: E402
from onnx import TensorProto  # noqa: E402
from test_onnx_export import PROMPTS, left_padded, three_way_logits, tiny_mla, torch_logits  # noqa: E402
from test_onnx_kernel import CASES, in_buffer, node_model, random_case  # noqa: E402


@pytest.fixture(scope="module")
def emulated():
    """The emulation build: CUDA kernels + glue for the CPU provider, and the emulated harness."""
    return build.build_emulation()


def emulated_session(model: bytes | str, library: str):
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CASES)
def test_emulated_cuda_kernel_matches_the_reference_through_onnxruntime(case, dtype, emulated):
    inputs, attrs = random_case(*CASES[case], seed=3)
    if dtype == "float16":
        inputs = {k: (v.half() if v.is_floating_point() else v) for k, v in inputs.items()}
    ref = [t.float().numpy() for t in op.reference(*inputs.values(), **attrs)]  # fp32 math on the same inputs
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    session = emulated_session(node_model(attrs, elem), emulated.library)
    out, present_latent, present_key_rope = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(present_latent.astype(np.float32), ref[1])  # a copy: exact
    if dtype == "float32":
        np.testing.assert_allclose(out, ref[0], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(present_key_rope, ref[2], atol=1e-6, rtol=1e-6)
    else:  # tensor cores: queries and probabilities rounded to fp16 on the way in
        rel = np.abs(out.astype(np.float32) - ref[0]).max() / np.abs(ref[0]).max()
        assert rel < 1e-2, rel
        np.testing.assert_array_equal(present_key_rope.astype(np.float32), ref[2])  # same fp32 rotation, rounded


@pytest.mark.parametrize("case, dtype", [("decode-long-past", "float32"), ("decode-long-past", "float16"),
                                         ("chunked-prefill", "float32")])
def test_emulated_cuda_kernel_runs_the_shared_cache_version(case, dtype, emulated):
    """Op version 2 (one buffer, past_length in CPU memory): a present of its own (the buffer copied on the stream
    first) and one bound buffer (only the new rows written) give version 1's reference."""
    inputs, attrs, feed = in_buffer(case, spare=5)
    p, s = CASES[case][2], CASES[case][1]
    if dtype == "float16":
        inputs = {k: (v.half() if v.is_floating_point() else v) for k, v in inputs.items()}
        feed = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in feed.items()}
    want = [t.float().numpy() for t in op.reference(*inputs.values(), **attrs)]
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    session = emulated_session(op.node_model(attrs, elem, shared_cache=True).SerializeToString(), emulated.library)

    def check(out, lat):
        if dtype == "float32":
            np.testing.assert_allclose(out, want[0], atol=2e-5, rtol=1e-4)
        else:
            assert np.abs(out.astype(np.float32) - want[0]).max() / np.abs(want[0]).max() < 1e-2
        np.testing.assert_array_equal(lat[:, :, : p + s].astype(np.float32), want[1])
        np.testing.assert_array_equal(lat[:, :, p + s:], feed["past_latent"][:, :, p + s:])

    out, lat, _ = session.run(None, feed)
    check(out, lat)
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(v.copy()) for name, v in feed.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("output")
    binding.bind_ortvalue_output("present_latent", values["past_latent"])
    binding.bind_ortvalue_output("present_key_rope", values["past_key_rope"])
    session.run_with_iobinding(binding)
    check(binding.get_outputs()[0].numpy(), values["past_latent"].numpy())


def test_emulated_cuda_kernel_reports_bad_shapes_like_the_cpu_kernel(emulated):
    inputs, attrs = random_case(*CASES["chunked-prefill"])
    feed = {k: v.numpy() for k, v in inputs.items()}
    session = emulated_session(node_model(attrs), emulated.library)
    bad = dict(feed, attention_mask=feed["attention_mask"][:, 1:])
    with pytest.raises(Exception, match=r"input 'attention_mask' has shape \[2, 14\], expected \[2, 15\]"):
        session.run(None, bad)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_emulated_cuda_kernel_runs_a_tiny_export_like_pytorch(dtype, emulated, tmp_path):
    """The whole decoder: prefill with left padding, then 16 decode steps, the op on the CUDA kernel's
    code path (emulated); logits against PyTorch (fp32)."""
    reference = tiny_mla()  # fp32
    model = tiny_mla().half() if dtype == "fp16" else tiny_mla()
    report = exporter.export_model(model, tmp_path / dtype, dtype=dtype)
    decoder = runner.OnnxDecoder(report.output_dir, use_kernels=False)
    decoder.session = emulated_session(report.model_path, emulated.library)
    worst = three_way_logits(reference, {"emulated-cuda": decoder}, PROMPTS, decode_steps=16)
    if dtype == "fp32":
        assert worst["emulated-cuda"] < 1e-3, worst
    else:
        scale = float(np.abs(torch_logits(reference, *left_padded(PROMPTS))).max())
        assert worst["emulated-cuda"] / scale < 1e-2, (worst, scale)


def test_emulated_harness_passes_against_its_float64_reference(emulated):
    proc = subprocess.run([emulated.harness, "--quick"], capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = [r for r in rows if "case" in r]
    failed = [r for r in checks if not r["ok"]]
    assert proc.returncode == 0 and not failed, failed or proc.stderr[-2000:]
    # every path ran: float32, float16 on tensor cores and on CUDA cores; split caches and row blocks
    assert {(r["dtype"], r["tensor_cores"]) for r in checks} == {
        ("float32", False), ("float16", True), ("float16", False)}
    assert any(r["splits"] > 1 for r in checks) and any(r["row_blocks"] > 1 for r in checks)
    # both attend kernels on float16 decode; the warps kernel with one split (W_uv in its epilogue) and
    # several, several row blocks, synchronous loads and rings of 2 to 4 tiles, 2 to 8 warps
    decode = [r for r in checks if r["tensor_cores"] and r["row_blocks"] == 1]
    assert {r["kernel"] for r in decode} == {"blocks", "warps"}
    warps = [r for r in checks if r["kernel"] == "warps"]
    assert {r["splits"] > 1 for r in warps} == {True, False} and any(r["row_blocks"] > 1 for r in warps)
    assert {r["ring"] for r in warps} == {1, 2, 3, 4} and {r["threads"] for r in warps} == {64, 128, 256}
    assert {"decode-r112", "decode-past0", "decode-batch1-mqa"} <= {r["case"] for r in warps}
    # 16-, 32- and 64-slot warp tiles; the register-capped build (queries from shared memory) with 4 and 8
    # warps, split caches and row blocks; where r16 > 96 it has no capped build and runs the built-in one
    assert {r["block_n"] for r in warps} == {16, 32, 64}
    capped = [r for r in warps if r["max_registers"] == 128]
    assert {r["threads"] for r in capped} == {128, 256} and {r["block_n"] for r in capped} == {16, 32}
    assert any(r["splits"] > 1 for r in capped) and any(r["row_blocks"] > 1 for r in capped)
    assert {r["max_registers"] for r in warps if r["case"] == "decode-r112"} == {0}
    assert "decode-12-heads-per-group" in {r["case"] for r in checks}  # G > kPrepHeads: prepare's head chunks
    assert [r["ok"] for r in rows if r.get("check") == "fragments"] == [True]
    assert rows[-1] == {"summary": True, "checks": len(checks) + 1, "failed": 0}


def test_emulated_tensor_core_primitives_follow_the_ptx_fragment_layouts(emulated):
    """The emulation of ldmatrix x4 / x4.trans and mma.m16n8k16 (cuda_emulation.h), through the kernel
    file's own wrappers, against the PTX ISA's fragment layouts and a plain matrix product (the same
    check on a GPU tests the hardware: `mla_zoo_cuda_harness --fragments`)."""
    proc = subprocess.run([emulated.harness, "--fragments"], capture_output=True, text=True, timeout=60)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and rows[-1] == {"check": "fragments", "error": "", "ok": True}, proc.stdout


def test_emulated_harness_sweep_configurations_pass_their_checks(emulated):
    """Every launch configuration the GPU sweep times (block_n, split targets, threads, cp.async ring
    depth: what the MLA_ZOO_CUDA_* variables set) is first checked against the float64 reference."""
    proc = subprocess.run([emulated.harness, "--sweep-checks"], capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    configs = [r for r in rows if r.get("sweep") == "check"]
    assert proc.returncode == 0 and configs and all(r["ok"] for r in configs), [r for r in configs if not r.get("ok")]
    assert rows[-1] == {"summary": "sweep-checks", "configs": len(configs), "failed_checks": 0}
    cases = [r for r in rows if "case" in r]
    assert {r["ring"] for r in cases} == {1, 2, 3, 4}  # synchronous loads, double, triple, quadruple buffering
    assert {r["kernel"] for r in cases} == {"blocks", "warps"}
    # the warps kernel's 16-slot tiles and its register-capped build (4 and 8 warps) are timed on the GPU too
    warps = [r for r in cases if r["kernel"] == "warps"]
    assert {r["block_n"] for r in warps} == {16, 32, 64}
    assert {r["threads"] for r in warps if r["max_registers"] == 128} == {128, 256}
    assert any(r["config"].endswith("-cap128") for r in configs)


def test_emulation_is_never_the_library_onnxruntime_is_given(emulated, tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_ZOO_CACHE", str(tmp_path))
    target = build.library_dir("native", "cuda-emulation")
    target.mkdir(parents=True)
    shutil.copy(emulated.library, target / build.LIBRARY_NAME)
    with pytest.raises(build.KernelLibraryNotBuilt):
        build.get_library_path()


# ----------------------------------------------------------------------------------------------
# The real CUDA build (nvcc), without a GPU
# ----------------------------------------------------------------------------------------------


def have_nvcc() -> bool:
    try:
        build.find_nvcc()
        return True
    except build.KernelBuildError:
        return False


@pytest.fixture(scope="module")
def cuda_build():
    if not have_nvcc():
        pytest.skip("no nvcc: the CUDA build is tested where the CUDA toolkit is installed")
    return build.build_kernels(build.BuildSettings(cuda=True))


def test_cuda_library_builds_links_and_loads_without_a_gpu(cuda_build):
    lib = ctypes.CDLL(cuda_build.library)
    assert lib.MlaZooHasCuda() == 1 and lib.MlaZooOpVersion() == op.OP_VERSION
    assert build.get_library_path(cuda=True) == cuda_build.library
    undefined = subprocess.run(["nm", "-D", "--undefined-only", cuda_build.library], capture_output=True, text=True)
    assert "cudart" not in undefined.stdout and "cudaLaunch" not in undefined.stdout  # the runtime is static
    # the harness is built beside it; on a machine without a GPU it says so and exits 3
    proc = subprocess.run([cuda_build.harness, "--quick"], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        assert "no CUDA device" in proc.stderr
    else:  # a GPU is there after all: then it must pass
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("case", ["prefill", "decode-long-past"])
def test_cuda_library_keeps_the_cpu_kernel_exact(case, cuda_build):
    """The library with the CUDA kernels registered: a CPU session still runs the CPU kernel."""
    inputs, attrs = random_case(*CASES[case])
    ref = [t.numpy() for t in op.reference(*inputs.values(), **attrs)]
    got = emulated_session(node_model(attrs), cuda_build.library).run(None, {k: v.numpy() for k, v in inputs.items()})
    for name, a, b in zip(op.OUTPUTS, got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


def test_a_cuda_build_without_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    """The real headers and the real cmake, alone on PATH: no nvcc there, nor on $CUDACXX or the fallbacks."""
    headers = build.find_headers()  # the cached onnxruntime headers (the CPU build has them)
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the kernels"
    path = tmp_path / "bin"
    path.mkdir()
    (path / "cmake").symlink_to(cmake)
    monkeypatch.setenv("MLA_ZOO_CACHE", str(tmp_path / "cache"))  # no CUDA library built for these sources
    monkeypatch.setenv("MLA_ZOO_ORT_INCLUDE", str(headers))
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.setenv("PATH", str(path))
    monkeypatch.setattr(build, "NVCC_FALLBACKS", ())  # /usr/local/cuda/bin/nvcc, where the toolkit is installed
    with pytest.raises(build.KernelBuildError, match="need nvcc"):
        build.build_kernels(build.BuildSettings(cuda=True))


def test_runner_refuses_cuda_without_onnxruntime_gpu(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(Exception, match="needs onnxruntime-gpu"):
        runner.OnnxDecoder(tmp_path, device="cuda")
