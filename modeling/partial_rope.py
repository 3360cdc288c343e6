"""Partial RoPE: which frequency pairs each KV head keeps (MHA2MLA, Ji et al. 2025, section 3.1).

Pair i of a head is dims (i, i + head_dim/2) in transformers' rotate-half layout; it rotates with
frequency theta_i = base^(-2i/head_dim), so low i = high frequency. Every strategy returns the
kept pairs per layer and KV head as sorted index lists, the format `LlamaMLAConfig.rope_pairs`
stores; the query heads of a group share their KV head's choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STRATEGIES = ("high", "low", "uniform", "2-norm")


def fixed_pairs(strategy: str, head_dim: int, r: int) -> list[int]:
    """The pairs a data-independent strategy keeps (the same for every head)."""
    half = head_dim // 2
    if strategy == "high":  # the r highest frequencies
        return list(range(r))
    if strategy == "low":  # the r lowest frequencies
        return list(range(half - r, half))
    if strategy == "uniform":  # every (half / r)-th pair, starting at the highest frequency
        return [(k * half) // r for k in range(r)]
    raise ValueError(f"unknown fixed strategy {strategy!r}")


def two_norm_pairs(q_norms: torch.Tensor, k_norms: torch.Tensor, r: int) -> list[list[int]]:
    """2-norm selection for one layer: rank pairs by their contribution to the attention scores.

    q_norms: [n_heads, half] mean over calibration tokens of ||(q_i, q_{i+half})|| per query head;
    k_norms: [n_kv, half] the same for keys. A pair's score for KV head g is
    sum over the query heads h of group g of mean||q_h,i|| * mean||k_g,i||, an upper bound of the
    pair's share of q.k; the r best pairs keep RoPE.
    """
    n_heads, half = q_norms.shape
    n_kv = k_norms.shape[0]
    grouped_q = q_norms.view(n_kv, n_heads // n_kv, half).sum(dim=1)  # [n_kv, half]
    scores = grouped_q * k_norms  # [n_kv, half]
    top = scores.topk(r, dim=-1).indices  # [n_kv, r]
    return [sorted(row.tolist()) for row in top]


def select_pairs(
    strategy: str, num_layers: int, num_kv_heads: int, head_dim: int, r: int, norms: list | None = None
) -> list[list[list[int]]]:
    """rope_pairs[layer][kv_head] for a strategy; 2-norm needs per-layer (q_norms, k_norms)."""
    if strategy == "2-norm":
        if norms is None:
            raise ValueError("the 2-norm strategy needs calibration statistics")
        return [two_norm_pairs(q, k, r) for q, k in norms]
    pairs = fixed_pairs(strategy, head_dim, r)
    return [[list(pairs) for _ in range(num_kv_heads)] for _ in range(num_layers)]
