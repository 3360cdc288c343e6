"""The MultiHeadLatentAttention node alone: our CPU kernel and the op's function body against the
torch reference (export/op.py), over the shapes that matter: prefill, long-past decode (several
split-K chunks per query), chunked prefill, MHA and GQA groupings, left padding, float16; and each
instruction-set build of the kernel (native = AVX-512 here, AVX2, portable C++)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mla_zoo.export import op  # noqa: E402
from mla_zoo.export.kernels import build  # noqa: E402
from onnx import TensorProto  # noqa: E402


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return f" {flag}" in f.read()
    except OSError:
        return False


@pytest.fixture(scope="module", params=build.ISAS)
def kernel_library(request) -> str:
    """Every build of the library (cached after the first build for these sources)."""
    if request.param == "avx2" and not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("this CPU has no AVX2/FMA")
    return build.build_kernels(build.BuildSettings(isa=request.param)).library


def node_model(attrs: dict, elem: int = TensorProto.FLOAT) -> bytes:
    """A one-node model (+ the function body) over the op's inputs and outputs."""
    return op.node_model(attrs, elem).SerializeToString()


def random_case(b, s, p, heads, kv_heads, head_dim, pairs, rank, pad=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    r2 = 2 * pairs
    half = head_dim // 2
    pair_ids = [sorted(torch.randperm(half, generator=g)[:pairs].tolist()) for _ in range(kv_heads)]
    mask = torch.ones(b, p + s, dtype=torch.long)
    for row, n in enumerate(pad):  # left padding
        mask[row, :n] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:].float()
    inv = 1.0 / (10000 ** (torch.arange(half).float() / half))
    angles = pos[..., None] * inv  # [B, S, hd/2]

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    inputs = dict(
        query=rnd(b, s, heads * head_dim), latent=rnd(b, s, rank), key_rope=rnd(b, s, kv_heads * r2),
        past_latent=rnd(b, 1, p, rank), past_key_rope=rnd(b, 1, p, kv_heads * r2), attention_mask=mask,
        cos=angles.cos(), sin=angles.sin(), w_uk=rnd(kv_heads, head_dim - r2, rank) / rank**0.5,
        w_uv=rnd(kv_heads, head_dim, rank) / rank**0.5,
    )
    attrs = dict(num_heads=heads, num_kv_heads=kv_heads, rope_pairs=[i for ids in pair_ids for i in ids],
                 scale=head_dim**-0.5)
    return inputs, attrs


CASES = {  # b, s, p, heads, kv_heads, head_dim, pairs, rank, left padding per row
    "prefill": (2, 9, 0, 6, 2, 16, 2, 12, (3, 0)),
    "decode-long-past": (3, 1, 700, 9, 3, 64, 4, 96, (0, 17, 300)),  # SmolLM2's attention dims
    "chunked-prefill": (2, 4, 11, 4, 4, 32, 3, 40, (5, 0)),  # MHA (G = 1)
    "decode-batch1-mqa": (1, 1, 1000, 8, 1, 32, 1, 24, ()),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_and_body_match_the_reference_fp32(case, kernel_library):
    inputs, attrs = random_case(*CASES[case])
    ref = [t.numpy() for t in op.reference(*inputs.values(), **attrs)]
    feed = {k: v.numpy() for k, v in inputs.items()}
    model = node_model(attrs)
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernel_library)
    kernel = ort.InferenceSession(model, so).run(None, feed)
    body = ort.InferenceSession(model).run(None, feed)
    for name, got in (("kernel", kernel), ("body", body)):
        for out_name, a, b in zip(op.OUTPUTS, got, ref, strict=True):
            assert a.shape == b.shape, (name, out_name)
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"{name} {out_name}")


@pytest.mark.parametrize("case", ["prefill", "decode-long-past"])
def test_kernel_float16_io(case, kernel_library):
    inputs, attrs = random_case(*CASES[case], seed=1)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in inputs.items()}
    ref32 = op.reference(*inputs.values(), **attrs)[0].numpy()  # fp32 math on fp32 inputs
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernel_library)
    session = ort.InferenceSession(node_model(attrs, TensorProto.FLOAT16), so)
    out, present_latent, present_key_rope = session.run(None, {k: v.numpy() for k, v in half.items()})
    assert out.dtype == np.float16
    ref16 = [t.numpy() for t in op.reference(*half.values(), **attrs)]  # the same fp32 math on fp16 inputs
    np.testing.assert_allclose(out.astype(np.float32), ref16[0].astype(np.float32), atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(present_latent, ref16[1])
    np.testing.assert_allclose(present_key_rope.astype(np.float32), ref16[2].astype(np.float32), atol=2e-3)
    rel = np.abs(out.astype(np.float32) - ref32).max() / np.abs(ref32).max()
    assert rel < 1e-2, rel  # fp16 rounding of inputs and outputs only


def test_kernel_rejects_inconsistent_shapes_with_a_clear_message(kernel_library):
    inputs, attrs = random_case(*CASES["chunked-prefill"])
    feed = {k: v.numpy() for k, v in inputs.items()}
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernel_library)
    session = ort.InferenceSession(node_model(attrs), so)
    bad = dict(feed, attention_mask=feed["attention_mask"][:, 1:])
    with pytest.raises(Exception, match=r"input 'attention_mask' has shape \[2, 14\], expected \[2, 15\]"):
        session.run(None, bad)
    bad = dict(feed, past_latent=feed["past_latent"][:, :, :, :-1])
    with pytest.raises(Exception, match=r"input 'past_latent' has shape \[2, 1, 11, 39\], expected \[2, 1, 11, 40\]"):
        session.run(None, bad)


# ----------------------------------------------------------------------------------------------
# Version 2 (op_spec.md): past and present in one buffer of `capacity` rows, the past's length an input.
# The CPU kernel and the portable body (no exporter or CUDA kernel yet), checked against version 1's reference.
# ----------------------------------------------------------------------------------------------


def shared_cache_model(attrs: dict) -> bytes:
    """One version-2 node: version 1's inputs and `past_length` (int64 [1]), with its function body."""
    return op.node_model(attrs, shared_cache=True).SerializeToString()


def in_buffer(case: str, spare: int, seed: int = 0, cases: dict = CASES):
    """A version-1 case (of `cases`) and the same call in version 2's form: the past and the mask written into
    buffers of P + S + spare rows, whose rows from P (and mask columns from P + S) hold noise the op must ignore."""
    inputs, attrs = random_case(*cases[case], seed=seed)
    b, s, p = cases[case][:3]
    cap = p + s + spare
    g = torch.Generator().manual_seed(seed + 1)
    feed = {k: v.numpy() for k, v in inputs.items()}
    for name in ("past_latent", "past_key_rope"):
        buf = torch.randn(b, 1, cap, inputs[name].shape[-1], generator=g)  # [B, 1, cap, w]
        buf[:, :, :p] = inputs[name]
        feed[name] = buf.numpy()
    mask = torch.randint(0, 2, (b, cap), generator=g)  # [B, cap]: noise past P + S
    mask[:, : p + s] = inputs["attention_mask"]
    feed["attention_mask"] = mask.numpy()
    feed["past_length"] = np.array([p], dtype=np.int64)
    return inputs, attrs, feed


@pytest.mark.parametrize("case", ["decode-long-past", "chunked-prefill", "prefill"])
def test_shared_cache_version_matches_version_1_with_and_without_one_buffer(case, kernel_library):
    inputs, attrs, feed = in_buffer(case, spare=5)
    p, s = CASES[case][2], CASES[case][1]
    want_out, want_lat, want_kr = (t.numpy() for t in op.reference(*inputs.values(), **attrs))
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernel_library)
    session = ort.InferenceSession(shared_cache_model(attrs), so)

    # a present of its own: the whole buffer copied, the new rows written; the same from the portable body
    body = ort.InferenceSession(shared_cache_model(attrs))
    for name, sess in (("kernel", session), ("body", body)):
        out, lat, kr = sess.run(None, feed)
        np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=1e-4, err_msg=name)
        for got, want, past in ((lat, want_lat, feed["past_latent"]), (kr, want_kr, feed["past_key_rope"])):
            assert got.shape == past.shape
            np.testing.assert_allclose(got[:, :, : p + s], want, atol=1e-6, err_msg=name)
            np.testing.assert_array_equal(got[:, :, p + s:], past[:, :, p + s:])
    out, lat, kr = session.run(None, feed)

    # one buffer bound as past and present: written in place, the same results
    binding = session.io_binding()
    buffers = {}
    for name in op.INPUTS + ("past_length",):
        value = ort.OrtValue.ortvalue_from_numpy(feed[name].copy())
        binding.bind_ortvalue_input(name, value)
        buffers[name] = value
    binding.bind_output("output")  # outputs come back in the order they were bound
    binding.bind_ortvalue_output("present_latent", buffers["past_latent"])
    binding.bind_ortvalue_output("present_key_rope", buffers["past_key_rope"])
    session.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], want_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(buffers["past_latent"].numpy(), lat)
    np.testing.assert_array_equal(buffers["past_key_rope"].numpy(), kr)


def test_shared_cache_version_rejects_a_past_that_does_not_fit(kernel_library):
    _, attrs, feed = in_buffer("chunked-prefill", spare=0)
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernel_library)
    session = ort.InferenceSession(shared_cache_model(attrs), so)
    with pytest.raises(Exception, match=r"input 'past_length' is 12: 12 past \+ 4 new rows do not fit the 15 rows"):
        session.run(None, dict(feed, past_length=np.array([12], dtype=np.int64)))
    with pytest.raises(Exception, match=r"input 'past_length' must hold one value >= 0"):
        session.run(None, dict(feed, past_length=np.array([-1], dtype=np.int64)))


def test_shared_cache_version_sees_which_buffers_are_shared(kernel_library):
    """Sharing is pointer equality (as GroupQueryAttention's): one cache tensor bound to its past's buffer and
    the other not is refused, which a kernel that copied regardless could not tell."""
    _, attrs, feed = in_buffer("decode-long-past", spare=3)
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernel_library)
    session = ort.InferenceSession(shared_cache_model(attrs), so)
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(feed[name].copy()) for name in op.INPUTS + ("past_length",)}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("output")
    binding.bind_ortvalue_output("present_latent", values["past_latent"])
    binding.bind_output("present_key_rope")
    with pytest.raises(Exception, match="present_latent and present_key_rope must both share their past's buffer"):
        session.run_with_iobinding(binding)
