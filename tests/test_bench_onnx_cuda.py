"""bench/onnx_cuda.py's bindings, run on the CPU before they cost GPU minutes: the script binds every tensor with
IOBinding (version 2: each present bound to its past's buffer), times the op alone in both versions and reads the
node placement from onnxruntime's profile. Here its DEVICE is "cpu", its providers the CPU one and its kernel
library the CPU build, on a tiny fp16 export of each cache form."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from mla_zoo.export import exporter  # noqa: E402
from mla_zoo.export.kernels import build  # noqa: E402
from test_onnx_export import tiny_mla  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after the tests: no bench file shadows one
import onnx_cuda  # noqa: E402


@pytest.fixture(scope="module")
def on_cpu():
    """onnx_cuda with its tensors, providers and kernel library on the CPU."""
    saved = onnx_cuda.DEVICE, onnx_cuda.PROVIDERS, build.get_library_path
    library = build.build_kernels().library
    onnx_cuda.DEVICE, onnx_cuda.PROVIDERS = "cpu", ["CPUExecutionProvider"]
    build.get_library_path = lambda cuda=None: library
    yield onnx_cuda
    onnx_cuda.DEVICE, onnx_cuda.PROVIDERS, build.get_library_path = saved


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    model = tiny_mla().half()
    root = tmp_path_factory.mktemp("bench_onnx_cuda")
    return {name: Path(exporter.export_model(model, root / name, dtype="fp16",
                                             shared_cache=name == "shared").output_dir)
            for name in ("growing", "shared")}


def test_both_cache_forms_decode_bound_and_the_shared_one_in_place(on_cpu, exports):
    sessions = {name: on_cpu.model_session(path, True) for name, path in exports.items()}
    rows = on_cpu.decode_points(sessions, past=40, batch=2, steps=4, rounds=2)
    assert all("ms_median" in rows[name] and rows[name]["tokens_per_s"] > 0 for name in sessions), rows
    # the shared-cache binding: every present is its past's buffer, so a step writes into the buffers it was given
    session = sessions["shared"]
    shapes = {i.name: [2, 1, 41, i.shape[3]] for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    ints = {"input_ids": np.zeros((2, 1), np.int64), "attention_mask": np.ones((2, 41), np.int64),
            "position_ids": np.full((2, 1), 40, np.int64), "past_length": np.array([40], np.int64)}
    binding, keep = on_cpu.bound_step(session, shapes, ints)
    before = {name: v.numpy().copy() for name, v in zip(shapes, keep[len(ints):], strict=True)}
    session.run_with_iobinding(binding)
    after = {name: v.numpy() for name, v in zip(shapes, keep[len(ints):], strict=True)}
    for name in shapes:  # rows 0..39 kept, row 40 written by the step
        np.testing.assert_array_equal(after[name][:, :, :40], before[name][:, :, :40])
        assert not np.array_equal(after[name][:, :, 40], before[name][:, :, 40]), name


def test_the_op_alone_counts_its_bytes_and_binds_version_2_in_place(on_cpu):
    v1 = on_cpu.kernel_point(64, 2, 3)
    v2 = on_cpu.kernel_point(64, 2, 3, shared_cache=True)
    row = 2 * 2 * (96 + 24)  # bytes of one cached token over the batch, fp16 at SmolLM2-MLA's dims
    assert (v1["bytes"], v2["bytes"]) == (2 * 64 * row, 64 * row + row)
    assert v1["ms_median"] > 0 and v2["gb_per_s"] > 0
    # version 2's node is bound in place: its presents are its past buffers (the node's own names), so the step
    # writes the new row into the buffer it was given
    so = ort.SessionOptions()
    so.register_custom_ops_library(build.get_library_path())
    session = ort.InferenceSession(on_cpu.node_model(shared_cache=True), so, providers=["CPUExecutionProvider"])
    shapes = on_cpu.node_shapes(2, 9)
    ints = {"attention_mask": np.ones((2, 9), np.int64), "past_length": np.array([8], np.int64)}
    binding, keep = on_cpu.bound_step(session, shapes, ints)
    past_latent, latent = keep[len(ints) + 3], keep[len(ints) + 1]
    before = past_latent.numpy().copy()
    session.run_with_iobinding(binding)
    np.testing.assert_array_equal(past_latent.numpy()[:, :, :8], before[:, :, :8])
    np.testing.assert_array_equal(past_latent.numpy()[:, 0, 8], latent.numpy()[:, 0])  # the new latent row, in place


def test_placement_lists_every_op_type_on_its_provider(on_cpu, exports):
    placed = on_cpu.placement(exports["shared"], True)
    assert placed["MultiHeadLatentAttention"] == ["CPUExecutionProvider"]
    assert placed["SimplifiedLayerNormalization"] == ["CPUExecutionProvider"]  # the norms fused
    assert {"MatMul", "Gather"} <= set(placed)
