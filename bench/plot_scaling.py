"""1 GPU against several: loss curves in one PNG, and a table of tokens/s per GPU, scaling efficiency and
peak memory per GPU, from `mla-zoo finetune` reports (training.json) of runs at equal global batch.

    python bench/plot_scaling.py ONE.training.json TWO-DDP.training.json [...] -o scaling.png

The 1-process report is the reference (the first one with world_size 1). Tokens/s is the steady rate of
the global stage (the median of the logged intervals, the first one left out); scaling efficiency =
tokens/s per GPU of a run / tokens/s of the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE = "global"


def load(path: Path) -> dict:
    report = json.loads(path.read_text())
    if STAGE not in report.get("stages", {}):
        raise SystemExit(f"{path}: no {STAGE} stage in this training.json")
    return report


def name(path: Path) -> str:
    """NAME.training.json -> NAME; RUN/training.json -> RUN."""
    return path.parent.name if path.name == "training.json" else path.name.removesuffix(".training.json")


def label(path: Path, report: dict) -> str:
    return f"{name(path)} ({report['world_size']} x {report['device']})"


def rows(reports: dict[Path, dict]) -> list[dict]:
    """One row per run: tokens/s in all and per GPU, efficiency against the 1-process run, peak memory."""
    single = next((r for r in reports.values() if r["world_size"] == 1), None)
    if single is None:
        raise SystemExit("no 1-process report (world_size 1) among the inputs: nothing to scale against")
    base = single["steady_tokens_per_second"][STAGE] or single["throughput_tokens_per_second"][STAGE]
    table = []
    for path, r in reports.items():
        tps = r["steady_tokens_per_second"][STAGE] or r["throughput_tokens_per_second"][STAGE]
        per_gpu = tps / r["world_size"]
        table.append({
            "run": name(path), "processes": r["world_size"],
            "global_batch_tokens": r["tokens_per_step"], "tokens_per_second": tps,
            "tokens_per_second_per_gpu": round(per_gpu, 1), "scaling_efficiency": round(per_gpu / base, 3),
            "peak_memory_gib_per_gpu": [round(b / 2**30, 2) for b in r.get("peak_gpu_memory_bytes") or []],
            "final_loss": r["final_losses"][STAGE],
        })
    return table


def plot(reports: dict[Path, dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, r in reports.items():
        history = [h for h in r["stages"][STAGE]["log_history"] if "loss" in h]
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=label(path, r))
    ax.set_xlabel(f"optimizer step (global batch {next(iter(reports.values()))['tokens_per_step']:,} tokens)")
    ax.set_ylabel("distillation loss (KL to the teacher)")
    ax.set_title("Fine-tune on 1 GPU and on several, equal global batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="training.json files (one with world_size 1)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.reports if not p.is_file()]
    if missing:
        raise SystemExit(f"no such report: {', '.join(missing)}")
    reports = {p: load(p) for p in args.reports}
    batches = {r["tokens_per_step"] for r in reports.values()}
    if len(batches) > 1:
        print(f"warning: the global batches differ ({sorted(batches)} tokens): the loss curves do not compare",
              file=sys.stderr)
    table = rows(reports)
    plot(reports, args.output)
    for row in table:
        peaks = ", ".join(f"{g:.2f}" for g in row["peak_memory_gib_per_gpu"]) or "-"
        print(f"{row['run']:<24} x{row['processes']}  {row['tokens_per_second']:>10,.0f} tokens/s  "
              f"{row['tokens_per_second_per_gpu']:>10,.0f} per GPU  efficiency {row['scaling_efficiency']:.2f}  "
              f"peak GiB per GPU [{peaks}]  final loss {row['final_loss']:.4f}")
    print(json.dumps(table))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
