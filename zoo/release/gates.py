"""Release gates: limits a release must pass after evaluation (`[eval.gates]` of a recipe).

The `*domain*`, `*chat*` and `*behaviour*` gates read the multi-domain suite (`eval.suite = true`):
a domain gate gives one row per domain, so a release passes only when EVERY domain does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mla_zoo.modeling.convert_schema import KVCacheSize
from mla_zoo.modeling.schema import Settings, setting
from mla_zoo.zoo.evaluate import EvalComparison

SUITE_GATES = ("max_domain_perplexity_increase", "min_domain_top1_agreement", "max_chat_kl",
               "min_chat_top1_agreement", "min_behaviour_kept")


@dataclass
class GateSettings(Settings):
    """Limits a release must pass after evaluation; a failed gate stops it."""

    max_perplexity_increase: float | None = setting(None, min=0, help="relative: 0.25 = +25% over the base model")
    max_perplexity: float | None = setting(None, gt=0, help="of the MLA model")
    min_kv_reduction: float | None = setting(None, min=0, max=1, help="fraction of the base model's KV cache saved")
    max_domain_perplexity_increase: float | None = setting(
        None, min=0, help="suite: relative perplexity increase over the base model, on every domain (0.05 = +5%)")
    min_domain_top1_agreement: float | None = setting(None, min=0, max=1, help="suite: on every domain")
    max_chat_kl: float | None = setting(None, min=0, help="suite: KL(base || MLA) per token of the base model's "
                                                          "answers to the held-out chat prompts, nats")
    min_chat_top1_agreement: float | None = setting(None, min=0, max=1, help="suite: on those answers")
    min_behaviour_kept: float | None = setting(
        None, min=0, max=1, help="suite: share of the behaviour prompts the base model answers right that the MLA "
                                 "model answers right too (1 = every one)")

    def suite_gates(self) -> list[str]:
        """The configured gates that need the suite."""
        return [f.name for f in fields(self) if f.name in SUITE_GATES and getattr(self, f.name) is not None]


@dataclass
class GateResult:
    gate: str  # a field of GateSettings, with [domain] for a per-domain row
    value: float
    limit: float
    passed: bool
    text: str


def _at_most(gate: str, value: float, limit: float, text: str) -> GateResult:
    return GateResult(gate, value, limit, value <= limit, text)


def _at_least(gate: str, value: float, limit: float, text: str) -> GateResult:
    return GateResult(gate, value, limit, value >= limit, text)


def check_gates(gates: GateSettings, metrics: EvalComparison, kv_cache: KVCacheSize) -> list[GateResult]:
    """One row per configured gate (per domain for the domain gates)."""
    g, mla = gates, metrics.mla.perplexity
    rows = []
    if g.max_perplexity_increase is not None:
        value, limit = metrics.perplexity_delta, g.max_perplexity_increase
        rows.append(_at_most("max_perplexity_increase", value, limit,
                             f"perplexity increase {100 * value:+.2f}% (limit +{100 * limit:.2f}%)"))
    if g.max_perplexity is not None:
        rows.append(_at_most("max_perplexity", mla, g.max_perplexity,
                             f"MLA perplexity {mla:.3f} (limit {g.max_perplexity:g})"))
    if g.min_kv_reduction is not None:
        value = kv_cache.reduction
        rows.append(_at_least("min_kv_reduction", value, g.min_kv_reduction,
                              f"KV-cache reduction {100 * value:.2f}% (minimum {100 * g.min_kv_reduction:.2f}%)"))
    suite = metrics.suite
    if g.suite_gates() and suite is None:
        rows += [GateResult(name, float("nan"), getattr(g, name), False, "no suite result (eval.suite = false)")
                 for name in g.suite_gates()]
        return rows
    if suite is None:  # no suite result, and no suite gate asks for one
        return rows
    if g.max_domain_perplexity_increase is not None:
        limit = g.max_domain_perplexity_increase
        rows += [_at_most(f"max_domain_perplexity_increase[{d.name}]", d.perplexity_increase, limit,
                          f"{d.name}: perplexity {d.perplexity:.3f} vs {d.teacher_perplexity:.3f}, "
                          f"{100 * d.perplexity_increase:+.2f}% (limit +{100 * limit:.2f}%)") for d in suite.domains]
    if g.min_domain_top1_agreement is not None:
        limit = g.min_domain_top1_agreement
        rows += [_at_least(f"min_domain_top1_agreement[{d.name}]", d.top1_agreement, limit,
                           f"{d.name}: top-1 agreement {100 * d.top1_agreement:.1f}% (minimum {100 * limit:.1f}%)")
                 for d in suite.domains]
    if suite.chat is None:
        rows += [GateResult(name, float("nan"), getattr(g, name), False, "no chat result (eval.chat_new_tokens = 0)")
                 for name in ("max_chat_kl", "min_chat_top1_agreement") if getattr(g, name) is not None]
    if g.max_chat_kl is not None and suite.chat is not None:
        rows.append(_at_most("max_chat_kl", suite.chat.kl, g.max_chat_kl,
                             f"KL on the base model's chat answers {suite.chat.kl:.4f} (limit {g.max_chat_kl:g})"))
    if g.min_chat_top1_agreement is not None and suite.chat is not None:
        value, limit = suite.chat.top1_agreement, g.min_chat_top1_agreement
        rows.append(_at_least("min_chat_top1_agreement", value, limit,
                              f"top-1 agreement on the base model's chat answers {100 * value:.1f}% "
                              f"(minimum {100 * limit:.1f}%)"))
    if g.min_behaviour_kept is not None:
        scored, kept = suite.behaviour_scored, suite.behaviour_kept
        value = kept / scored if scored else 1.0
        lost = [b.id for b in suite.behaviour if b.teacher_ok and not b.ok]
        rows.append(_at_least("min_behaviour_kept", value, g.min_behaviour_kept,
                              f"behaviour prompts kept {kept} of {scored} the base model answers right"
                              + (f" (lost: {', '.join(lost)})" if lost else "")
                              + f" (minimum {100 * g.min_behaviour_kept:.0f}%)"))
    return rows
