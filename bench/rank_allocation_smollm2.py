"""Per-layer rank allocation for SmolLM2-135M-Instruct: uniform vs energy (CARE-style), CPU, no MLA model.

For d_kv = 32 (-68.75% KV) and 8 (-87.5%): the calibration statistics of the recipes (4,096 tokens of
data/calib.txt, 2-norm pairs, r = 4), each layer's whitened spectrum (`lowrank.factorize(...).s`), the
ranks under both schemes at the same total (`rank_allocation.allocate`, multiples of --step) and the
whitened energy each layer keeps. Writes bench/results/rank_allocation_smollm2.json.

    python bench/rank_allocation_smollm2.py [--step 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from mla_zoo.modeling import lowrank, partial_rope, rank_allocation, sources
from mla_zoo.modeling.convert import calibrate, head_dim_of, layer_kv_matrix, resolve_settings
from mla_zoo.modeling.convert_schema import ConvertSettings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", type=int, default=8, help="ranks are multiples of this")
    p.add_argument("--out", default=str(ROOT / "bench/results/rank_allocation_smollm2.json"))
    args = p.parse_args()
    model, tokenizer, _ = sources.resolve("smollm2-135m", dtype=torch.float32)
    cfg = model.config
    s = resolve_settings(ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="2-norm", svd="whitened",
                                         calib_text=str(ROOT / "data/calib.txt"), calib_tokens=4096), cfg)
    _, stats, _ = calibrate(model, tokenizer, s)  # the pairs and moments do not depend on the rank
    d = head_dim_of(cfg)
    pairs = partial_rope.select_pairs(s.rope_strategy, cfg.num_hidden_layers, cfg.num_key_value_heads, d,
                                      s.rope_pairs, stats.pair_norms())
    spectra = [lowrank.factorize(layer_kv_matrix(layer.self_attn, pairs[i], d), stats.second_moment(i)).s
               for i, layer in enumerate(model.model.layers)]
    result = {"model": "smollm2-135m", "calib_tokens": stats.tokens, "step": args.step, "settings": {}}
    for d_kv in (32, 8):
        rank = d_kv * cfg.num_key_value_heads
        row = {"kv_lora_rank": rank}
        for scheme in rank_allocation.SCHEMES:
            ranks = rank_allocation.allocate(spectra, rank, scheme, step=args.step)
            kept = [rank_allocation.retained(sp, r) for sp, r in zip(spectra, ranks, strict=True)]
            row[scheme] = {"ranks": ranks, "retained": [round(k, 6) for k in kept],
                           "mean_retained": round(sum(kept) / len(kept), 6), "min_retained": round(min(kept), 6),
                           "total_rank": sum(ranks)}
        result["settings"][f"dkv{d_kv}"] = row
        u, e = row["uniform"], row["energy"]
        print(f"d_kv={d_kv} (kv_lora_rank {rank}, total {u['total_rank']} = {e['total_rank']}): retained whitened "
              f"energy mean {u['mean_retained']:.4f} -> {e['mean_retained']:.4f}, worst layer "
              f"{u['min_retained']:.4f} -> {e['min_retained']:.4f}")
        print("  layer  " + " ".join(f"{i:>5}" for i in range(len(spectra))))
        print("  rank   " + " ".join(f"{r:>5}" for r in e["ranks"]))
        print("  unif.  " + " ".join(f"{k:>5.3f}"[-5:] for k in u["retained"]))
        print("  energy " + " ".join(f"{k:>5.3f}"[-5:] for k in e["retained"]))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
