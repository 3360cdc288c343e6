"""How the one-shot quality of the whitened conversion moves with the amount of calibration data.

SmolLM2-135M-Instruct, d_kv=32, r=4 (2-norm), whitened SVD; calibration = the first N tokens of
real prose (data/calib.txt, then data/train.txt for larger N) or N tokens of the model's own chat
samples (data-free); perplexity on the first 4,096 tokens of data/heldout.txt.

    python bench/calib_tokens_smollm2.py   # writes bench/results/calib_tokens_smollm2.json
"""

from __future__ import annotations

import json
from pathlib import Path

from mla_zoo.modeling import sources
from mla_zoo.modeling.common import read_text
from mla_zoo.modeling.convert import convert_model
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.evaluate.metrics import perplexity

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    model, tokenizer, info = sources.resolve("smollm2-135m")
    heldout = read_text(REPO / "data/heldout.txt")
    prose = REPO / "data/calib.txt"
    rows = []
    for kind, n in [("text", 512), ("text", 2048), ("text", 8192), ("text", 16384), ("self-samples", 1024)]:
        settings = ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="2-norm", svd="whitened",
                                   calib_text=str(prose) if kind == "text" else None, calib_tokens=n,
                                   dtype="float32")
        mla, report = convert_model(model, tokenizer, info, settings, progress=False)
        ppl = perplexity(mla, tokenizer, heldout, 1024, 4096, progress=False).row()
        rows.append({"calibration": kind, "calib_tokens": report.calibration.tokens, **ppl})
        print(rows[-1], flush=True)
    out = REPO / "bench/results/calib_tokens_smollm2.json"
    out.write_text(json.dumps({"heldout_tokens": 4096, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
