"""Per-layer rank allocation (modeling/rank_allocation.py): optimal against brute force, same total, and
the convert flag's clear error while the model has no per-layer ranks."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import convert_tiny, tiny_source
from mla_zoo.modeling import lowrank, rank_allocation
from mla_zoo.modeling.convert import calibrate, head_dim_of, layer_kv_matrix, resolve_settings
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.cli import main
from reference import two_pass_energy_latents


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


@pytest.mark.parametrize("svd", ["joint", "whitened"])
def test_energy_conversion_equals_the_two_pass_reference_exactly(svd):
    """Each layer is factorised once (its spectrum allocates the ranks, then it is truncated): the latent
    weights are bit for bit those of factorising twice (`reference.two_pass_energy_latents`)."""
    model = tiny_source("llama-gqa")
    with torch.no_grad():  # layer 0's keys and values of rank 4, so that the layers get different ranks
        for proj in (model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.v_proj):
            proj.weight.copy_(proj.weight[:, :4] @ proj.weight[:4] / 4)
    settings = dict(rope_pairs=2, kv_lora_rank=16, svd=svd, rank_allocation="energy", calib_tokens=256)
    mla, report = convert_tiny(model, **settings)
    s = resolve_settings(ConvertSettings(rope_strategy="high", **settings), model.config)
    torch.manual_seed(s.seed)
    _, stats, _ = calibrate(model, None, s)  # the same self-samples as the converter's
    moments = [x / stats.tokens for x in stats.xxt] if svd == "whitened" else None
    d = head_dim_of(model.config)
    w = [layer_kv_matrix(layer.self_attn, report.rope_pairs[i], d) for i, layer in enumerate(model.model.layers)]
    ranks, factors = two_pass_energy_latents(w, moments, 16, step=8)
    assert report.kv_lora_ranks == ranks and len(set(ranks)) > 1
    for layer, (up, down) in zip(mla.model.layers, factors, strict=True):
        assert torch.equal(layer.self_attn.kv_b_proj.weight, up.float())  # [rows, r]
        assert torch.equal(layer.self_attn.kv_a_proj.weight, down.float())  # [r, hidden]


def test_the_spectrum_gives_the_energy_the_converter_keeps():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 16, generator=g, dtype=torch.float64)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 16)
    c = x.T @ x / 200
    s = lowrank.factorize(w, c).s
    for rank in (1, 5, 12):
        assert rank_allocation.retained(s, rank) == pytest.approx(lowrank.whitened(w, rank, c)[2], rel=1e-9)


def test_convert_with_energy_allocation_keeps_the_total_and_more_energy(tokenizer, tmp_path, capsys):
    """`mla-zoo convert --rank-allocation energy`: per-layer widths in the config (the remote code's
    kv_lora_ranks) at the same total, at least the uniform scheme's mean retained energy, and a
    checkpoint that loads through its remote code and computes what the converted model computes."""
    import json

    from mla_zoo.zoo.evaluate.evaluation import load_model

    model = tiny_source("llama-gqa")
    with torch.no_grad():  # layer 0's keys and values of rank 4: it needs few latent dims, layer 1 more
        for proj in (model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.v_proj):
            proj.weight.copy_(proj.weight[:, :4] @ proj.weight[:4] / 4)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    reports = {}
    for scheme in ("uniform", "energy"):
        out = tmp_path / scheme
        assert main(["convert", str(src), "-o", str(out), "--rank-allocation", scheme, "--rope-strategy", "high",
                     "--rope-pairs", "2", "--kv-rank", "16", "--svd", "joint", "--refit", "none",
                     "--dtype", "float32"]) == 0
        reports[scheme] = json.loads((out / "conversion.json").read_text())
    uniform, energy = reports["uniform"], reports["energy"]
    assert uniform["kv_lora_ranks"] is None
    ranks = energy["kv_lora_ranks"]
    assert ranks == [8, 24]  # multiples of gcd(16, 8), the total of 2 x 16
    assert energy["kv_cache"] == uniform["kv_cache"]  # the same total KV size
    mean = {k: sum(r["svd_retained_energy"]) / 2 for k, r in reports.items()}
    assert mean["energy"] > mean["uniform"] + 0.01
    config = json.loads((tmp_path / "energy" / "config.json").read_text())
    assert config["kv_lora_ranks"] == ranks
    loaded, _ = load_model(str(tmp_path / "energy"))  # through the remote code
    assert [layer.self_attn.kv_a_proj.out_features for layer in loaded.model.layers] == ranks
    # the reference: the same conversion in memory, from the same source weights
    converted, report = convert_tiny(model, rope_pairs=2, kv_lora_rank=16, rank_allocation="energy")
    assert report.kv_lora_ranks == ranks
    ids = torch.arange(3, 27)[None]
    with torch.no_grad():
        got, want = loaded(ids).logits, converted(ids).logits
    assert (got - want).abs().max() < 1e-5
    capsys.readouterr()
    assert main(["convert", str(src), "-o", str(tmp_path / "s"), "--rank-allocation", "energy", "--svd", "split",
                 "--rope-strategy", "high"]) == 2
    assert "--rank-allocation energy reads the spectrum of the joint factorisation" in capsys.readouterr().err
