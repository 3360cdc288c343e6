"""The measurements of `mla-zoo eval`, on loaded models: a text scored in one pass (perplexity, and against a
teacher its perplexity, top-1 agreement and KL), answers to behaviour prompts, and lm-evaluation-harness
tasks."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from mla_zoo.modeling.common import EvalError, progress_bar

from .reports import BehaviourAnswer


@dataclass
class TextScore:
    """Sums over the scored positions of a text: the model's NLL and, against a teacher, the teacher's
    NLL, KL(teacher || model) and top-1 agreement (the two most likely next tokens are the same)."""

    nll: float = 0.0
    teacher_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        """logits (and teacher_logits): [n, vocab] at the n positions that predict `targets` [n]."""
        logp = F.log_softmax(logits.float(), dim=-1)  # [n, V]
        self.nll += float(F.nll_loss(logp, targets, reduction="sum"))
        self.count += targets.numel()
        if teacher_logits is None:
            return
        t_logp = F.log_softmax(teacher_logits.float(), dim=-1)  # [n, V]
        self.teacher_nll += float(F.nll_loss(t_logp, targets, reduction="sum"))
        self.kl += float((t_logp.exp() * (t_logp - logp)).sum())
        self.agree += int((logp.argmax(-1) == t_logp.argmax(-1)).sum())

    @property
    def mean_nll(self) -> float:
        return self.nll / self.count

    def row(self) -> dict:
        """The perplexity columns of a benchmark's JSON row."""
        return {"perplexity": self.perplexity, "tokens": self.count, "nll": self.mean_nll}

    @property
    def perplexity(self) -> float:
        return bounded_exp(self.nll / self.count)

    @property
    def teacher_perplexity(self) -> float:
        return bounded_exp(self.teacher_nll / self.count)

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.count

    @property
    def mean_kl(self) -> float:
        return self.kl / self.count


def bounded_exp(x: float) -> float:
    return math.exp(min(x, 700.0))  # a broken model's perplexity stays a finite number


def text_ids(tokenizer, text: str, max_tokens: int | None, name: str = "evaluation") -> torch.Tensor:
    """The first `max_tokens` token ids of `text` (all without it): [N], N >= 2."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    if ids.numel() < 2:
        raise EvalError(f"the {name} text has fewer than 2 tokens")
    return ids


@torch.no_grad()
def score_text(model, ids: torch.Tensor, seq_len: int, teacher=None, progress: bool = False,
               desc: str = "perplexity") -> TextScore:
    """The model, and its teacher when given, over the same non-overlapping windows of `ids` [N] in one
    pass (each window of L tokens scores its tokens 2..L)."""
    for m in (model, teacher) if teacher is not None else (model,):
        max_len = getattr(m.config, "max_position_embeddings", seq_len)
        if seq_len > max_len:
            raise EvalError(f"`seq_len` {seq_len} is beyond the model's {max_len} positions")
    score = TextScore()
    starts = range(0, ids.numel() - 1, seq_len)  # every window holds at least 2 tokens
    for start in progress_bar(starts, desc=desc, unit="window", enabled=progress, leave=False):
        window = ids[start : start + seq_len][None]  # [1, L]
        logits = model(input_ids=window.to(model.device), use_cache=False).logits[0, :-1]  # [L-1, V]
        if teacher is None:
            score.add(logits, window[0, 1:].to(logits.device))
            continue
        t_logits = teacher(input_ids=window.to(teacher.device), use_cache=False).logits[0, :-1]  # [L-1, V]
        score.add(logits.to(t_logits.device), window[0, 1:].to(t_logits.device), t_logits)
    return score


def perplexity(model, tokenizer, text: str, seq_len: int = 1024, max_tokens: int | None = None,
               progress: bool = True) -> TextScore:
    """The model's score of a text over non-overlapping windows of seq_len tokens (`score_text` without a
    teacher): `.perplexity`, `.count` tokens scored, `.mean_nll`."""
    return score_text(model, text_ids(tokenizer, text, max_tokens), seq_len, progress=progress)


@dataclass
class BehaviourPrompt:
    """One line of the suite's behaviour.jsonl: a prompt and a deterministic check of its greedy answer."""

    id: str
    category: str  # knowledge | arithmetic | instruction | refusal
    prompt: str
    check: dict  # {"contains_any": [...]} or {"regex": "..."}, both case-insensitive

    def passes(self, answer: str) -> bool:
        if "contains_any" in self.check:
            return any(s.lower() in answer.lower() for s in self.check["contains_any"])
        return re.search(self.check["regex"], answer, flags=re.IGNORECASE) is not None


def load_behaviour(path) -> list[BehaviourPrompt]:
    """The behaviour prompts of a suite directory's behaviour.jsonl."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(BehaviourPrompt(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise EvalError(f"{path}:{n}: not a behaviour prompt ({e})") from e
    return rows


def chat_text(tokenizer, prompt: str) -> str:
    """A user prompt as the model is asked it: its chat template, else a plain question/answer frame."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return f"Question: {prompt}\nAnswer:"


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16
                   ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids up to and including the first EOS) of each prompt, greedy, batched
    with left padding."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    results = []
    for start in range(0, len(encoded), batch_size):
        part = encoded[start : start + batch_size]
        width = max(len(e) for e in part)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in part])  # [b, width]
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in part])
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos).cpu()  # [b, width + new]
        for row, prompt_ids in enumerate(part):
            answer = out[row, width:].tolist()
            if eos in answer:
                answer = answer[: answer.index(eos) + 1]
            results.append((list(prompt_ids), answer))
    return results


def behaviour(model, tokenizer, prompts: list[BehaviourPrompt], max_new_tokens: int = 48) -> list[BehaviourAnswer]:
    """Greedy answers to behaviour prompts (chat template when the tokenizer has one), each checked."""
    answers = greedy_answers(model, tokenizer, [p.prompt for p in prompts], max_new_tokens)
    texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for _, a in answers]
    return [BehaviourAnswer(p.prompt, t, json.dumps(p.check), p.passes(t)) for p, t in zip(prompts, texts, strict=True)]


def lm_eval_tasks(spec: str, tasks: list[str], device: str) -> dict:
    """An lm-evaluation-harness run (needs `lm_eval` and a network for its datasets)."""
    try:
        import lm_eval
    except ImportError as e:
        raise EvalError("`tasks` needs lm-evaluation-harness: pip install lm-eval (and a network)") from e
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={spec},trust_remote_code=True",
                                  tasks=tasks, device=device)
    return out["results"]
