"""Per-domain perplexity increase over the original, one bar group per domain and one bar per suite
report (`mla-zoo eval --suite --json` files), with the goal lines of issue 18 (+5%, +10%, +15%).

    python bench/plot_suite.py A.suite.json B.suite.json ... -o suite.png [--log]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mla_zoo.zoo.evaluate import SuiteReport  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--log", action="store_true", help="log scale (one-shot increases are 100x the goals)")
    args = p.parse_args()
    reports = {Path(f).name.removesuffix(".json").removesuffix(".suite"): SuiteReport.read(f) for f in args.reports}
    domains = sorted({d.name for r in reports.values() for d in r.domains})
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 2, 4))
    for k, (name, r) in enumerate(reports.items()):
        by_name = {d.name: 100 * d.perplexity_increase for d in r.domains}
        ax.bar([i + k * width for i in range(len(domains))], [by_name.get(d, 0) for d in domains], width, label=name)
    for goal in (5, 10, 15):
        ax.axhline(goal, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(reports) - 1) / 2 for i in range(len(domains))], domains)
    ax.set_ylabel("perplexity increase over the original (%)")
    if args.log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
