"""Release gates: limits a release must pass after evaluation (`[eval.gates]` of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from mla_zoo.modeling.convert import KVCacheSize
from mla_zoo.modeling.schema import Settings, setting
from mla_zoo.zoo.evaluate import EvalComparison


@dataclass
class GateSettings(Settings):
    """Limits a release must pass after evaluation; a failed gate stops it."""

    max_perplexity_increase: float | None = setting(None, min=0, help="relative: 0.25 = +25% over the base model")
    max_perplexity: float | None = setting(None, gt=0, help="of the MLA model")
    min_kv_reduction: float | None = setting(None, min=0, max=1, help="fraction of the base model's KV cache saved")


@dataclass
class GateResult:
    gate: str
    value: float
    limit: float
    passed: bool
    text: str


def check_gates(gates: GateSettings, metrics: EvalComparison, kv_cache: KVCacheSize) -> list[GateResult]:
    """One row per configured gate."""
    mla = metrics.mla.perplexity
    rows = []
    if gates.max_perplexity_increase is not None:
        value, limit = metrics.perplexity_delta, gates.max_perplexity_increase
        rows.append(GateResult("max_perplexity_increase", value, limit, value <= limit,
                               f"perplexity increase {100 * value:+.2f}% (limit +{100 * limit:.2f}%)"))
    if gates.max_perplexity is not None:
        rows.append(GateResult("max_perplexity", mla, gates.max_perplexity, mla <= gates.max_perplexity,
                               f"MLA perplexity {mla:.3f} (limit {gates.max_perplexity:g})"))
    if gates.min_kv_reduction is not None:
        value, limit = kv_cache.reduction, gates.min_kv_reduction
        rows.append(GateResult("min_kv_reduction", value, limit, value >= limit,
                               f"KV-cache reduction {100 * value:.2f}% (minimum {100 * limit:.2f}%)"))
    return rows
