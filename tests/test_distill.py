"""The fused linear + KL loss of the global stage against the unchunked float64 reference (CPU), and
Liger-Kernel's against it where CUDA and liger-kernel are there."""

from __future__ import annotations

import copy

import pytest
import torch
from mla_zoo.zoo.train.distill import compiled_kl_chunk, distill_loss, kl_chunk, liger_available, pick_kl_impl
from reference import reference_kl


def problem(dtype=torch.float64, tied: bool = False, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    b, s, h, v = 2, 7, 6, 11
    s_head = torch.nn.Linear(h, v, bias=False).to(device, dtype)
    t_head = torch.nn.Linear(h + 2, v, bias=False).to(device, dtype)  # the teacher may be wider
    s_hidden = torch.randn(b, s, h, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    t_hidden = torch.randn(b, s, h + 2, generator=g, dtype=torch.float64).to(device, dtype)
    mask = torch.ones(b, s, dtype=torch.long, device=device)
    mask[1, 5:] = 0  # right padding
    return s_hidden, t_hidden, s_head, t_head, mask


def reference(s_hidden, t_hidden, s_head, t_head, mask, temp):
    keep = mask.bool()
    return reference_kl(s_head(s_hidden)[keep].double(), t_head(t_hidden)[keep].double(), temp)


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [3, 64])
def test_fused_kl_equals_the_reference_with_gradients(temp, chunk):
    s_hidden, t_hidden, s_head, t_head, mask = problem()
    loss, parts = distill_loss(s_hidden, t_hidden, s_head, t_head, None, mask, temp, chunk_size=chunk, impl="fused")
    grads = torch.autograd.grad(loss * 3.0, [s_hidden, s_head.weight])  # a scaled output: backward scales
    want = reference(s_hidden, t_hidden, s_head, t_head, mask, temp)
    want_grads = torch.autograd.grad(want * 3.0, [s_hidden, s_head.weight])
    assert loss.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14) and parts["kl"] == loss.detach()
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert grads[0][1, 5:].abs().max() == 0  # padding positions get no gradient


def test_fused_and_chunked_agree_in_float32():
    s_hidden, t_hidden, s_head, t_head, mask = problem(torch.float32, seed=1)
    out = {}
    for impl in ("fused", "chunked"):
        loss, _ = distill_loss(s_hidden, t_hidden, s_head, t_head, None, mask, 1.5, chunk_size=4, impl=impl)
        out[impl] = (loss, *torch.autograd.grad(loss, [s_hidden, s_head.weight]))
    for a, b in zip(out["fused"], out["chunked"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_compiled_chunk_equals_the_eager_one():
    """What CUDA runs (inductor's fused passes) against `kl_chunk` eager, on bf16 logits as under autocast."""
    g = torch.Generator().manual_seed(3)
    z_s, z_t = (torch.randn(5, 300, generator=g).mul(4).bfloat16() for _ in range(2))
    kl, grad = kl_chunk(z_s, z_t, 1.5, 0.1)
    kl_c, grad_c = compiled_kl_chunk()(z_s, z_t, 1.5, 0.1)
    assert grad_c.dtype == torch.bfloat16 and kl_c.dtype == torch.float32
    torch.testing.assert_close(kl_c, kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_c, grad, rtol=1.6e-2, atol=1e-5)  # bf16 rounding of the same fp32 values
    want = reference_kl(z_s.double(), z_t.double(), 1.5) * 5 / 1.5**2  # a mean * T^2 -> the chunk's sum
    assert kl.item() == pytest.approx(want.item(), rel=1e-5)
    kl3, grad3 = compiled_kl_chunk()(z_s[:3], z_t[:3], 1.5, 0.1)  # a shorter last chunk: compiled again
    torch.testing.assert_close(grad3, grad[:3], rtol=1.6e-2, atol=1e-5)
    assert kl3.item() == pytest.approx(kl_chunk(z_s[:3], z_t[:3], 1.5, 0.1)[0].item(), rel=1e-5)


def test_the_fused_loss_under_bf16_autocast_stays_near_float64():
    """The Trainer's setting: fp32 weights, bf16 matmuls, fp32 softmax."""
    s_hidden, t_hidden, s_head, t_head, mask = problem(torch.float32, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = distill_loss(s_hidden, t_hidden, s_head, t_head, None, mask, 1.0, chunk_size=4, impl="fused")
    grads = torch.autograd.grad(loss, [s_hidden, s_head.weight])
    s64, s_head64, t_head64 = s_hidden.detach().double().requires_grad_(), copy.deepcopy(s_head).double(), \
        copy.deepcopy(t_head).double()
    want = reference(s64, t_hidden.double(), s_head64, t_head64, mask, 1.0)
    want_grads = torch.autograd.grad(want, [s64, s_head64.weight])
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want.item(), rel=1e-2)
    for got, ref in zip(grads, want_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=5e-2, atol=5e-3)


def test_the_implementation_choice():
    head, biased = torch.nn.Linear(4, 5, bias=False), torch.nn.Linear(4, 5)
    cpu = torch.device("cpu")
    assert pick_kl_impl("auto", head, head, 0.0, cpu) == "fused"  # no CUDA here: never liger
    assert pick_kl_impl("auto", head, head, 0.5, cpu) == "chunked"  # the CE term
    assert pick_kl_impl("fused", biased, head, 0.0, cpu) == "chunked"  # a head with a bias
    assert pick_kl_impl("chunked", head, head, 0.0, cpu) == "chunked"


@pytest.mark.skipif(not liger_available(torch.device("cuda")), reason="needs CUDA and liger-kernel")
def test_liger_fused_jsd_at_beta_0_is_our_kl():
    s_hidden, t_hidden, s_head, t_head, mask = problem(torch.float32, seed=2, device="cuda")
    out = {}
    for impl in ("liger", "fused"):
        loss, _ = distill_loss(s_hidden, t_hidden, s_head, t_head, None, mask, 2.0, chunk_size=4, impl=impl)
        out[impl] = (loss, *torch.autograd.grad(loss, [s_hidden, s_head.weight]))
    want = reference(s_hidden, t_hidden, s_head, t_head, mask, 2.0)
    assert out["liger"][0].item() == pytest.approx(want.item(), rel=1e-4)
    for a, b in zip(out["liger"], out["fused"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
