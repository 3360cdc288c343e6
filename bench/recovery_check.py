"""Evaluate a recovered checkpoint against its original, the same way for both: perplexity on a
text (fp32, 1024-token windows, first 8192 tokens), top-1 agreement with the original, and the
France prompt (greedy). Prints one JSON object.

    python bench/recovery_check.py CKPT ORIGINAL TEXT
"""

from __future__ import annotations

import json
import sys

import torch

from mla_zoo.modeling.calibration import read_text
from mla_zoo.zoo.evaluate import load_model, perplexity

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def answer(model, tokenizer) -> str:
    enc = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def top1_agreement(a, b, tokenizer, text: str, tokens: int = 8192, seq_len: int = 1024) -> float:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
    same = total = 0
    for start in range(0, ids.numel() - 1, seq_len):
        w = ids[start : start + seq_len][None].to(a.device)
        same += int((a(input_ids=w).logits.argmax(-1) == b(input_ids=w).logits.argmax(-1)).sum())
        total += w.numel()
    return same / total


def main() -> None:
    ckpt, original, text_file = sys.argv[1:4]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    text = read_text(text_file)
    mla, tok = load_model(ckpt)
    base, base_tok = load_model(original)
    mla, base = mla.to(dev), base.to(dev)
    result = {"checkpoint": ckpt, "original": original, "text": text_file}
    seq = min(1024, base.config.max_position_embeddings)
    for name, model in (("original", base), ("mla", mla)):
        result[name] = {**perplexity(model, tok, text, seq, 8192, progress=False), "france": answer(model, tok)}
    result["perplexity_ratio"] = result["mla"]["perplexity"] / result["original"]["perplexity"]
    result["top1_agreement"] = top1_agreement(mla, base, tok, text, seq_len=seq)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
