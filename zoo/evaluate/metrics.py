"""The measurements of `mla-zoo eval`, on loaded models: perplexity, top-1 agreement with a teacher,
answers to behaviour prompts, and lm-evaluation-harness tasks."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from mla_zoo.modeling.common import EvalError
from tqdm.auto import tqdm


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
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        window = ids[start : start + seq_len][None].to(model.device)  # [1, L]
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window, use_cache=False).logits.float()  # [1, L, vocab]
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll += float(loss)
        count += window.shape[1] - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "nll": nll / count}


# A fixed set of behaviour prompts, answered greedily: a quick look at whether a conversion kept
# what the model knew and how it talks (the first one is the project's smoke test: "Paris").
BEHAVIOUR_PROMPTS = [
    ("What is the capital of France?", "Paris"),
    ("How many days are there in a week?", "seven|7"),
    ("What is the opposite of hot?", "cold"),
    ("Name a primary colour.", "red|blue|yellow"),
    ("Translate 'thank you' into French.", "merci"),
]


@dataclass
class BehaviourAnswer:
    prompt: str
    answer: str
    expected: str  # a regular expression
    ok: bool  # the answer matches it


@torch.no_grad()
def behaviour(model, tokenizer, max_new_tokens: int = 32) -> list[BehaviourAnswer]:
    """Greedy answers to BEHAVIOUR_PROMPTS (chat template when the tokenizer has one)."""
    results = []
    for prompt, expected in BEHAVIOUR_PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        else:
            enc = tokenizer(f"Question: {prompt}\nAnswer:", return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        ok = re.search(expected, text, flags=re.IGNORECASE) is not None
        results.append(BehaviourAnswer(prompt, text, expected, ok))
    return results


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
