"""One-shot quality of MHA2MLA on the bundled SmolLM2-135M-Instruct (no fine-tuning), on CPU.

Converts at the paper's three settings (r=4 pairs, 2-norm, d_kv = 32 / 16 / 8 per KV head) with the
weight-only joint SVD and the activation-aware (whitened) one, and measures perplexity on the
held-out text with `mla-zoo eval`'s own function, so every row is measured the same way.

    python bench/oneshot_smollm2.py [--max-tokens 8192] [--out bench/results/oneshot_smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mla_zoo.modeling import sources
from mla_zoo.modeling.common import read_text
from mla_zoo.modeling.convert import convert_model
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.evaluate.metrics import perplexity

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--settings", default="32,16,8")
    p.add_argument("--svds", default="joint,whitened")
    p.add_argument("--out", default=str(REPO / "bench/results/oneshot_smollm2.json"))
    args = p.parse_args()

    model, tokenizer, info = sources.resolve("smollm2-135m")
    text = read_text(REPO / "data/heldout.txt")
    rows = []
    base = perplexity(model, tokenizer, text, args.seq_len, args.max_tokens).row()
    rows.append({"model": "original (GQA)", "d_kv": 64, "svd": "-", "kv_reduction": 0.0, **base})
    print(rows[-1], flush=True)
    for d_kv in map(int, args.settings.split(",")):
        for svd in args.svds.split(","):
            started = time.time()
            settings = ConvertSettings(kv_rank_per_head=d_kv, rope_pairs=4, rope_strategy="2-norm", svd=svd,
                                       calib_text=str(REPO / "data/calib.txt"), calib_tokens=args.calib_tokens,
                                       dtype="float32")
            mla, report = convert_model(model, tokenizer, info, settings, progress=False)
            result = perplexity(mla, tokenizer, text, args.seq_len, args.max_tokens).row()
            rows.append({"model": "MLA", "d_kv": d_kv, "svd": svd, "kv_reduction": report.kv_cache.reduction,
                         "convert_seconds": report.seconds, "seconds": round(time.time() - started, 1), **result})
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"text": "data/heldout.txt", "max_tokens": args.max_tokens,
                                          "seq_len": args.seq_len, "rows": rows}, indent=2) + "\n")
    print("| model | d_kv per KV head | SVD | KV cache | perplexity |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['d_kv']} | {r['svd']} | -{100 * r['kv_reduction']:.2f}% | {r['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
