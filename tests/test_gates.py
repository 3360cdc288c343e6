"""Release gates on the multi-domain suite: one row per domain, behaviour kept, and a build that stops
when one domain fails (tiny models, the suite on short texts)."""

from __future__ import annotations

import json

import pytest
from mla_zoo.modeling.common import GateFailed, RecipeError
from mla_zoo.modeling.convert_schema import KVCacheSize
from mla_zoo.zoo.evaluate import EvalComparison, EvalReport, SuiteReport
from mla_zoo.zoo.evaluate.reports import DEFAULT_SUITE, BehaviourResult, ChatResult, DomainResult
from mla_zoo.zoo.release.build import build
from mla_zoo.zoo.release.gates import GateSettings, check_gates
from mla_zoo.zoo.release.recipe import load_recipe

KV = KVCacheSize(100, 30, 0.7, 10, 3)


def comparison(suite: SuiteReport | None) -> EvalComparison:
    one = EvalReport(model="m", text="t", seq_len=8, perplexity=10.0, tokens=7, nll=2.3, kv_cache_bytes_per_token=1,
                     kv_cache_dtype="float32")
    return EvalComparison(text="t", seq_len=8, max_tokens=None, dtype="float32", base=one, mla=one,
                          perplexity_delta=0.0, suite=suite)


def suite_report() -> SuiteReport:
    domains = [DomainResult("code", 100, 12.0, 10.0, 0.2, 0.8, 0.1), DomainResult("fiction", 100, 10.4, 10.0, 0.04,
                                                                                   0.9, 0.05)]
    behaviour = [BehaviourResult("a", "knowledge", "p", "Paris", True, "Paris", True),
                 BehaviourResult("b", "knowledge", "p", "Lyon", False, None, None),
                 BehaviourResult("c", "arithmetic", "p", "4", True, "5", False)]
    return SuiteReport(model="mla", teacher="base", seq_len=8, max_tokens=None, dtype="float32", domains=domains,
                       chat=ChatResult(4, 40, 0.12, 0.85), behaviour=behaviour)


def test_suite_gates_give_one_row_per_domain():
    gates = GateSettings(max_domain_perplexity_increase=0.05, min_domain_top1_agreement=0.85, max_chat_kl=0.2,
                         min_chat_top1_agreement=0.9, min_behaviour_kept=0.5)
    rows = {r.gate: r for r in check_gates(gates, comparison(suite_report()), KV)}
    assert not rows["max_domain_perplexity_increase[code]"].passed
    assert rows["max_domain_perplexity_increase[fiction]"].passed
    assert not rows["min_domain_top1_agreement[code]"].passed and rows["min_domain_top1_agreement[fiction]"].passed
    assert rows["max_chat_kl"].passed and not rows["min_chat_top1_agreement"].passed
    kept = rows["min_behaviour_kept"]  # 1 of the 2 the base model answers right ("b" is not scored)
    assert kept.value == 0.5 and kept.passed and "lost: c" in kept.text
    assert not check_gates(GateSettings(min_behaviour_kept=1.0), comparison(suite_report()), KV)[0].passed


def test_suite_gates_without_a_suite_fail():
    rows = check_gates(GateSettings(max_domain_perplexity_increase=1.0), comparison(None), KV)
    assert len(rows) == 1 and not rows[0].passed and "eval.suite" in rows[0].text


def test_old_eval_results_still_load():
    data = comparison(None).to_dict()
    data.pop("suite")
    data["schema_version"] = 1
    assert EvalComparison.from_dict(data).suite is None
    assert EvalComparison.from_dict(comparison(suite_report()).to_dict()).suite.domains[0].name == "code"


RECIPE = """\
[release]
name = "Tiny"
repo_id = "mla-zoo/Tiny"
version = "0.1.0"
base_model = "mla-zoo-tests/tiny"

[source]
model = "src"

[conversion]
kv_rank_per_head = 8
rope_pairs = 2
rope_strategy = "high"
svd = "joint"
dtype = "float32"

[eval]
text = "heldout.txt"
seq_len = 128
max_tokens = 256
{suite}
[eval.gates]
{gates}
"""


@pytest.fixture(scope="module")
def workspace(recipe_workspace):
    """This module's own copy of the tiny recipe workspace (conftest), with a short multi-domain suite."""
    root = recipe_workspace("gated")
    suite = root / "suite"
    suite.mkdir()
    domains = json.loads((DEFAULT_SUITE / "domains.json").read_text())["domains"][:2]
    for d in domains:
        (suite / d["file"]).write_text((DEFAULT_SUITE / d["file"]).read_text()[:1500])
    (suite / "domains.json").write_text(json.dumps({"domains": domains}))
    (suite / "chat_prompts.txt").write_text("How do I tie a knot?\nWhy is ice slippery?\n")
    (suite / "behaviour.jsonl").write_text(json.dumps({"id": "any", "category": "knowledge", "prompt": "Hello.",
                                                       "check": {"regex": "(?s)^.*$"}}) + "\n")
    return root


SUITE = 'suite = true\nsuite_dir = "suite"\nchat_new_tokens = 6\nbehaviour_new_tokens = 4\n'


def recipe(root, name, suite, gates):
    path = root / f"{name}.toml"
    path.write_text(RECIPE.format(suite=suite, gates=gates))
    return load_recipe(path)


def test_a_build_stops_on_the_worst_domain_and_passes_a_loose_gate(workspace):
    strict = recipe(workspace, "strict", SUITE, "max_domain_perplexity_increase = 0.0001\nmin_behaviour_kept = 1.0")
    with pytest.raises(GateFailed, match=r"max_domain_perplexity_increase\[\w+\]") as failed:
        build(strict, workspace / "out-strict", progress=False, log=lambda m: None)
    names = [g["gate"] for g in failed.value.gates]
    assert sum(n.startswith("max_domain_perplexity_increase[") for n in names) == 2
    loose = recipe(workspace, "loose", SUITE, "max_domain_perplexity_increase = 1e6\nmin_behaviour_kept = 1.0")
    summary = build(loose, workspace / "out-loose", progress=False, log=lambda m: None)
    assert summary["release"] is not None and all(g["passed"] for g in summary["gates"])
    results = json.loads((workspace / "out-loose" / "hub" / "eval_results.json").read_text())
    assert [d["name"] for d in results["suite"]["domains"]] and results["suite"]["behaviour"][0]["teacher_ok"]
    card = (workspace / "out-loose" / "hub" / "README.md").read_text()  # the card shows every domain's numbers
    for d in results["suite"]["domains"]:
        assert (f"| {d['name']} | {d['teacher_perplexity']:.3f} | {d['perplexity']:.3f} | "
                f"{100 * d['perplexity_increase']:+.1f}% | {100 * d['top1_agreement']:.1f}% |") in card
    chat = results["suite"]["chat"]
    assert f"answers to {chat['prompts']} held-out prompts" in card and f"KL {chat['kl']:.3f}" in card
    assert "it keeps 1 of the 1 that the base model answers right." in card


def test_suite_gates_need_the_suite(workspace):
    with pytest.raises(RecipeError, match="eval.gates.max_chat_kl reads the multi-domain suite"):
        recipe(workspace, "nosuite", "", "max_chat_kl = 0.1")
    with pytest.raises(RecipeError, match="eval.suite_dir"):
        recipe(workspace, "nodir", 'suite = true\nsuite_dir = "nowhere"\n', "")
