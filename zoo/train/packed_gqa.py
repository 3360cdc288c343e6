"""Decode attention for a GQA teacher without `repeat_kv`: `use_packed_gqa(model)`.

transformers' SDPA path repeats each key/value head for its group of query heads whenever a mask is
needed (a static cache always needs one) and it runs compiled: at decode that writes and reads the whole
cache `num_key_value_groups` times per step. For ONE query token, a group's query heads can be rows of
one query instead: q [B, H, 1, D] -> [B, H_kv, G, D] attends to the cache [B, H_kv, L, D] as it is, with
the mask [B, 1, 1, L] broadcast over the G rows (transformers 5.24 does the same in eager mode, not
compiled). Prefill (q_len > 1) and MHA go to transformers' own SDPA unchanged.

Registered through transformers' `AttentionInterface` (and its mask interface: the SDPA mask), so it
works with `generate()`, static caches and `torch.compile`. It is for sampling from the ORIGINAL model
(synth-data); the MLA student has its own absorbed attention.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "sdpa_packed_gqa"


def packed_gqa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, q, D], key/value [B, H_kv, L, D] -> ([B, q, H, D], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    b, h, q_len, d = query.shape
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1  # one mask for every head
    if q_len != 1 or groups == 1 or not shared_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    packed = query.reshape(b, h // groups, groups, d)  # [B, H_kv, G, D]: a group's heads as G query rows
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)  # [B, H_kv, G, D]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None  # [B, 1, H, D]


def switch_attention(model, name: str, attention) -> None:
    """Register `attention` (transformers' attention signature) as `name`, with the SDPA mask, and switch the
    model to it (its layers must call AttentionInterface: `model._supports_attention_backend`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)


def use_packed_gqa(model) -> bool:
    """Switch a GQA model that runs transformers' SDPA to the packed decode attention; returns whether it did."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    uses_interface = getattr(model, "_supports_attention_backend", False)  # its layers call AttentionInterface
    if not uses_interface or config._attn_implementation != "sdpa" or kv_heads == config.num_attention_heads:
        return False
    switch_attention(model, NAME, packed_gqa_attention)
    return True
