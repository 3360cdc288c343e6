"""Per-layer rank allocation (modeling/rank_allocation.py): optimal against brute force, same total, and
the convert flag's clear error while the model has no per-layer ranks."""

from __future__ import annotations

import itertools

import pytest
import torch
from mla_zoo.modeling import lowrank, rank_allocation
from mla_zoo.zoo.cli import main


def spectra(seed: int, layers: int = 3, k: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand(layers, generator=g) * 0.6 + 0.05  # each layer its own decay rate
    return [((torch.rand(k, generator=g) * 0.2 + 1) * torch.exp(-decay[i] * torch.arange(k))).sort(descending=True)[0]
            for i in range(layers)]  # singular values: descending


def residual(sp: list[torch.Tensor], ranks: list[int]) -> float:
    return sum(1 - rank_allocation.retained(s, r) for s, r in zip(sp, ranks, strict=True))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("step", [1, 2])
def test_energy_allocation_is_optimal_at_the_same_total(seed, step):
    sp = spectra(seed)
    rank = 4
    got = rank_allocation.allocate(sp, rank, "energy", step=step)
    assert sum(got) == 3 * rank and all(r % step == 0 and step <= r <= 12 for r in got)
    best = min(residual(sp, list(c)) for c in itertools.product(range(step, 13, step), repeat=3)
               if sum(c) == 3 * rank)
    assert residual(sp, got) == pytest.approx(best, abs=1e-12)
    assert residual(sp, got) <= residual(sp, rank_allocation.allocate(sp, rank, "uniform")) + 1e-12


def test_equal_spectra_get_equal_ranks_and_floors_hold():
    same = [torch.linspace(2, 0.1, 10)] * 4
    assert rank_allocation.allocate(same, 3, "energy") == [3, 3, 3, 3]
    steep, flat = torch.tensor([10.0, 0.1, 0.1, 0.1, 0.1, 0.1]), torch.ones(6)
    assert rank_allocation.allocate([steep, flat], 3, "energy", min_rank=2) == [2, 4]
    assert rank_allocation.allocate([steep, flat], 3, "energy") == [1, 5]
    with pytest.raises(ValueError, match="multiple of step"):
        rank_allocation.allocate([steep, flat], 3, "energy", step=2)


def test_whitened_spectrum_gives_the_energy_the_converter_keeps():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 16, generator=g, dtype=torch.float64)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 16)
    c = x.T @ x / 200
    s = lowrank.whitened_spectrum(w, c)
    for rank in (1, 5, 12):
        assert rank_allocation.retained(s, rank) == pytest.approx(lowrank.whitened(w, rank, c)[2], rel=1e-9)


def test_convert_refuses_energy_allocation_until_the_model_has_per_layer_ranks(source_dir, tmp_path, capsys):
    from mla_zoo.modeling.remote.configuration_llama_mla import LlamaMLAConfig

    if "kv_lora_ranks" in LlamaMLAConfig.__dict__:
        pytest.skip("the model supports per-layer ranks")
    assert main(["convert", str(source_dir("llama-gqa")), "-o", str(tmp_path / "m"), "--rank-allocation", "energy",
                 "--rope-strategy", "high", "--svd", "joint"]) == 2
    err = capsys.readouterr().err
    assert "--rank-allocation energy needs per-layer latent ranks" in err and not (tmp_path / "m").exists()
