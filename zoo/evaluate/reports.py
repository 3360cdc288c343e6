"""The evaluate stage's schema: `EvalSettings` (the `[eval]` section of a recipe, the flags of `mla-zoo
eval`) and its reports: `EvalReport` (one model on one text), `SuiteReport` (the multi-domain suite,
`suite.py`) and `EvalComparison` (a release's eval_results.json). No torch here: commands that only
read reports (`mla-zoo list`, `info`, `pull`, `publish`) and the model card import this module, not the
measurements (`metrics.py`, `suite.py`, `evaluation.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mla_zoo.modeling.common import EvalError
from mla_zoo.modeling.schema import Report, Settings, setting

DEFAULT_SUITE = Path(__file__).resolve().parents[2] / "data" / "eval"  # the repository's held-out data


def suite_dir(path: str | Path | None) -> Path:
    """The suite directory: `path`, or the repository's data/eval."""
    found = Path(path) if path else DEFAULT_SUITE
    if not (found / "domains.json").is_file():
        raise EvalError(f"`suite_dir` {found} holds no domains.json (a checkout's data/eval/ is a suite directory)")
    return found


@dataclass
class EvalSettings(Settings):
    """What is measured: the `[eval]` section of a recipe, the flags of `mla-zoo eval`."""

    text: str | None = setting(None, path="file", help="UTF-8 text file to measure perplexity on")
    seq_len: int = setting(1024, min=2, help="window length (each window scores its tokens 2..seq_len)")
    max_tokens: int | None = setting(None, min=2, help="score at most this many tokens of the text (of each domain "
                                                       "with --suite)")
    dtype: str = setting("float32", choices=("float32", "bfloat16"), help="dtype the model runs in")
    prompts: bool = setting(False, help="answer the suite's behaviour prompts (greedy)")
    suite: bool = setting(False, help="the multi-domain suite against --teacher: every domain's perplexity, the "
                                      "teacher's, top-1 agreement and KL (worst first), the teacher's chat answers, "
                                      "the behaviour prompts the teacher answers right")
    suite_dir: str | None = setting(None, path="dir", help="the suite's data (default: the repository's data/eval)")
    domains: tuple[str, ...] = setting((), sep=",", help="comma-separated: only these domains of the suite")
    chat_new_tokens: int = setting(96, min=0, help="length of the teacher's answers to the suite's chat prompts "
                                                   "(0: no chat part)")
    behaviour_new_tokens: int = setting(48, min=0, help="length of the greedy answers to behaviour prompts (0: none)")
    max_prompts: int | None = setting(None, min=1, help="use only the first N chat and behaviour prompts (fast checks)")
    tasks: tuple[str, ...] = setting((), sep=",", help="comma-separated lm-evaluation-harness tasks (needs lm-eval "
                                                       "and a network)")


@dataclass
class EvalReport(Report):
    """One model on one text (+ its teacher, behaviour prompts and tasks when asked for)."""

    model: str
    text: str
    seq_len: int
    perplexity: float
    tokens: int  # scored
    nll: float  # mean per scored token
    kv_cache_bytes_per_token: int
    kv_cache_dtype: str
    teacher: str | None = None
    teacher_perplexity: float | None = None
    top1_agreement: float | None = None
    behaviour: list[BehaviourAnswer] = field(default_factory=list)
    tasks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class BehaviourAnswer:
    prompt: str
    answer: str
    expected: str  # the check, as JSON
    ok: bool  # the answer passes it


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


@dataclass
class EvalComparison(Report):
    """eval_results.json of a release: the original (base) and the MLA model on the same text."""

    FILE = "eval_results.json"

    text: str  # as the recipe names it
    seq_len: int
    max_tokens: int | None
    dtype: str
    base: EvalReport
    mla: EvalReport
    perplexity_delta: float  # mla / base - 1
    suite: SuiteReport | None = None  # the MLA model against the base on the multi-domain suite

    SCHEMA_VERSION = 2  # 2: `suite`


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
