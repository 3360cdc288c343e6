"""The Triton absorbed-decode kernel (modeling/remote/mla_decode_triton.py) against its spec.

* `mla_decode_reference` (the spec, plain torch) against a naive per-head float64 loop.
* The kernels against the spec on fresh random inputs at odd sizes (latent 48, 3 KV heads, 2 RoPE
  pairs, 9 query heads, T not a multiple of the tile, strided cache views, left padding, a fully
  masked row, empty splits): on the CPU under TRITON_INTERPRET=1 when triton is installed (fp32 and
  fp16: the interpreter cannot compute in bf16, triton-lang/triton#11584), on CUDA in bf16/fp16/fp32.
* On CUDA: SmolLM2 and Llama-3-8B dims in bf16, torch.compile(fullgraph=True), CUDA-graph replay.
* The file imports without triton, and transformers' remote-code import check accepts it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mla_zoo.modeling.remote import REMOTE_CODE_DIR
from mla_zoo.modeling.remote import mla_decode_triton as kernel
from mla_zoo.modeling.remote.mla_decode_triton import DecodeConfig, mla_decode_reference

KERNEL_FILE = REMOTE_CODE_DIR / "mla_decode_triton.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # set by test_kernels_under_the_triton_interpreter
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON) or INTERPRETER, reason="needs a CUDA device and triton"
)


def make_inputs(b, h, n_kv, r, rope, t, dtype, device="cpu", t_max=None, seed=0, mask="holes"):
    """Random decode inputs; c_kv / k_rope are strided views [:, 0, :t] of [B, 1, T_max, .] caches.

    mask: None, "all" (all True) or "holes": row 0 left-padded, row 1 fully masked (if B > 1),
    the rest random holes with the last slot kept."""
    g = torch.Generator().manual_seed(seed)
    t_max = t_max or t + 13
    q_lat = torch.randn(b, h, r, generator=g).to(dtype)
    q_rope = torch.randn(b, h, rope, generator=g).to(dtype)
    c_cache = torch.randn(b, 1, t_max, r, generator=g).to(dtype)
    k_cache = torch.randn(b, 1, t_max, n_kv * rope, generator=g).to(dtype)
    kv_mask = None
    if mask == "all":
        kv_mask = torch.ones(b, t, dtype=torch.bool)
    elif mask == "holes":
        kv_mask = torch.rand(b, t, generator=g) > 0.3
        kv_mask[:, -1] = True
        kv_mask[0] = torch.arange(t) >= t // 3  # left padding
        if b > 1:
            kv_mask[1] = False  # nothing to attend to: finite zeros
    to = lambda x: None if x is None else x.to(device)
    return to(q_lat), to(q_rope), to(c_cache)[:, 0, :t], to(k_cache)[:, 0, :t], to(kv_mask)


def naive_float64(q_lat, q_rope, c_kv, k_rope, kv_mask, scale):
    """The math of the brief, one (sequence, head) at a time, in float64."""
    b, h, r = q_lat.shape
    rope = q_rope.shape[-1]
    n_kv = k_rope.shape[-1] // rope
    out = torch.zeros(b, h, r, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            g = j // (h // n_kv)
            s = c_kv[i].double() @ q_lat[i, j].double()  # [T]
            s = s + k_rope[i, :, g * rope : (g + 1) * rope].double() @ q_rope[i, j].double()
            s = s * scale
            keep = torch.ones_like(s, dtype=torch.bool) if kv_mask is None else kv_mask[i]
            if keep.any():
                p = torch.softmax(s[keep], dim=0)
                out[i, j] = p @ c_kv[i][keep].double()
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


ODD = dict(b=3, h=9, n_kv=3, r=48, rope=4, t=150)  # latent 48, 3 KV heads, 2 RoPE pairs, G=3
G10 = dict(b=2, h=20, n_kv=2, r=24, rope=8, t=33)  # 10 query heads per KV head: a 32-row head block


# ----------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", ["holes", None])
def test_reference_equals_naive_float64_loop(mask):
    q_lat, q_rope, c_kv, k_rope, kv_mask = make_inputs(**ODD, dtype=torch.float64, mask=mask)
    ref = mla_decode_reference(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.17)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref, naive_float64(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.17), rtol=1e-12, atol=1e-12)
    if mask is not None:
        assert torch.equal(ref[1], torch.zeros_like(ref[1]))  # the fully masked row


def test_reference_in_bf16_computes_in_fp32():
    q_lat, q_rope, c_kv, k_rope, kv_mask = make_inputs(**ODD, dtype=torch.bfloat16)
    ref = mla_decode_reference(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.17)
    assert ref.dtype == torch.bfloat16 and torch.isfinite(ref).all()
    assert rel_err(ref, naive_float64(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.17)) < 1e-2


def test_bad_shapes_raise_clear_errors():
    q_lat, q_rope, c_kv, k_rope, kv_mask = make_inputs(**ODD, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_kv"):
        mla_decode_reference(q_lat, q_rope[..., :3], c_kv, k_rope, kv_mask, 1.0)
    with pytest.raises(ValueError, match="kv_mask"):
        mla_decode_reference(q_lat, q_rope, c_kv, k_rope, kv_mask.float(), 1.0)
    with pytest.raises(ValueError, match="disagree"):
        mla_decode_reference(q_lat, q_rope, c_kv[:, :, :40], k_rope, kv_mask, 1.0)


# ----------------------------------------------------------------------------------------------
# The kernels under the Triton interpreter (CPU)
# ----------------------------------------------------------------------------------------------


def test_kernels_under_the_triton_interpreter():
    """Runs the `interpreted` tests below in a subprocess with TRITON_INTERPRET=1: the interpreter
    must be on before triton is first imported (its own @jit library functions are built then)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton): the interpreted kernel tests are skipped")
    if INTERPRETER:
        pytest.skip("this is the interpreted run itself")
    version = tuple(int(x) for x in importlib.metadata.version("triton").split(".")[:2])
    if version < (3, 7):  # seen with triton 3.6 + NumPy 2.4 (the H200 machine's torch 2.11 pins triton 3.6)
        pytest.skip("the interpreter of triton < 3.7 fails on loops with runtime bounds under NumPy 2 "
                    "('only 0-dimensional arrays can be converted to Python scalars'); pip install 'triton>=3.7'")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    assert "skipped" not in res.stdout, res.stdout[-4000:]  # every interpreted test ran, none skipped there


@pytest.fixture(scope="module")
def interpreted():
    """The kernel module, when this process runs with TRITON_INTERPRET=1 (kernels on the CPU)."""
    if not INTERPRETER:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_kernels_under_the_triton_interpreter")
    return kernel


# (shape, tile / split overrides): G=3 odd sizes with the default plan, with several splits of which
# the last ones are empty, G=1 (MHA-like), G=10 (a 32-row head block, 2R=8)
INTERPRETED_CASES = {
    "odd-default": (ODD, None, None),
    "odd-splits": (ODD, DecodeConfig(block_n=16, num_warps=4, num_stages=1), 7),
    "mha": (dict(b=2, h=4, n_kv=4, r=40, rope=6, t=70), DecodeConfig(block_n=32, num_warps=4, num_stages=1), 3),
    "g10": (G10, DecodeConfig(block_n=16, num_warps=4, num_stages=1), 2),
}


@pytest.mark.parametrize("mask", ["holes", None])
@pytest.mark.parametrize("case", INTERPRETED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_interpreted_equals_reference(interpreted, case, dtype, mask):
    shape, cfg, splits = INTERPRETED_CASES[case]
    q_lat, q_rope, c_kv, k_rope, kv_mask = make_inputs(**shape, dtype=dtype, mask=mask, seed=len(case))
    assert c_kv.stride(0) != c_kv.shape[1] * c_kv.shape[2]  # a strided view of a longer cache
    out = interpreted._launch(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.21, cfg=cfg, splits=splits)
    ref = mla_decode_reference(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.21)
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < (2e-6 if dtype == torch.float32 else 1e-2)
    if mask is not None:
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # fully masked row: zeros, not NaN


def test_interpreted_public_entry_point(interpreted):
    """Under TRITON_INTERPRET=1 no op is registered and `mla_decode` runs the launcher directly."""
    q_lat, q_rope, c_kv, k_rope, kv_mask = make_inputs(**ODD, dtype=torch.float32)
    assert interpreted._OP is None and not interpreted.is_supported(q_lat, c_kv)
    out = interpreted.mla_decode(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.21)
    assert rel_err(out, mla_decode_reference(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.21)) < 2e-6


def test_plan_fills_the_gpu_and_covers_the_cache():
    cfg = DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4, min_split_tokens=256)
    for b, t in [(1, 2048), (16, 16384), (64, 32768), (3, 150), (16, 100_003)]:
        n, per = kernel.plan_splits(b, 1, t, 132, cfg)
        assert per % cfg.block_n == 0 and n * per >= t and (n - 1) * per < t  # aligned, no empty split
        assert n == 1 or per >= cfg.min_split_tokens
        if t >= 256 * 132 * 4 / b:  # long enough: B * splits fills every SM
            assert b * n >= 132 * 4 * 0.9


# ----------------------------------------------------------------------------------------------
# Import without triton, double import, remote-code import check
# ----------------------------------------------------------------------------------------------


def test_imports_cleanly_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('k', {str(KERNEL_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['k'] = m; spec.loader.exec_module(m)\n"
        "x = torch.zeros(1, 2, 8)\n"
        "assert m._OP is None and not m.is_supported(x, x)\n"
        "try:\n    m.mla_decode(x, x[..., :2], x, x[..., :2], None, 1.0)\n"
        "except ImportError as e:\n    print('ok', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr


def test_remote_code_import_check_sees_only_torch():
    from transformers.dynamic_module_utils import get_imports

    third_party = set(get_imports(KERNEL_FILE)) - set(sys.stdlib_module_names)
    assert third_party == {"torch"}  # triton sits in try blocks: checkpoints load without it


def test_second_copy_reuses_the_registered_op():
    """Remote code is imported once per checkpoint: a second copy must not register the op again."""
    spec = importlib.util.spec_from_file_location("mla_decode_triton_copy", KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    assert module._OP is kernel._OP
    if kernel._OP is not None:  # triton installed, not interpreted
        assert str(kernel._OP.default._schema).startswith(kernel.OP_NAME)


def test_cpu_tensors_are_not_supported():
    x = torch.zeros(1, 2, 8)
    assert not kernel.is_supported(x, x)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@needs_cuda
@pytest.mark.parametrize("mask", ["holes", "all", None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_odd_sizes(dtype, mask):
    q_lat, q_rope, c_kv, k_rope, kv_mask = make_inputs(**ODD, dtype=dtype, device="cuda", mask=mask)
    assert kernel.is_supported(q_lat, c_kv)
    out = kernel.mla_decode(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.21)
    ref = mla_decode_reference(q_lat, q_rope, c_kv, k_rope, kv_mask, 0.21)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < GPU_TOL[dtype]
    if mask == "holes":
        assert torch.equal(out[1], torch.zeros_like(out[1]))


MODEL_DIMS = {  # H, n_kv, r, 2R
    "smollm2": (9, 3, 96, 8),
    "llama3-8b-r512": (32, 8, 512, 16),
    "llama3-8b-r256": (32, 8, 256, 16),
}


@needs_cuda
@pytest.mark.parametrize("model", MODEL_DIMS)
@pytest.mark.parametrize("b,t", [(1, 4099), (5, 16411)])
def test_cuda_model_dims_bf16(model, b, t):
    h, n_kv, r, rope = MODEL_DIMS[model]
    q_lat, q_rope, c_kv, k_rope, kv_mask = make_inputs(
        b, h, n_kv, r, rope, t, torch.bfloat16, device="cuda", t_max=t + 1000, mask="holes" if b > 1 else "all"
    )
    scale = 1 / math.sqrt(64 if model == "smollm2" else 128)
    out = kernel.mla_decode(q_lat, q_rope, c_kv, k_rope, kv_mask, scale)
    ref = mla_decode_reference(q_lat, q_rope, c_kv, k_rope, kv_mask, scale)
    assert rel_err(out, ref) < 1e-2


@needs_cuda
def test_cuda_torch_compile_fullgraph():
    h, n_kv, r, rope = MODEL_DIMS["smollm2"]
    args = make_inputs(4, h, n_kv, r, rope, 1000, torch.bfloat16, device="cuda")

    def step(q_lat, q_rope, c_kv, k_rope, kv_mask):
        return kernel.mla_decode(q_lat * 1.0, q_rope, c_kv, k_rope, kv_mask, 0.125) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args))  # the same kernels: equal up to bf16 rounding


@needs_cuda
def test_cuda_graph_replay_with_new_inputs():
    h, n_kv, r, rope = MODEL_DIMS["smollm2"]
    static = make_inputs(4, h, n_kv, r, rope, 1000, torch.bfloat16, device="cuda", seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel.mla_decode(*static, 0.125)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel.mla_decode(*static, 0.125)
    fresh = make_inputs(4, h, n_kv, r, rope, 1000, torch.bfloat16, device="cuda", seed=2)
    for dst, src in zip(static, fresh, strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, mla_decode_reference(*fresh, 0.125)) < 1e-2
