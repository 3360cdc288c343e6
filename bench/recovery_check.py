"""Evaluate a recovered checkpoint against its original, the same way for both (`mla-zoo eval`'s
functions): perplexity on a text (fp32, 1024-token windows, first 8192 tokens), top-1 agreement
with the original, and the behaviour prompts (greedy; the first is the France one). One JSON object.

    python bench/recovery_check.py CKPT ORIGINAL TEXT
"""

from __future__ import annotations

import json
import sys

import torch
from mla_zoo.zoo.evaluate import EvalSettings
from mla_zoo.zoo.evaluate.evaluation import evaluate


def main() -> None:
    ckpt, original, text_file = sys.argv[1:4]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = evaluate(ckpt, EvalSettings(text=text_file, seq_len=1024, max_tokens=8192, prompts=True),
                      teacher=original, device=device)
    result = {**report.to_dict(), "perplexity_ratio": report.perplexity / report.teacher_perplexity}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
