"""Per-layer latent ranks at the same TOTAL KV-cache size (CARE-style rank allocation).

The uniform scheme gives every layer the same `kv_lora_rank`. But the layers' whitened spectra
differ: some lose most of their (activation-weighted) key/value energy at a given rank, others
almost none. `allocate` moves latent dims to where they keep the most:

    minimise   sum_l residual_l(r_l) = sum_l sum_{i >= r_l} s_{l,i}^2 / sum_i s_{l,i}^2
    subject to sum_l r_l = n_layers * rank,  r_l a multiple of `step`, min_rank <= r_l <= len(s_l)

where s_l are the singular values of layer l's whitened stacked projection W_l L_l (`lowrank.
Factorization.s`; the retained energy the converter reports is 1 - residual_l). The residual of each
layer is convex in r_l (its singular values are sorted), so handing out `step` dims at a time to the
layer whose next `step` singular values hold the largest share of its energy is optimal (the
greedy algorithm for separable concave gains). Energies are relative to each layer's total, so that
layers with loud activations do not take every dim.

The cache holds `r_l + n_kv * 2R` values per token in layer l; with sum r_l unchanged, the total KV
size equals the uniform scheme's.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCHEMES = ("uniform", "energy")


def relative_energy(spectrum: torch.Tensor) -> torch.Tensor:
    """s_i^2 / sum s^2 of one layer's singular values [k] (float64)."""
    e = spectrum.double().pow(2)
    return e / e.sum().clamp_min(1e-300)


def retained(spectrum: torch.Tensor, rank: int) -> float:
    """Share of a layer's whitened energy its first `rank` singular values keep."""
    return float(relative_energy(spectrum)[:rank].sum())


def allocate(spectra: Sequence[torch.Tensor], rank: int, scheme: str = "energy", step: int = 1,
             min_rank: int | None = None) -> list[int]:
    """Per-layer ranks summing to len(spectra) * rank.

    spectra: each layer's singular values, descending; rank: the uniform (average) rank per layer;
    step: ranks are multiples of it (and so must `rank` be); min_rank: the least any layer gets
    (default: `step`).
    """
    n = len(spectra)
    if scheme == "uniform":
        return [rank] * n
    if scheme != "energy":
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if step < 1 or rank % step:
        raise ValueError(f"rank {rank} is not a multiple of step {step}")
    floor = step if min_rank is None else min_rank
    if floor % step or floor > rank:
        raise ValueError(f"min_rank {floor} must be a multiple of step {step} and at most rank {rank}")
    caps = [len(s) // step * step for s in spectra]
    if any(c < floor for c in caps) or sum(caps) < n * rank:
        raise ValueError(f"the layers cannot hold {n} x {rank} latent dims (at most {caps})")
    energies = [relative_energy(s) for s in spectra]
    ranks = [floor] * n
    budget = n * rank - n * floor

    def gain(layer: int) -> float:
        r = ranks[layer]
        return float(energies[layer][r : r + step].sum())

    heap = [(-gain(i), i) for i in range(n) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while budget > 0:
        _, i = heapq.heappop(heap)
        ranks[i] += step
        budget -= step
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-gain(i), i))
    return ranks
