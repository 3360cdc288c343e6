"""Evaluation: perplexity on text files and KV-cache bytes per token, measured the same way for the
original model and its MLA conversion (so the two numbers in a table are comparable)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from mla_zoo.modeling import sources
from mla_zoo.modeling.common import EvalError, read_text
from mla_zoo.modeling.convert import kv_bytes_per_token
from tqdm.auto import tqdm


def is_mla_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "llama_mla"


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """An MLA checkpoint (through its own remote code, as users load it) or any convertible SOURCE."""
    if is_mla_checkpoint(spec):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=True, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(spec, trust_remote_code=True)
    model, tokenizer, _ = sources.resolve(spec, dtype=dtype)
    return model, tokenizer


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
        raise EvalError(f"--seq-len {seq_len} is beyond the model's {max_len} positions")
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


@torch.no_grad()
def behaviour(model, tokenizer, max_new_tokens: int = 32) -> list[dict]:
    """Greedy answers to BEHAVIOUR_PROMPTS (chat template when the tokenizer has one)."""
    import re

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
        results.append({"prompt": prompt, "answer": text, "expected": expected, "ok": ok})
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
        raise EvalError("--tasks needs lm-evaluation-harness: pip install lm-eval (and a network)") from e
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={spec},trust_remote_code=True",
                                  tasks=tasks, device=device)
    return out["results"]


def evaluate(spec: str, text_file: str, seq_len: int = 1024, max_tokens: int | None = None,
             dtype: torch.dtype = torch.float32, teacher: str | None = None, prompts: bool = False,
             tasks: list[str] | None = None, device: str = "cpu") -> dict:
    """Everything `mla-zoo eval` reports for one model; the teacher, prompts and tasks are optional."""
    started = time.time()
    model, tokenizer = load_model(spec, dtype)
    model = model.to(device)
    text = read_text(text_file, "text")
    result = perplexity(model, tokenizer, text, seq_len, max_tokens)
    kv = kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8)
    report = {
        "model": str(spec),
        "text": str(text_file),
        "seq_len": seq_len,
        **result,
        "kv_cache_bytes_per_token": kv["after"],
        "kv_cache_dtype": str(dtype).replace("torch.", ""),
    }
    if teacher:
        teacher_model, teacher_tok = load_model(teacher, dtype)
        from mla_zoo.zoo.finetune import check_tokenizers

        check_tokenizers(tokenizer, teacher_tok, model.config, teacher_model.config)
        teacher_model = teacher_model.to(device)
        report["teacher"] = str(teacher)
        report["teacher_perplexity"] = perplexity(teacher_model, tokenizer, text, seq_len, max_tokens)["perplexity"]
        report["top1_agreement"] = top1_agreement(model, teacher_model, tokenizer, text, seq_len, max_tokens)
    if prompts:
        report["behaviour"] = behaviour(model, tokenizer)
    if tasks:
        report["tasks"] = lm_eval_tasks(str(spec), tasks, device)
    report["seconds"] = round(time.time() - started, 2)
    return report
