"""The measurements of `mla-zoo eval`, on loaded models: perplexity, top-1 agreement with a teacher,
answers to behaviour prompts, and lm-evaluation-harness tasks."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from mla_zoo.modeling.common import EvalError, progress_bar

from .reports import BehaviourAnswer


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 1024, max_tokens: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity over non-overlapping windows of seq_len tokens (each window predicts its
    tokens 2..seq_len from the ones before). Returns perplexity, tokens scored, mean NLL."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens:
        ids = ids[:max_tokens]
    max_len = getattr(model.config, "max_position_embeddings", seq_len)
    if seq_len > max_len:
        raise EvalError(f"`seq_len` {seq_len} is beyond the model's {max_len} positions")
    if ids.numel() < 2:
        raise EvalError("the evaluation text has fewer than 2 tokens")
    nll, count = 0.0, 0
    starts = range(0, ids.numel() - 1, seq_len)
    for start in progress_bar(starts, desc="perplexity", unit="window", enabled=progress, leave=False):
        window = ids[start : start + seq_len][None].to(model.device)  # [1, L]
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window, use_cache=False).logits.float()  # [1, L, vocab]
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll += float(loss)
        count += window.shape[1] - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "nll": nll / count}


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


@torch.no_grad()
def top1_agreement(model, teacher, tokenizer, text: str, seq_len: int = 1024, max_tokens: int | None = None) -> float:
    """Fraction of positions where the model's and the teacher's most likely next tokens agree."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    same = total = 0
    for start in range(0, ids.numel() - 1, seq_len):
        window = ids[start : start + seq_len][None]  # [1, L]
        a = model(input_ids=window.to(model.device), use_cache=False).logits.argmax(-1).cpu()
        b = teacher(input_ids=window.to(teacher.device), use_cache=False).logits.argmax(-1).cpu()
        same += int((a == b).sum())
        total += window.numel()
    return same / total


def lm_eval_tasks(spec: str, tasks: list[str], device: str) -> dict:
    """An lm-evaluation-harness run (needs `lm_eval` and a network for its datasets)."""
    try:
        import lm_eval
    except ImportError as e:
        raise EvalError("`tasks` needs lm-evaluation-harness: pip install lm-eval (and a network)") from e
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={spec},trust_remote_code=True",
                                  tasks=tasks, device=device)
    return out["results"]
