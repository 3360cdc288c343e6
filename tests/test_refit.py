"""The output refit (modeling/refit.py) against references: every layer's o_proj is the float64 ridge solution on
the inputs the refit model itself gives that layer, a lossless conversion stays lossless, and old reports read as
"no refit"."""

from __future__ import annotations

import pytest
import torch
from conftest import convert_tiny, tiny_source
from mla_zoo.modeling import refit
from mla_zoo.modeling.convert import head_dim_of
from mla_zoo.zoo.train.distill import teacher_layer_io


def o_proj_inputs(mla, ids: torch.Tensor) -> list[torch.Tensor]:
    """What every layer's o_proj reads in one ordinary forward of `mla`: [tokens, heads * d_v] per layer."""
    seen = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for layer in mla.model.layers]
    try:
        with torch.no_grad():
            mla(ids)
    finally:
        for h in hooks:
            h.remove()
    return [x.reshape(-1, x.shape[-1]) for x in seen]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias"])
def test_each_o_proj_is_the_ridge_solution_on_the_refit_models_own_inputs(family):
    """Sequential: layer l is solved on the inputs that the already refit layers < l give it, so after the refit an
    ordinary forward of the model shows each o_proj its exact problem. Reference: float64 lstsq of the stacked
    ridge system [X; sqrt(lam) I] W^T = [Y; sqrt(lam) W0^T], with X and Y gathered by full forwards."""
    source = tiny_source(family).double()
    mla, _ = convert_tiny(source, rope_pairs=2, kv_rank_per_head=4)  # lossy: partial RoPE and a small latent
    mla = mla.double()
    before = [layer.self_attn.o_proj.weight.clone() for layer in mla.model.layers]
    ids = torch.randint(3, source.config.vocab_size, (6, 20))
    with torch.no_grad():
        refits = refit.refit_outputs(source, mla, ids, ridge=0.3, batch_size=4)  # two batches, the last one short

    _, targets = teacher_layer_io(source, ids)
    for layer, x, y, w0, report in zip(mla.model.layers, o_proj_inputs(mla, ids), targets, before, refits,
                                       strict=True):
        y = y.reshape(-1, y.shape[-1])  # [tokens, hidden]
        lam = 0.3 * float((x * x).sum(0).mean())  # ridge * mean(diag(X^T X))
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        want = torch.linalg.lstsq(torch.cat((x, lam**0.5 * eye)), torch.cat((y, lam**0.5 * w0.T))).solution.T
        got = layer.self_attn.o_proj.weight.detach()
        assert (got - want).abs().max() < 1e-8 * want.abs().max(), family
        errors = [float(((x @ w.T - y) ** 2).sum() / (y * y).sum()) for w in (w0, got)]
        assert [report.error_before, report.error_after] == pytest.approx(errors, rel=1e-6)
        assert report.error_after < report.error_before


def test_a_lossless_conversion_stays_lossless():
    """Full rank and every RoPE pair: the MLA block IS the source block, so the refit keeps W_o (Y = W_o X)."""
    source = tiny_source("llama-gqa")
    cfg, d = source.config, head_dim_of(source.config)
    full_rank = min(cfg.num_key_value_heads * d, cfg.hidden_size)
    mla, report = convert_tiny(source, rope_pairs=d // 2, kv_lora_rank=full_rank, refit="output", calib_tokens=256)
    ids = torch.randint(3, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (source(ids).logits - mla(ids).logits).abs().max() < 1e-4
    assert len(report.output_refit) == cfg.num_hidden_layers
    assert max(r.error_before for r in report.output_refit) < 1e-9
    assert report.calibration.tokens == 256


def test_a_huge_ridge_keeps_the_source_projection():
    source = tiny_source("llama-gqa")
    mla, _ = convert_tiny(source, rope_pairs=2, kv_rank_per_head=4)
    before = [layer.self_attn.o_proj.weight.clone() for layer in mla.model.layers]
    refit.refit_outputs(source, mla, torch.randint(3, source.config.vocab_size, (2, 16)), ridge=1e12)
    for layer, w0 in zip(mla.model.layers, before, strict=True):
        assert torch.allclose(layer.self_attn.o_proj.weight, w0, atol=1e-6)


def test_reports_written_before_the_refit_read_as_none():
    """conversion.json of schema 2 (every stored recovery run) had no refit: it reads as refit none, and no
    per-layer errors."""
    from conftest import REPO
    from mla_zoo.modeling.convert_schema import ConversionReport

    old = REPO / "bench" / "results" / "recovery" / "convert32_v6_h100.json"
    assert '"schema_version": 2' in old.read_text()
    report = ConversionReport.read(old)
    assert report.settings.refit == "none" and report.output_refit is None
    assert ConversionReport.from_json(report.to_json()) == report


def test_too_few_calibration_tokens_skip_the_refit_with_a_warning():
    """Fewer than MIN_TOKENS_PER_INPUT tokens per o_proj input made SmolLM2 worse: the converter keeps the source's
    projection and says so."""
    source = tiny_source("llama-gqa")
    few = refit.MIN_TOKENS_PER_INPUT * source.model.layers[0].self_attn.o_proj.in_features - 32
    mla, report = convert_tiny(source, rope_pairs=2, kv_rank_per_head=4, refit="output", calib_tokens=few,
                               calib_seq_len=32)  # self-samples: rows of 32 tokens, `few` in all
    assert report.calibration.tokens == few
    assert report.output_refit is None and any("output refit was skipped" in w for w in report.warnings)
    for src, dst in zip(source.model.layers, mla.model.layers, strict=True):
        assert torch.equal(src.self_attn.o_proj.weight, dst.self_attn.o_proj.weight)
