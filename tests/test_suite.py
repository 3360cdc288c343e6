"""The multi-domain evaluation suite (`mla-zoo eval --suite`) on tiny models, against plain references."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from mla_zoo.zoo.cli import main
from mla_zoo.zoo.evaluate import EvalSettings, SuiteReport, evaluation
from mla_zoo.zoo.evaluate.evaluation import evaluate, evaluate_suite, load_model
from mla_zoo.zoo.evaluate.reports import DEFAULT_SUITE
from mla_zoo.zoo.evaluate.suite import score_domain


def convert(src, out, *flags):
    return main(["convert", str(src), "-o", str(out), "--dtype", "float32", *flags])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A small suite directory: the first 3,000 characters of three domains, four chat prompts and two
    behaviour prompts, one whose check every answer passes and one that none passes."""
    root = tmp_path_factory.mktemp("suite")
    domains = json.loads((DEFAULT_SUITE / "domains.json").read_text())["domains"][:3]
    for d in domains:
        (root / d["file"]).write_text((DEFAULT_SUITE / d["file"]).read_text()[:3000])
    (root / "domains.json").write_text(json.dumps({"domains": domains}))
    shutil.copy(DEFAULT_SUITE / "chat_prompts.txt", root / "chat_prompts.txt")
    rows = [{"id": "anything", "category": "knowledge", "prompt": "Say something.", "check": {"regex": "(?s)^.*$"}},
            {"id": "never", "category": "instruction", "prompt": "Say nothing.", "check": {"regex": "(?!)"}}]
    (root / "behaviour.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def models(source_dir, tmp_path_factory):
    """(source, lossless conversion, lossy conversion) of the tiny GQA Llama."""
    src = source_dir("llama-gqa")
    tmp = tmp_path_factory.mktemp("mla")
    exact, lossy = tmp / "exact", tmp / "lossy"
    assert convert(src, exact, "--rope-strategy", "high", "--rope-pairs", "8", "--kv-rank", "32", "--svd", "joint") == 0
    assert convert(src, lossy, "--rope-strategy", "high", "--rope-pairs", "1", "--kv-rank", "4", "--svd", "joint") == 0
    return src, exact, lossy


def settings(suite, **kw) -> EvalSettings:
    return EvalSettings(suite=True, suite_dir=str(suite), seq_len=128, max_tokens=400, chat_new_tokens=12,
                        behaviour_new_tokens=8, max_prompts=4, **kw)


def test_a_lossless_conversion_matches_its_teacher_on_every_part(models, suite):
    src, exact, _ = models
    r = evaluate_suite(str(exact), str(src), settings(suite))
    assert [d.name for d in r.domains] and len(r.domains) == 3
    for d in r.domains:
        assert d.perplexity == pytest.approx(d.teacher_perplexity, rel=1e-4)
        assert d.top1_agreement > 0.99 and abs(d.kl) < 1e-4
    assert r.chat.prompts == 4 and r.chat.tokens > 4 and r.chat.top1_agreement > 0.99 and abs(r.chat.kl) < 1e-4
    assert r.teacher_fails == ["never"] and r.behaviour_scored == 1 and r.behaviour_kept == 1
    never = next(b for b in r.behaviour if b.id == "never")
    assert never.answer is None and never.ok is None  # not scored: the teacher itself fails it


@dataclass
class PlainScores:
    nll: float = 0.0  # sums over the scored positions
    teacher_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0


@torch.no_grad()
def plain_scores(student, teacher, ids: torch.Tensor, seq_len: int) -> PlainScores:
    """Both models' full logits on every window of `ids`, in float64."""
    r = PlainScores()
    for start in range(0, ids.numel() - 1, seq_len):
        w = ids[start : start + seq_len][None]
        s = F.log_softmax(student(w).logits[0, :-1].double(), -1)
        t = F.log_softmax(teacher(w).logits[0, :-1].double(), -1)
        y = w[0, 1:]
        r.nll -= float(s.gather(1, y[:, None]).sum())
        r.teacher_nll -= float(t.gather(1, y[:, None]).sum())
        r.kl += float((t.exp() * (t - s)).sum())
        r.agree += int((s.argmax(-1) == t.argmax(-1)).sum())
        r.count += y.numel()
    return r


def test_domain_numbers_equal_a_plain_recomputation(models, suite):
    """Perplexities, top-1 agreement and KL of one domain, against the full logits of both models."""
    src, _, lossy = models
    student, tok = load_model(str(lossy))
    teacher, _ = load_model(str(src))
    text = (suite / "fiction.txt").read_text()
    got = score_domain(student, teacher, tok, "fiction", text, seq_len=100, max_tokens=250)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:250]
    want = plain_scores(student, teacher, ids, 100)
    count = want.count
    assert got.tokens == count == 99 + 99 + 49
    assert got.perplexity == pytest.approx(math.exp(want.nll / count), rel=1e-4)
    assert got.teacher_perplexity == pytest.approx(math.exp(want.teacher_nll / count), rel=1e-4)
    assert got.perplexity_increase == pytest.approx(got.perplexity / got.teacher_perplexity - 1, rel=1e-6)
    assert got.kl == pytest.approx(want.kl / count, rel=1e-3) and got.kl > 1e-3
    assert got.top1_agreement == pytest.approx(want.agree / count)


def test_evaluate_with_a_teacher_equals_a_plain_recomputation(models, suite):
    """`mla-zoo eval --text --teacher` (one pass over the text): the model's and the teacher's perplexity and
    their top-1 agreement at the scored positions, against the full logits of both models."""
    src, _, lossy = models
    text = suite / "fiction.txt"
    got = evaluate(str(lossy), EvalSettings(text=str(text), seq_len=100, max_tokens=250), teacher=str(src))
    student, tok = load_model(str(lossy))
    teacher, _ = load_model(str(src))
    ids = tok(text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0][:250]
    want = plain_scores(student, teacher, ids, 100)
    assert got.tokens == want.count == 247
    assert got.nll == pytest.approx(want.nll / want.count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want.nll / want.count), rel=1e-4)
    assert got.teacher_perplexity == pytest.approx(math.exp(want.teacher_nll / want.count), rel=1e-4)
    assert got.top1_agreement == pytest.approx(want.agree / want.count) and got.top1_agreement < 1
    alone = evaluate(str(lossy), EvalSettings(text=str(text), seq_len=100, max_tokens=250))
    assert (alone.perplexity, alone.nll, alone.tokens) == (got.perplexity, got.nll, got.tokens)
    assert alone.teacher is None and alone.teacher_perplexity is None and alone.top1_agreement is None


def test_compare_loads_each_model_once_and_equals_separate_evaluations(models, suite, monkeypatch):
    """A release's eval stage: the base and the MLA model loaded once for both the text and the suite; each
    report equals an `evaluate` of that model alone."""
    src, _, lossy = models
    loads = []

    def counting_load(spec, dtype=torch.float32):
        loads.append(spec)
        return load_model(spec, dtype)

    monkeypatch.setattr(evaluation, "load_model", counting_load)
    s = replace(settings(suite, text=str(suite / "fiction.txt")), chat_new_tokens=0, behaviour_new_tokens=0)
    got = evaluation.compare(str(src), lossy, s, "fiction")
    assert sorted(loads) == sorted([str(src), str(lossy)])
    assert got.suite is not None and (got.suite.model, got.suite.teacher) == ("mla", "base") and got.suite.domains
    for label, spec in (("base", str(src)), ("mla", str(lossy))):
        report, alone = getattr(got, label), evaluate(spec, replace(s, suite=False))
        assert (report.model, report.text) == (label, "fiction")
        assert (report.perplexity, report.nll, report.tokens, report.kv_cache_bytes_per_token) == (
            alone.perplexity, alone.nll, alone.tokens, alone.kv_cache_bytes_per_token)
        assert report.teacher is None and report.top1_agreement is None
    assert got.perplexity_delta == got.mla.perplexity / got.base.perplexity - 1 > 0


def test_cli_suite_json_lists_domains_worst_first(models, suite, capsys):
    src, _, lossy = models
    capsys.readouterr()
    assert main(["eval", str(lossy), "--teacher", str(src), "--suite", "--suite-dir", str(suite), "--seq-len", "128",
                 "--max-tokens", "300", "--chat-new-tokens", "8", "--behaviour-new-tokens", "4", "--max-prompts", "2",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    report = SuiteReport.from_dict(data)
    increases = [d["perplexity_increase"] for d in data["domains"]]
    assert increases == sorted(increases, reverse=True) and increases[0] > 0
    assert report.worst.name == data["domains"][0]["name"] and report.chat.kl > 0
    assert main(["eval", str(lossy), "--teacher", str(src), "--suite", "--suite-dir", str(suite), "--seq-len", "128",
                 "--max-tokens", "300", "--chat-new-tokens", "0", "--behaviour-new-tokens", "0"]) == 0
    table = capsys.readouterr().out
    assert table.index(data["domains"][0]["name"]) < table.index(data["domains"][-1]["name"])


def test_suite_errors_name_the_flag(models, suite, tmp_path, capsys):
    src, _, lossy = models
    assert main(["eval", str(lossy), "--suite", "--suite-dir", str(suite)]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["eval", str(lossy), "--teacher", str(src), "--suite", "--suite-dir", str(tmp_path)]) == 2
    assert "--suite-dir" in capsys.readouterr().err
    assert main(["eval", str(lossy), "--teacher", str(src), "--suite", "--suite-dir", str(suite),
                 "--domains", "poetry"]) == 2
    assert "--domains" in capsys.readouterr().err
