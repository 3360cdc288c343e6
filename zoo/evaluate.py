"""Evaluation: perplexity on text files and KV-cache bytes per token, measured the same way for the
original model and its MLA conversion (so the two numbers in a table are comparable)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from mla_zoo.modeling import sources
from mla_zoo.modeling.calibration import read_text
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
        raise ValueError(f"--seq-len {seq_len} is beyond the model's {max_len} positions")
    if ids.numel() < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens")
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


def evaluate(spec: str, text_file: str, seq_len: int = 1024, max_tokens: int | None = None,
             dtype: torch.dtype = torch.float32) -> dict:
    started = time.time()
    model, tokenizer = load_model(spec, dtype)
    result = perplexity(model, tokenizer, read_text(text_file), seq_len, max_tokens)
    kv = kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8)
    return {
        "model": str(spec),
        "text": str(text_file),
        "seq_len": seq_len,
        **result,
        "kv_cache_bytes_per_token": kv["after"],
        "kv_cache_dtype": str(dtype).replace("torch.", ""),
        "seconds": round(time.time() - started, 2),
    }
