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

from .metrics import behaviour, lm_eval_tasks, load_behaviour, perplexity, top1_agreement
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


def evaluate(spec: str, settings: EvalSettings, teacher: str | None = None, device: str = "cpu") -> EvalReport:
    """Everything `mla-zoo eval --text` reports for one model (an MLA checkpoint or any SOURCE)."""
    started = time.time()
    s = settings
    if s.text is None:
        raise EvalError("give a `text` to measure (or `suite` for the multi-domain suite)")
    text = read_text(s.text, "text")
    dtype = getattr(torch, s.dtype)
    if teacher:
        model, tokenizer, teacher_model = _load_pair(spec, teacher, dtype, device)
    else:
        model, tokenizer = load_model(spec, dtype)
        model = model.to(device)
    ppl = perplexity(model, tokenizer, text, s.seq_len, s.max_tokens)
    report = EvalReport(
        model=str(spec), text=str(s.text), seq_len=s.seq_len, **ppl,
        kv_cache_bytes_per_token=kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8)["after"],
        kv_cache_dtype=s.dtype,
    )
    if teacher:
        report.teacher = str(teacher)
        report.teacher_perplexity = perplexity(teacher_model, tokenizer, text, s.seq_len, s.max_tokens)["perplexity"]
        report.top1_agreement = top1_agreement(model, teacher_model, tokenizer, text, s.seq_len, s.max_tokens)
    if s.prompts:
        report.behaviour = behaviour(model, tokenizer, load_behaviour(suite_dir(s.suite_dir) / "behaviour.jsonl"),
                                     s.behaviour_new_tokens or 48)
    if s.tasks:
        report.tasks = lm_eval_tasks(str(spec), list(s.tasks), device)
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
    """Both models measured with the same settings; `text_name` is how reports name the text."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for label, spec in (("base", base), ("mla", str(mla))):
        log(f"eval: perplexity of the {label} model on {text_name}")
        report = evaluate(spec, settings, device=device)
        report.model, report.text = label, text_name
        results[label] = report
    suite = None
    if settings.suite:
        log("eval: the multi-domain suite, the MLA model against the base model")
        suite = evaluate_suite(str(mla), base, settings, device=device)
        suite.model, suite.teacher = "mla", "base"
    return EvalComparison(text=text_name, seq_len=settings.seq_len, max_tokens=settings.max_tokens,
                          dtype=settings.dtype, base=results["base"], mla=results["mla"],
                          perplexity_delta=results["mla"].perplexity / results["base"].perplexity - 1, suite=suite)
