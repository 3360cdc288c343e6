"""Decode attention that reads only the filled slots of a static cache: `use_flex_decode(model)`.

synth-data decodes left-padded batches in lockstep into a `StaticCache`: at step t every row has filled the
same first t slots, yet SDPA (and `packed_gqa`) read all `max_cache_len` slots and mask the empty ones, so
on average half the K/V reads are wasted. FlexAttention takes a block-sparse mask instead: for ONE query
token, the [B, 1, 1, L] mask transformers hands us becomes a `BlockMask` that lists, per row, only the
KV blocks of `KV_BLOCK` slots holding an allowed slot (blocks wholly inside the allowed run as "full": no
mask read), and the kernel skips the rest. The block mask is data, not shape: the compiled decode step
does not recompile as the position moves.

A GQA group's query heads are packed as rows, as in `packed_gqa`: q [B, H, 1, D] -> [B, H_kv, G, D]
against the cache [B, H_kv, L, D] as it is (no `enable_gqa`). That keeps inductor's flex DECODING kernel
(torch/_inductor/kernel/flex/flex_decoding.py) for any group size: with `enable_gqa` it needs
H / H_kv a power of 2, and SmolLM2's 9 / 3 is not (transformers' own `flex_attention` falls back to
`repeat_kv` there, integrations/flex_attention.py). Prefill (q_len > 1), a per-head mask and attention
with extras (softcap, sinks, position bias) go to `packed_gqa_attention` (that is, SDPA) unchanged.

Registered through transformers' `AttentionInterface` with the SDPA mask, so it works with `generate()`,
static caches and `torch.compile`. Only compiled (transformers compiles a static cache's decode step on
CUDA) is it fast: eager `flex_attention` is torch's unfused reference, which ignores the block sparsity.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .packed_gqa import NAME as PACKED
from .packed_gqa import packed_gqa_attention, switch_attention

NAME = "sdpa_flex_decode"
KV_BLOCK = 128  # slots per KV block of the block mask (flex's default sparse block size)


def _listed(which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """which [B, N] bool -> (counts [B, 1, 1] int32, indices [B, 1, 1, N] int32: the True blocks first, in order)."""
    counts = which.sum(-1, dtype=torch.int32)  # [B]
    order = torch.argsort((~which).to(torch.int8), dim=-1, stable=True)  # [B, N]
    return counts[:, None, None], order.to(torch.int32)[:, None, None, :]


def decode_block_mask(allowed: torch.Tensor, q_rows: int) -> BlockMask:
    """allowed [B, L] bool (the slots a row may attend to) -> a BlockMask of `q_rows` query rows x L slots that
    lists per row only the KV blocks holding an allowed slot; the same mask for every head and query row."""
    b, length = allowed.shape
    blocks = -(-length // KV_BLOCK)
    padded = torch.nn.functional.pad(allowed, (0, blocks * KV_BLOCK - length))  # [B, N * KV_BLOCK]
    tiles = padded.view(b, blocks, KV_BLOCK)  # [B, N, KV_BLOCK]
    full = tiles.all(-1)  # [B, N]: no mask needed inside
    partial = tiles.any(-1) & ~full  # [B, N]: the mask decides slot by slot
    kv_num, kv_idx = _listed(partial)
    full_num, full_idx = _listed(full)

    def mask_mod(batch, head, q_idx, kv_idx):
        return padded[batch, kv_idx]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(KV_BLOCK, KV_BLOCK),
                                    mask_mod=mask_mod, seq_lengths=(q_rows, length), compute_q_blocks=False)


def flex_decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, q, D], key/value [B, H_kv, L, D] -> ([B, q, H, D], None)."""
    b, h, q_len, d = query.shape
    kv_heads = key.shape[1]
    extras = any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux"))
    if (q_len != 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or h % kv_heads or dropout > 0 or extras):
        return packed_gqa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    mask = attention_mask[:, 0, 0, : key.shape[-2]]  # [B, L]
    allowed = mask if mask.dtype == torch.bool else mask == 0  # [B, L]: a float mask is additive
    groups = h // kv_heads
    packed = query.reshape(b, kv_heads, groups, d)  # [B, H_kv, G, D]: a group's heads as G query rows
    out = flex_attention(packed, key, value, block_mask=decode_block_mask(allowed, groups),
                         scale=scaling)  # [B, H_kv, G, D]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None  # [B, 1, H, D]


def use_flex_decode(model) -> bool:
    """Switch a model that runs transformers' SDPA (or `packed_gqa`) to the flex decode attention; returns
    whether it did."""
    uses_interface = getattr(model, "_supports_attention_backend", False)  # its layers call AttentionInterface
    if not uses_interface or model.config._attn_implementation not in ("sdpa", PACKED, NAME):
        return False
    switch_attention(model, NAME, flex_decode_attention)
    return True
