"""The multi-domain evaluation suite (`mla-zoo eval CKPT --teacher ORIGINAL --suite`, and the gates).

A suite directory (the repository's `data/eval/`, see its SOURCES.md) holds:
* `domains.json` + one text per domain (fiction, technical, dialogue, code, encyclopedic): each is
  scored in non-overlapping windows by the model and by its teacher in the same pass: perplexity
  of both, top-1 agreement (the two most likely next tokens are the same) and KL(teacher || model);
* `chat_prompts.txt`: held-out prompts that the TEACHER answers (greedy); the model is scored on
  those answers, teacher-forced: KL and top-1 agreement on the answer tokens;
* `behaviour.jsonl`: prompts with a deterministic check of the greedy answer. Only the prompts that
  the teacher itself answers right are scored; the report names the ones it fails.

The domains are reported worst first (highest perplexity relative to the teacher's). Nothing here
is training data: tests/test_eval_data.py and tests/test_synth.py check that.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from mla_zoo.modeling.common import EvalError, read_text

from .metrics import BehaviourPrompt, TextScore, greedy_answers, load_behaviour, score_text, text_ids
from .reports import BehaviourResult, ChatResult, DomainResult, SuiteReport, suite_dir


def domain_files(root: Path, names: tuple[str, ...] = ()) -> dict[str, Path]:
    """{domain: text file} of a suite directory, in its order (only `names` when given)."""
    listed = {d["name"]: root / d["file"] for d in json.loads((root / "domains.json").read_text())["domains"]}
    unknown = [n for n in names if n not in listed]
    if unknown:
        raise EvalError(f"`domains`: no domain {unknown[0]!r} in {root} (domains: {', '.join(listed)})")
    return {n: p for n, p in listed.items() if not names or n in names}


def chat_prompts(root: Path) -> list[str]:
    lines = read_text(root / "chat_prompts.txt", "suite_dir").splitlines()
    return [line.strip() for line in lines if line.strip()]


# ----------------------------------------------------------------------------- measurements


def score_domain(model, teacher, tokenizer, name: str, text: str, seq_len: int, max_tokens: int | None,
                 progress: bool = False) -> DomainResult:
    """Both models over the same non-overlapping windows, in one pass (`metrics.score_text`)."""
    score = score_text(model, text_ids(tokenizer, text, max_tokens, name), seq_len, teacher, progress, desc=name)
    ppl, t_ppl = score.perplexity, score.teacher_perplexity
    return DomainResult(name, score.count, ppl, t_ppl, ppl / t_ppl - 1, score.top1_agreement, score.mean_kl)


@torch.no_grad()
def score_chat(model, teacher, tokenizer, prompts: list[str], max_new_tokens: int) -> ChatResult:
    """The teacher answers each prompt (greedy); both models then read prompt + answer in one forward
    and are compared at the positions that predict the answer tokens."""
    score = TextScore()
    for prompt_ids, answer in greedy_answers(teacher, tokenizer, prompts, max_new_tokens):
        if not answer:
            continue
        seq = torch.tensor(prompt_ids + answer)[None]  # [1, P + A]
        first = len(prompt_ids) - 1  # the position that predicts the first answer token
        logits = model(input_ids=seq.to(model.device), use_cache=False).logits[0, first:-1]  # [A, V]
        t_logits = teacher(input_ids=seq.to(teacher.device), use_cache=False).logits[0, first:-1]
        score.add(logits.to(t_logits.device), seq[0, first + 1 :].to(t_logits.device), t_logits)
    if score.count == 0:
        raise EvalError("the teacher gave no answer tokens to the chat prompts")
    return ChatResult(len(prompts), score.count, score.mean_kl, score.top1_agreement)


def score_behaviour(model, teacher, tokenizer, prompts: list[BehaviourPrompt], max_new_tokens: int
                    ) -> list[BehaviourResult]:
    """The teacher answers every prompt; the model only those the teacher answers right."""

    def texts(m, ps):
        return [tokenizer.decode(a, skip_special_tokens=True).strip()
                for _, a in greedy_answers(m, tokenizer, [p.prompt for p in ps], max_new_tokens)]

    teacher_texts = texts(teacher, prompts)
    right = [p for p, t in zip(prompts, teacher_texts, strict=True) if p.passes(t)]
    answers = dict(zip([p.id for p in right], texts(model, right) if right else [], strict=True))
    return [BehaviourResult(p.id, p.category, p.prompt, t, p.id in answers, answers.get(p.id),
                            p.passes(answers[p.id]) if p.id in answers else None)
            for p, t in zip(prompts, teacher_texts, strict=True)]


def run_suite(model, teacher, tokenizer, settings, model_name: str, teacher_name: str,
              progress: bool = False) -> SuiteReport:
    """The whole suite on loaded models (`settings`: EvalSettings; its suite fields say what to run)."""
    started = time.time()
    s = settings
    root = suite_dir(s.suite_dir)
    domains = [score_domain(model, teacher, tokenizer, name, read_text(path, "suite_dir"), s.seq_len, s.max_tokens,
                            progress)
               for name, path in domain_files(root, s.domains).items()]
    domains.sort(key=lambda d: d.perplexity_increase, reverse=True)
    report = SuiteReport(model=model_name, teacher=teacher_name, seq_len=s.seq_len, max_tokens=s.max_tokens,
                         dtype=s.dtype, domains=domains)
    if s.chat_new_tokens:
        report.chat = score_chat(model, teacher, tokenizer, chat_prompts(root)[: s.max_prompts], s.chat_new_tokens)
    if s.behaviour_new_tokens:
        prompts = load_behaviour(root / "behaviour.jsonl")[: s.max_prompts]
        report.behaviour = score_behaviour(model, teacher, tokenizer, prompts, s.behaviour_new_tokens)
    report.seconds = round(time.time() - started, 2)
    return report
