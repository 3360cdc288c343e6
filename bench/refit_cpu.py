"""The output refit (`mla-zoo convert --refit output`, modeling/refit.py) against none, one-shot: SmolLM2-135M-Instruct,
output-aware SVD, r=4 (2-norm), d_kv 32 and 8, calibrated on 16,384 tokens of a novel (data/calib.txt) or of the
original's own samples (the sample of bench/svd_layerwise_cpu.sh, made here if missing); perplexity on the first
2,048 tokens of each of the suite's five domains. The ridge (`refit.RIDGE`) is scanned at d_kv=32 on the own
samples: it was chosen on code, technical and fiction; encyclopedic and dialogue check the choice.

    python bench/refit_cpu.py    # ~20 min on 2 cores; bench/results/refit_cpu.json
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

from mla_zoo.modeling import convert, refit, sources
from mla_zoo.modeling.common import read_text
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.evaluate.metrics import perplexity

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "technical", "encyclopedic", "fiction", "dialogue")
SAMPLE = Path("/tmp/mla-zoo-layerwise/data")  # bench/svd_layerwise_cpu.sh's own-sample set
RIDGES = (0.01, 0.1, 0.3, 1.0)  # the scan (d_kv=32, own samples); refit.RIDGE is the default


def own_sample() -> Path:
    if not (SAMPLE / "synth.json").exists():
        subprocess.run(["mla-zoo", "synth-data", "smollm2-135m", "-o", str(SAMPLE), "--tokens", "16384",
                        "--seq-len", "512", "--mix", "chat=0.4+bos=0.2+text=0.4", "--seed", "1", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
    return SAMPLE


def main() -> None:
    model, tokenizer, info = sources.resolve("smollm2-135m")
    texts = {name: read_text(REPO / f"data/eval/{name}.txt") for name in DOMAINS}
    rows = []

    def score(mla, **what) -> None:
        ppl = {name: perplexity(mla, tokenizer, text, 1024, 2048, progress=False).perplexity
               for name, text in texts.items()}
        rows.append({**what, **ppl})
        print(json.dumps(rows[-1]), flush=True)

    for calib_name, calib in (("own samples", own_sample()), ("fiction", REPO / "data/calib.txt")):
        for d_kv in (32, 8):
            settings = ConvertSettings(kv_rank_per_head=d_kv, rope_pairs=4, rope_strategy="2-norm", svd="output-aware",
                                       refit="none", calib_text=str(calib), calib_tokens=16384, dtype="float32")
            mla, _ = convert.convert_model(model, tokenizer, info, settings, progress=False)
            score(mla, calibration=calib_name, d_kv=d_kv, refit="none", ridge=None)
            calib_rows, _, _ = convert.calibrate(model, tokenizer, convert.resolve_settings(settings, model.config))
            scan = RIDGES if (calib_name, d_kv) == ("own samples", 32) else (refit.RIDGE,)
            for ridge in scan:
                fitted = copy.deepcopy(mla)
                errors = refit.refit_outputs(model, fitted, calib_rows, ridge=ridge)
                mean = sum(e.error_after for e in errors) / len(errors)
                score(fitted, calibration=calib_name, d_kv=d_kv, refit="output", ridge=ridge,
                      mean_error_before=sum(e.error_before for e in errors) / len(errors), mean_error_after=mean)
    out = REPO / "bench/results/refit_cpu.json"
    out.write_text(json.dumps({"tokens_per_domain": 2048, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
