"""`mla-zoo eval` and the build's eval stage: one model's `EvalReport` on a text, the multi-domain
suite against the original (`evaluate_suite`, see `suite.py`), or an original and its MLA conversion
measured the same way (`compare`), so that the two numbers in a table are comparable."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from mla_zoo.modeling import sources
from mla_zoo.modeling.common import EvalError, read_text
from mla_zoo.modeling.convert import kv_bytes_per_token

from .metrics import behaviour, bounded_exp, lm_eval_tasks, load_behaviour, score_text, text_ids
from .reports import EvalComparison, EvalReport, EvalSettings, SuiteReport, suite_dir
from .suite import run_suite


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """An MLA checkpoint (through its own remote code, as users load it) or any convertible SOURCE."""
    if sources.is_mla_checkpoint(spec):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=True, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(spec, trust_remote_code=True)
    model, tokenizer, _ = sources.resolve(spec, dtype=dtype)
    return model, tokenizer


def _load_pair(spec: str, teacher: str, dtype: torch.dtype, device: str):
    """(model, tokenizer, teacher model) on `device`; the two must share a tokenizer."""
    model, tokenizer = load_model(spec, dtype)
    teacher_model, teacher_tok = load_model(teacher, dtype)
    sources.check_same_tokenizer(tokenizer, teacher_tok, model.config, teacher_model.config)
    return model.to(device), tokenizer, teacher_model.to(device)


def _text(s: EvalSettings) -> str:
    if s.text is None:
        raise EvalError("give a `text` to measure (or `suite` for the multi-domain suite)")
    return read_text(s.text, "text")


def _report(spec: str, model, tokenizer, s: EvalSettings, nll: float, count: int, device: str) -> EvalReport:
    """One model's `EvalReport` from its summed NLL over the `count` scored tokens of the text, with the
    behaviour prompts and tasks when the settings ask for them."""
    kv_bytes = kv_bytes_per_token(model.config, torch.finfo(getattr(torch, s.dtype)).bits // 8)["after"]
    report = EvalReport(model=spec, text=str(s.text), seq_len=s.seq_len, perplexity=bounded_exp(nll / count),
                        tokens=count, nll=nll / count, kv_cache_bytes_per_token=kv_bytes, kv_cache_dtype=s.dtype)
    if s.prompts:
        report.behaviour = behaviour(model, tokenizer, load_behaviour(suite_dir(s.suite_dir) / "behaviour.jsonl"),
                                     s.behaviour_new_tokens or 48)
    if s.tasks:
        report.tasks = lm_eval_tasks(spec, list(s.tasks), device)
    return report


def evaluate(spec: str, settings: EvalSettings, teacher: str | None = None, device: str = "cpu") -> EvalReport:
    """Everything `mla-zoo eval --text` reports for one model (an MLA checkpoint or any SOURCE): its
    perplexity and, with a `teacher`, the teacher's perplexity and their top-1 agreement, in one pass."""
    started = time.time()
    s = settings
    text = _text(s)
    dtype = getattr(torch, s.dtype)
    if teacher:
        model, tokenizer, teacher_model = _load_pair(spec, teacher, dtype, device)
    else:
        (model, tokenizer), teacher_model = load_model(spec, dtype), None
        model = model.to(device)
    score = score_text(model, text_ids(tokenizer, text, s.max_tokens), s.seq_len, teacher_model, progress=True)
    report = _report(str(spec), model, tokenizer, s, score.nll, score.count, device)
    if teacher:
        report.teacher = str(teacher)
        report.teacher_perplexity = score.teacher_perplexity
        report.top1_agreement = score.top1_agreement
    report.seconds = round(time.time() - started, 2)
    return report


def evaluate_suite(spec: str, teacher: str, settings: EvalSettings, device: str = "cpu",
                   progress: bool = False) -> SuiteReport:
    """`mla-zoo eval SPEC --teacher TEACHER --suite`: the multi-domain suite (`suite.run_suite`)."""
    if not teacher:
        raise EvalError("`suite` compares the model with its original: give the `teacher`")
    model, tokenizer, teacher_model = _load_pair(spec, teacher, getattr(torch, settings.dtype), device)
    return run_suite(model, teacher_model, tokenizer, settings, str(spec), str(teacher), progress)


def compare(base: str, mla: str | Path, settings: EvalSettings, text_name: str,
            log=lambda msg: None) -> EvalComparison:
    """Both models measured with the same settings, each loaded once: the text scored by both in one pass
    (each report's `seconds` holds half of the loading and scoring), then the suite when asked for (the MLA
    model against the base). `text_name` is how reports name the text."""
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = settings
    text = _text(s)
    mla_model, tokenizer, base_model = _load_pair(str(mla), base, getattr(torch, s.dtype), device)
    log(f"eval: perplexity of the base and the MLA model on {text_name}")
    score = score_text(mla_model, text_ids(tokenizer, text, s.max_tokens), s.seq_len, base_model, progress=True)
    shared = time.time() - started
    reports = {}
    for label, spec, model, nll in (("base", base, base_model, score.teacher_nll),
                                    ("mla", str(mla), mla_model, score.nll)):
        own = time.time()
        reports[label] = _report(spec, model, tokenizer, s, nll, score.count, device)
        reports[label].model, reports[label].text = label, text_name
        reports[label].seconds = round(shared / 2 + time.time() - own, 2)
    suite = None
    if s.suite:
        log("eval: the multi-domain suite, the MLA model against the base model")
        suite = run_suite(mla_model, base_model, tokenizer, s, "mla", "base")
    return EvalComparison(text=text_name, seq_len=s.seq_len, max_tokens=s.max_tokens, dtype=s.dtype,
                          base=reports["base"], mla=reports["mla"],
                          perplexity_delta=reports["mla"].perplexity / reports["base"].perplexity - 1, suite=suite)
