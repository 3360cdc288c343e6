"""The output-aware SVD's one free number, the NoPE key rows' weight (`convert.KEY_ROW_SCALE`), against the
whitened SVD: SmolLM2-135M-Instruct, d_kv=32, r=4 (2-norm), calibrated on 16,384 tokens of data/calib.txt;
one-shot perplexity on the first 2,048 tokens of three of the suite's domains (the two others, encyclopedic and
dialogue, were left out of the choice and checked after it with bench/recovery_cpu.sh).

    python bench/svd_key_scale_cpu.py    # ~4 min on 2 cores; bench/results/svd_key_scale_cpu.json
"""

from __future__ import annotations

import json
from pathlib import Path

from mla_zoo.modeling import convert, sources
from mla_zoo.modeling.common import read_text
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.evaluate.metrics import perplexity

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "technical", "fiction")
SCALES = (2.0, 1.0, 0.5, 0.316, 0.173)  # key rows' share of their energy: 4, 1, 1/4, 1/10, 1/30


def main() -> None:
    model, tokenizer, info = sources.resolve("smollm2-135m")
    texts = {name: read_text(REPO / f"data/eval/{name}.txt") for name in DOMAINS}
    rows = []
    for svd, scale in [("whitened", None)] + [("output-aware", s) for s in SCALES]:
        if scale is not None:
            convert.KEY_ROW_SCALE = scale
        settings = ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="2-norm", svd=svd,
                                   calib_text=str(REPO / "data/calib.txt"), calib_tokens=16384, dtype="float32")
        mla, _ = convert.convert_model(model, tokenizer, info, settings, progress=False)
        ppl = {name: perplexity(mla, tokenizer, text, 1024, 2048, progress=False).perplexity
               for name, text in texts.items()}
        rows.append({"svd": svd, "key_row_scale": scale, **ppl})
        print(json.dumps(rows[-1]), flush=True)
    out = REPO / "bench/results/svd_key_scale_cpu.json"
    out.write_text(json.dumps({"tokens_per_domain": 2048, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
