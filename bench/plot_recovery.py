"""Perplexity against H100-minutes for the recovery runs in bench/results/recovery/ (PNG).

Time axis: synthetic-data generation (once, shared by all runs) + conversion + training, each
stage's tokens divided by its measured steady tokens/s; perplexity evaluations excluded.

    python bench/plot_recovery.py   # writes bench/recovery_smollm2.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = [("ft32", "d_kv=32 (-68.75%), layer-wise + global", "32"), ("ft32g", "d_kv=32 (-68.75%), global only", "32"),
        ("ft16", "d_kv=16 (-81.25%), layer-wise + global", "16"), ("ft8", "d_kv=8 (-87.5%), layer-wise + global", "8")]


def curve(name: str, dkv: str, synth_s: float) -> tuple[list[float], list[float]]:
    d = HERE / "results/recovery"
    train = json.loads((d / f"{name}.training.json").read_text())
    start = synth_s + json.loads((d / f"convert{dkv}.json").read_text())["seconds"]
    xs, ys, offset = [], [], start
    for stage in train["stage_steps"]:
        tps = train["steady_tokens_per_second"][stage]
        points = [c for c in train["perplexity_curve"] if c["stage"] == stage]
        for c in points:
            xs.append((offset + c["tokens"] / tps) / 60)
            ys.append(c["perplexity"])
        offset += points[-1]["tokens"] / tps
    return xs, ys


def main() -> None:
    synth_s = json.loads((HERE / "results/recovery/synth.json").read_text())["seconds"]
    base = json.loads((HERE / "results/recovery/ft32.eval.json").read_text())["original"]["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label, dkv in RUNS:
        xs, ys = curve(name, dkv, synth_s)
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(base, color="black", lw=1, label=f"original GQA ({base:.1f})")
    ax.axhline(base * 1.05, color="gray", lw=0.8, ls="--", label="+5% / +10% targets")
    ax.axhline(base * 1.10, color="gray", lw=0.8, ls="--")
    ax.axvline(synth_s / 60, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("H100 minutes (synthetic data, then conversion, then training)")
    ax.set_ylabel("perplexity, data/heldout.txt (8k tokens)")
    ax.set_title("SmolLM2-135M-Instruct -> MLA: recovery by distillation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "recovery_smollm2.png", dpi=120)


if __name__ == "__main__":
    main()
