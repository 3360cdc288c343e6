"""Absorbed MLA decode over the latent cache: a Triton kernel (split-K + log-sum-exp merge) and its spec.

This file is copied VERBATIM into every mla-zoo checkpoint, next to `modeling_llama_mla.py`, which
uses `mla_decode` on CUDA when `is_supported` says so and its PyTorch path otherwise. It imports
only torch, triton and the standard library; every triton import sits in a `try` block, so the file
imports cleanly (and `is_supported` answers False) on a machine without triton.

The math (one new query token per sequence; H query heads, n_kv KV heads, G = H // n_kv, head h
belongs to KV head g = h // G; 2R RoPE dims per KV head, P = n_kv * 2R):

    score[b,h,t] = scale * (q_lat[b,h] . c_kv[b,t] + q_rope[b,h] . k_rope[b,t, g*2R:(g+1)*2R])
    p = softmax_t(score) over the slots where kv_mask[b,t] is True (fp32)
    o_lat[b,h] = sum_t p[b,h,t] * c_kv[b,t]                      (a fully masked row gives zeros)

Per-KV-head RoPE in an MQA-shaped kernel: each head's RoPE query is zero-padded into the full
P-wide vector (non-zero only in its own group's slice), so ONE dot over all P RoPE key dims serves
every head exactly. The padding is done while loading the query; nothing is materialised.

What this kernel takes from the engines that decode MLA (read before writing it):
* vLLM `vllm/attention/ops/triton_decode_attention.py` (Apache-2.0; itself from SGLang/LightLLM):
  the two-stage structure (stage 1: grid (batch, split, head block) writes a normalised partial
  output and its log-sum-exp per split; stage 2 merges the splits with a running max), a block of
  query heads padded to 16 sharing every KV tile through `tl.dot`, and a second dot for the RoPE
  part. Unlike vLLM, which loads the latent twice (as the K buffer for the scores and again as the
  V buffer for the weighted sum), the latent tile is loaded ONCE and feeds both dots.
* SGLang `python/sglang/srt/layers/attention/triton_ops/decode_attention.py`: the number of splits
  comes from the SM count and the batch (its `get_num_kv_splits`), the split length is rounded up to
  a whole number of blocks so splits align with tiles, the LSE lives in its own buffer, and empty
  splits drop out of the merge.
* FlashMLA (deepseek-ai/FlashMLA, SM90, fixed 512 latent + 64 RoPE dims, so not usable at our
  dims): in MLA "K and V are the same", so one load of the KV tile serves both GEMMs; the KV stream
  is loaded with an evict-first cache hint (it is read exactly once); a split-KV pass plus a small
  combine kernel on the LSE. (Its tile scheduler, which balances the work per SM exactly, is not
  reproduced: the split count here simply follows the SM count.)
Also: the softmax runs in base 2 (`exp2`, log2(e) folded into the scale), as FlashAttention does.

kv_mask gates the scores only: every slot of c_kv[:, :T] is read, so masked slots must hold finite
values (a fresh static cache holds zeros). Gating the loads on the mask instead stalled Triton's
software pipeline (1.8x the time at 16 x 16K on an H200) and cost more than it saved even with half
the slots masked; to skip the empty tail of a static cache, pass views up to the longest valid length.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # optional: without triton, `is_supported` is False and the model uses its PyTorch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

OP_NAME = "mla_zoo::mla_decode_v1"  # bump the version when the op's semantics change
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------
# The spec: plain torch, fp32 math
# ----------------------------------------------------------------------------------------------


def _check_shapes(q_lat, q_rope, c_kv, k_rope, kv_mask) -> tuple[int, int, int, int, int, int]:
    """Validates the arguments; returns (B, H, r, T, 2R, n_kv)."""
    if q_lat.dim() != 3 or q_rope.dim() != 3 or c_kv.dim() != 3 or k_rope.dim() != 3:
        raise ValueError(
            "mla_decode expects q_lat [B, H, r], q_rope [B, H, 2R], c_kv [B, T, r], k_rope [B, T, P]; got "
            f"{tuple(q_lat.shape)}, {tuple(q_rope.shape)}, {tuple(c_kv.shape)}, {tuple(k_rope.shape)}"
        )
    b, h, r = q_lat.shape
    rope = q_rope.shape[-1]
    t, p = k_rope.shape[1], k_rope.shape[2]
    if tuple(q_rope.shape[:2]) != (b, h) or tuple(c_kv.shape) != (b, t, r) or k_rope.shape[0] != b:
        raise ValueError(
            f"mla_decode: shapes disagree: q_lat {tuple(q_lat.shape)}, q_rope {tuple(q_rope.shape)}, "
            f"c_kv {tuple(c_kv.shape)}, k_rope {tuple(k_rope.shape)}"
        )
    if rope == 0 or p % rope != 0 or h % (p // rope) != 0:
        raise ValueError(
            f"mla_decode: k_rope's width {p} must be n_kv * 2R with 2R = q_rope's width {rope}, "
            f"and the {h} query heads must split evenly over the n_kv KV heads"
        )
    if kv_mask is not None and (tuple(kv_mask.shape) != (b, t) or kv_mask.dtype != torch.bool):
        got = f"{kv_mask.dtype} {tuple(kv_mask.shape)}"
        raise ValueError(f"mla_decode: kv_mask must be bool [B, T] = [{b}, {t}]; got {got}")
    return b, h, r, t, rope, p // rope


def mla_decode_reference(q_lat: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, kv_mask: Tensor | None,
                         scale: float) -> Tensor:
    """The spec of `mla_decode` in plain torch (fp32 math, or fp64 for fp64 inputs).

    q_lat [B, H, r], q_rope [B, H, 2R], c_kv [B, T, r], k_rope [B, T, n_kv*2R], kv_mask [B, T] bool
    (True = attend) or None. Returns o_lat [B, H, r] in q_lat's dtype; a fully masked row gives zeros.
    """
    b, h, r, t, rope, n_kv = _check_shapes(q_lat, q_rope, c_kv, k_rope, kv_mask)
    f = torch.promote_types(q_lat.dtype, torch.float32)
    c = c_kv.to(f)  # [B, T, r]
    scores = torch.einsum("bhr,btr->bht", q_lat.to(f), c)  # [B, H, T]
    q_pe = q_rope.to(f).view(b, n_kv, h // n_kv, rope)  # [B, n_kv, G, 2R]
    k_pe = k_rope.to(f).view(b, t, n_kv, rope)  # [B, T, n_kv, 2R]
    scores = scores + torch.einsum("bgqe,btge->bgqt", q_pe, k_pe).reshape(b, h, t)
    scores = scores * scale
    if kv_mask is not None:
        scores = scores.masked_fill(~kv_mask[:, None, :], float("-inf"))  # mask: [B, 1, T]
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # a fully masked row: NaN -> 0
    return torch.einsum("bht,btr->bhr", probs, c).to(q_lat.dtype)  # [B, H, r]


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes and launch parameters of the two kernels."""

    block_n: int  # cache slots per tile
    num_warps: int
    num_stages: int
    programs_per_sm: int = 4  # split-K aims at B * splits ~ SMs * this
    min_split_tokens: int = 256  # no split shorter than this many slots
    max_splits: int = 128


def default_config(r: int, dtype: torch.dtype) -> DecodeConfig:
    """Tiles by the latent width: the best of the sweep of `bench/decode_kernel_gpu.py --sweep` on an H200
    (triton 3.6) at B = 16 and 64 x T = 16K; bench/RESULTS.md has the numbers."""
    if dtype == torch.float32:  # tests: fp32 dots run on CUDA cores
        return DecodeConfig(block_n=16, num_warps=4, num_stages=2)
    if r <= 128:  # SmolLM2 at d_kv=32: r=96, P=24
        return DecodeConfig(block_n=128, num_warps=8, num_stages=3)
    return DecodeConfig(block_n=32, num_warps=4, num_stages=3)  # Llama-3-8B: r = 256 / 512, P=128


def _block_h(h: int) -> int:
    """Query heads per program: all heads of a sequence (one pass over the latent), padded to >= 16."""
    return min(max(16, 1 << (h - 1).bit_length()), 64)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter (tests): a few splits
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def plan_splits(b: int, head_blocks: int, t: int, sms: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(number of splits, slots per split): enough programs to fill the GPU, splits aligned to tiles."""
    want = max(1, math.ceil(sms * cfg.programs_per_sm / (b * head_blocks)))
    splits = max(1, min(want, t // cfg.min_split_tokens, cfg.max_splits))
    per_split = math.ceil(math.ceil(t / splits) / cfg.block_n) * cfg.block_n
    return max(1, math.ceil(t / per_split)), max(per_split, cfg.block_n)


# ----------------------------------------------------------------------------------------------
# The kernels
# ----------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if triton is not None:

    @triton.jit
    def _mma(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b, accumulated in fp32; fp32 inputs stay exact (IEEE, not TF32)."""
        if IEEE:
            out = tl.dot(a, b, acc=acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc=acc)
        return out

    @triton.jit
    def _mla_decode_partial(
        QL, QR, C, KR, MASK, O_PART, LSE_PART,
        scale_log2e, T, per_split,
        s_qlb, s_qlh, s_qld, s_qrb, s_qrh, s_qrd,
        s_cb, s_ct, s_cd, s_kb, s_kt, s_kd, s_mb, s_mt,
        s_ob, s_oh, s_os, s_lb, s_lh,
        H: tl.constexpr, G: tl.constexpr, R: tl.constexpr, ROPE: tl.constexpr, P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Stage 1: one (sequence, split, head block): normalised partial output and its LSE (base 2)."""
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * T_max * r may pass 2**31
        split = tl.program_id(1)
        heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
        h_ok = heads < H
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        offs_p = tl.arange(0, BLOCK_P)
        p_ok = offs_p < P

        q = tl.load(  # [BH, BR]
            QL + b * s_qlb + heads[:, None] * s_qlh + offs_r[None, :] * s_qld,
            mask=h_ok[:, None] & r_ok[None, :], other=0.0,
        )  # fmt: skip
        group = heads // G  # [BH] the KV head of each query head
        own = (offs_p[None, :] // ROPE) == group[:, None]  # [BH, BP] its slice of the P RoPE dims
        q_pe = tl.load(  # [BH, BP] the RoPE query, zero outside its own group's slice
            QR + b * s_qrb + heads[:, None] * s_qrh + (offs_p[None, :] - group[:, None] * ROPE) * s_qrd,
            mask=h_ok[:, None] & p_ok[None, :] & own, other=0.0,
        )  # fmt: skip

        start = split * per_split
        end = tl.minimum(start + per_split, T)
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max (base-2 logits)
        l_sum = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
        for i in range(0, per_split, BLOCK_N):  # the same trip count in every program (per_split % BLOCK_N == 0)
            offs_n = start + i + tl.arange(0, BLOCK_N)  # [BN]
            in_split = offs_n < end
            c = tl.load(  # [BN, BR] the latent tile: loaded once, used by both dots
                C + b * s_cb + offs_n[:, None] * s_ct + offs_r[None, :] * s_cd,
                mask=in_split[:, None] & r_ok[None, :], other=0.0, eviction_policy="evict_first",
            )  # fmt: skip
            k_pe = tl.load(  # [BN, BP] all KV heads' RoPE keys
                KR + b * s_kb + offs_n[:, None] * s_kt + offs_p[None, :] * s_kd,
                mask=in_split[:, None] & p_ok[None, :], other=0.0, eviction_policy="evict_first",
            )  # fmt: skip
            attend = in_split
            if HAS_MASK:  # the mask only gates the scores: loads that wait on it stall the pipeline
                keep = tl.load(MASK + b * s_mb + offs_n * s_mt, mask=in_split, other=0)
                attend = attend & (keep != 0)
            # heads as rows: [BH, BN] scores
            s = _mma(q, tl.trans(c), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), IEEE)
            s = _mma(q_pe, tl.trans(k_pe), s, IEEE)
            s = tl.where(attend[None, :], s * scale_log2e, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe[:, None])  # [BH, BN]
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = _mma(p.to(c.dtype), c, acc * alpha[:, None], IEEE)  # [BH, BR]
            m = m_new

        seen = l_sum > 0.0
        out = acc / tl.where(seen, l_sum, 1.0)[:, None]
        lse = tl.where(seen, m + tl.log2(tl.where(seen, l_sum, 1.0)), float("-inf"))
        tl.store(
            O_PART + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_r[None, :],
            out, mask=h_ok[:, None] & r_ok[None, :],
        )  # fmt: skip
        tl.store(LSE_PART + b * s_lb + heads * s_lh + split, lse, mask=h_ok)

    @triton.jit
    def _mla_decode_merge(
        O_PART, LSE_PART, OUT, n_splits,
        s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
        R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """Stage 2: one (sequence, head): merge the splits' partial outputs by their LSE, BLOCK_S splits
        per step (independent loads, no chain of dependent ones); empty splits have weight 0."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        offs_s = tl.arange(0, BLOCK_S)
        m = tl.full([1], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            splits = s0 + offs_s  # [BS]
            s_ok = splits < n_splits
            lse = tl.load(LSE_PART + b * s_lb + h * s_lh + splits, mask=s_ok, other=float("-inf"))  # [BS]
            part = tl.load(  # [BS, BR]
                O_PART + b * s_pb + h * s_ph + splits[:, None] * s_ps + offs_r[None, :],
                mask=s_ok[:, None] & r_ok[None, :], other=0.0,
            )  # fmt: skip
            m_new = tl.maximum(m, tl.max(lse, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)  # [BS]
            acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
            l_sum = l_sum * alpha + tl.sum(w, axis=0)
            m = m_new
        out = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
        tl.store(OUT + b * s_ob + h * s_oh + offs_r, out.to(OUT.dtype.element_ty), mask=r_ok)


def _launch(q_lat: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, kv_mask: Tensor | None, scale: float,
            wrap=lambda kernel: kernel, cfg: DecodeConfig | None = None, splits: int | None = None) -> Tensor:
    """Runs the two kernels (`wrap` = torch.library.wrap_triton inside the registered op).

    `cfg` / `splits` override the defaults (tests and the benchmark's tuning sweep)."""
    b, h, r, t, rope, n_kv = _check_shapes(q_lat, q_rope, c_kv, k_rope, kv_mask)
    if len({q_lat.dtype, q_rope.dtype, c_kv.dtype, k_rope.dtype}) != 1 or c_kv.dtype not in _DTYPES:
        dtypes = [str(x.dtype) for x in (q_lat, q_rope, c_kv, k_rope)]
        raise ValueError(f"mla_decode: q_lat, q_rope, c_kv, k_rope must share one of bf16/fp16/fp32; got {dtypes}")
    p = n_kv * rope
    cfg = cfg or default_config(r, c_kv.dtype)
    block_h = _block_h(h)
    head_blocks = triton.cdiv(h, block_h)
    n_splits, per_split = plan_splits(b, head_blocks, t, _num_sms(c_kv.device), cfg)
    if splits is not None:
        per_split = max(cfg.block_n, triton.cdiv(triton.cdiv(t, splits), cfg.block_n) * cfg.block_n)
        n_splits = splits  # the trailing splits may be empty: the merge skips them

    o_part = torch.empty(b, h, n_splits, r, dtype=torch.float32, device=q_lat.device)  # [B, H, S, r]
    lse = torch.empty(b, h, n_splits, dtype=torch.float32, device=q_lat.device)  # [B, H, S]
    out = torch.empty(b, h, r, dtype=q_lat.dtype, device=q_lat.device)  # [B, H, r]
    mask = kv_mask if kv_mask is not None else c_kv  # bool (triton *i1); without a mask: a placeholder pointer
    mask_strides = (mask.stride(0), mask.stride(1)) if kv_mask is not None else (0, 0)
    block_r = max(16, triton.next_power_of_2(r))
    wrap(_mla_decode_partial)[(b, n_splits, head_blocks)](
        q_lat, q_rope, c_kv, k_rope, mask, o_part, lse,
        scale * 1.4426950408889634, t, per_split,
        *q_lat.stride(), *q_rope.stride(), *c_kv.stride(), *k_rope.stride(), *mask_strides,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        H=h, G=h // n_kv, R=r, ROPE=rope, P=p,
        BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=max(16, triton.next_power_of_2(p)), BLOCK_N=cfg.block_n,
        HAS_MASK=kv_mask is not None, IEEE=c_kv.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    wrap(_mla_decode_merge)[(b, h)](
        o_part, lse, out, n_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        R=r, BLOCK_R=block_r, BLOCK_S=16, num_warps=4 if block_r >= 256 else 2,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# The op (torch.compile fullgraph and CUDA graphs see one opaque op)
# ----------------------------------------------------------------------------------------------


def _op_impl(q_lat: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, kv_mask: Tensor | None,
             scale: float) -> Tensor:
    return _launch(q_lat, q_rope, c_kv, k_rope, kv_mask, scale)


def _op_fake(q_lat: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, kv_mask: Tensor | None,
             scale: float) -> Tensor:
    return q_lat.new_empty(q_lat.shape)


def _register_op():
    """Registers OP_NAME once per process: remote code is imported once per checkpoint, and the
    first registration serves them all (the version in OP_NAME keeps incompatible copies apart)."""
    ns, name = OP_NAME.split("::")
    try:
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        pass
    # An opaque custom op: torch.compile and CUDA graphs call it as one node. (`triton_op` would let
    # dynamo trace the Triton source, which it failed to do for these kernels with torch 2.11.)
    torch.library.custom_op(OP_NAME, mutates_args=())(_op_impl).register_fake(_op_fake)
    return getattr(getattr(torch.ops, ns), name)


_OP = _register_op() if triton is not None and not _INTERPRET else None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def is_supported(q_lat: torch.Tensor, c_kv: torch.Tensor) -> bool:
    """True when `mla_decode` can run these tensors: CUDA, triton importable, bf16/fp16/fp32, r <= 1024."""
    return (
        _OP is not None
        and q_lat.is_cuda
        and c_kv.is_cuda
        and q_lat.dtype in _DTYPES
        and c_kv.dtype == q_lat.dtype
        and c_kv.dim() == 3
        and 0 < c_kv.shape[-1] <= 1024
    )


def mla_decode(q_lat: Tensor, q_rope: Tensor, c_kv: Tensor, k_rope: Tensor, kv_mask: Tensor | None,
               scale: float) -> Tensor:
    """Absorbed MLA decode on the GPU: the same function as `mla_decode_reference`.

    q_lat [B, H, r], q_rope [B, H, 2R], c_kv [B, T, r] and k_rope [B, T, n_kv*2R] (strided views
    of the cache are fine: nothing is copied), kv_mask [B, T] bool or None. Returns [B, H, r] in
    q_lat's dtype. Check `is_supported` first.
    """
    if _OP is None:
        if _INTERPRET and triton is not None:  # TRITON_INTERPRET=1: the kernels run on the CPU
            return _launch(q_lat, q_rope, c_kv, k_rope, kv_mask, scale)
        raise ImportError("mla_decode needs triton (pip install triton) and a CUDA device")
    return _OP(q_lat, q_rope, c_kv, k_rope, kv_mask, float(scale))
