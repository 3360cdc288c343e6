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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mla_zoo.modeling.common import EvalError, progress_bar, read_text
from mla_zoo.modeling.schema import Report

from .metrics import BehaviourPrompt, greedy_answers, load_behaviour

if TYPE_CHECKING:
    import torch

DEFAULT_SUITE = Path(__file__).resolve().parents[2] / "data" / "eval"  # the repository's held-out data


def suite_dir(path: str | Path | None) -> Path:
    """The suite directory: `path`, or the repository's data/eval."""
    found = Path(path) if path else DEFAULT_SUITE
    if not (found / "domains.json").is_file():
        raise EvalError(f"`suite_dir` {found} holds no domains.json (a checkout's data/eval/ is a suite directory)")
    return found


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


# ----------------------------------------------------------------------------- the report


@dataclass
class DomainResult:
    """The model against its teacher on one domain text."""

    name: str
    tokens: int  # scored
    perplexity: float
    teacher_perplexity: float
    perplexity_increase: float  # perplexity / teacher_perplexity - 1
    top1_agreement: float
    kl: float  # mean KL(teacher || model) per scored token, nats


@dataclass
class ChatResult:
    """The model on the teacher's own greedy answers to the held-out chat prompts (teacher-forced)."""

    prompts: int
    tokens: int  # answer tokens scored
    kl: float
    top1_agreement: float


@dataclass
class BehaviourResult:
    id: str
    category: str
    prompt: str
    teacher_answer: str
    teacher_ok: bool
    answer: str | None  # the model's; None where the teacher fails (not scored)
    ok: bool | None


@dataclass
class SuiteReport(Report):
    """`mla-zoo eval --suite`: every domain (worst first), the chat answers and the behaviour prompts."""

    FILE = "suite.json"

    model: str
    teacher: str
    seq_len: int
    max_tokens: int | None  # per domain
    dtype: str
    domains: list[DomainResult]
    chat: ChatResult | None = None
    behaviour: list[BehaviourResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def worst(self) -> DomainResult:
        return self.domains[0]

    @property
    def behaviour_scored(self) -> int:
        """Prompts the teacher answers right (the only ones scored)."""
        return sum(b.teacher_ok for b in self.behaviour)

    @property
    def behaviour_kept(self) -> int:
        return sum(bool(b.ok) for b in self.behaviour if b.teacher_ok)

    @property
    def teacher_fails(self) -> list[str]:
        return [b.id for b in self.behaviour if not b.teacher_ok]


# ----------------------------------------------------------------------------- measurements


@dataclass
class _Sums:
    nll: float = 0.0
    teacher_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits, teacher_logits: [n, vocab] at the n positions that predict `targets` [n]."""
        import torch.nn.functional as F

        logp = F.log_softmax(logits.float(), dim=-1)  # [n, V]
        t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
        self.nll += float(F.nll_loss(logp, targets, reduction="sum"))
        self.teacher_nll += float(F.nll_loss(t_logp, targets, reduction="sum"))
        self.kl += float((t_logp.exp() * (t_logp - logp)).sum())
        self.agree += int((logp.argmax(-1) == t_logp.argmax(-1)).sum())
        self.count += targets.numel()


def score_domain(model, teacher, tokenizer, name: str, text: str, seq_len: int, max_tokens: int | None,
                 progress: bool = False) -> DomainResult:
    """Both models over the same non-overlapping windows (each window scores its tokens 2..seq_len)."""
    import torch

    with torch.no_grad():
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
        if ids.numel() < 2:
            raise EvalError(f"the {name} text has fewer than 2 tokens")
        sums = _Sums()
        starts = range(0, ids.numel() - 1, seq_len)
        for start in progress_bar(starts, desc=name, unit="window", enabled=progress, leave=False):
            window = ids[start : start + seq_len][None]  # [1, L]
            if window.shape[1] < 2:
                break
            logits = model(input_ids=window.to(model.device), use_cache=False).logits[0, :-1]  # [L-1, V]
            t_logits = teacher(input_ids=window.to(teacher.device), use_cache=False).logits[0, :-1]
            sums.add(logits.to(t_logits.device), t_logits, window[0, 1:].to(t_logits.device))
        ppl, t_ppl = _exp(sums.nll / sums.count), _exp(sums.teacher_nll / sums.count)
        return DomainResult(name, sums.count, ppl, t_ppl, ppl / t_ppl - 1, sums.agree / sums.count,
                            sums.kl / sums.count)


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))  # a broken model's perplexity stays a finite number


def score_chat(model, teacher, tokenizer, prompts: list[str], max_new_tokens: int) -> ChatResult:
    """The teacher answers each prompt (greedy); both models then read prompt + answer in one forward
    and are compared at the positions that predict the answer tokens."""
    import torch

    with torch.no_grad():
        sums = _Sums()
        for prompt_ids, answer in greedy_answers(teacher, tokenizer, prompts, max_new_tokens):
            if not answer:
                continue
            seq = torch.tensor(prompt_ids + answer)[None]  # [1, P + A]
            first = len(prompt_ids) - 1  # the position that predicts the first answer token
            logits = model(input_ids=seq.to(model.device), use_cache=False).logits[0, first:-1]  # [A, V]
            t_logits = teacher(input_ids=seq.to(teacher.device), use_cache=False).logits[0, first:-1]
            sums.add(logits.to(t_logits.device), t_logits, seq[0, first + 1 :].to(t_logits.device))
        if sums.count == 0:
            raise EvalError("the teacher gave no answer tokens to the chat prompts")
        return ChatResult(len(prompts), sums.count, sums.kl / sums.count, sums.agree / sums.count)


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


def format_suite(r: SuiteReport) -> str:
    """The terminal table of a suite report, worst domain first."""
    lines = [f"{r.model} against {r.teacher} ({r.dtype}, windows of {r.seq_len}"
             + (f", at most {r.max_tokens} tokens per domain)" if r.max_tokens else ")"),
             f"{'domain':<14}{'tokens':>8}{'ppl':>10}{'teacher':>10}{'change':>9}{'top-1':>8}{'KL':>8}"]
    for d in r.domains:
        lines.append(f"{d.name:<14}{d.tokens:>8}{d.perplexity:>10.3f}{d.teacher_perplexity:>10.3f}"
                     f"{100 * d.perplexity_increase:>+8.1f}%{100 * d.top1_agreement:>7.1f}%{d.kl:>8.4f}")
    if r.chat is not None:
        c = r.chat
        lines.append(f"chat answers  {c.tokens:>8} tokens of the teacher's answers to {c.prompts} prompts: "
                     f"top-1 {100 * c.top1_agreement:.1f}%, KL {c.kl:.4f}")
    if r.behaviour:
        lines.append(f"behaviour     kept {r.behaviour_kept} of the {r.behaviour_scored} prompts the teacher answers "
                     f"right; the teacher fails {len(r.teacher_fails)}: {', '.join(r.teacher_fails) or '-'}")
        lines += [f"  lost {b.id}: {b.answer!r}" for b in r.behaviour if b.teacher_ok and not b.ok]
    return "\n".join(lines)
