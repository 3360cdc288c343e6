"""Micro-benchmark of the Triton absorbed-decode kernel (modeling/remote/mla_decode_triton.py) on one GPU.

For SmolLM2-135M (H=9, n_kv=3, head_dim 64, latent 96, 2R=8) and Llama-3-8B (H=32, n_kv=8,
head_dim 128, latent 512 or 256, 2R=16) at T = 2K/8K/16K/32K and B = 1/16/64, bf16, it reports:

* the kernel's time and achieved bandwidth (bytes of c_kv + k_rope read / time), also with a
  kv_mask (all slots valid: the mask gates the scores, every slot is read);
* the device's copy bandwidth: a 2 GiB `Tensor.copy_`, (bytes read + bytes written) / time;
* the plain torch reference (`mla_decode_reference`, fp32 math);
* SDPA over the ORIGINAL GQA cache (K, V [B, n_kv, T, head_dim]): `enable_gqa=True` as transformers
  calls it, and "packed" (the G query heads of a KV head as G query rows of one MHA head, the
  fastest plain-SDPA GQA decode);
* the MQA trick through SDPA (K = [latent | all RoPE keys] as one KV head, V = the latent), the
  faster of two layouts: H query heads with `enable_gqa=True` (as in NOTES.md) and H query rows of one
  head ("packed").

Timing: the kernel and the SDPA variants run K times back to back inside one CUDA graph (K copies of
the inputs, >= 256 MiB in all, so each call reads cold from HBM as in a real decode step, and no
launch overhead); the time is the median replay / K. The reference uses triton's do_bench (median,
L2 flushed between calls). With --sweep, tile sizes, warps, stages and the split plan are tuned first
and the best ones are used in the table (the defaults are reported too).

    python bench/decode_kernel_gpu.py --sweep --out bench/results/decode_kernel_h200.json \
        --md bench/results/decode_kernel_h200.md
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from mla_zoo.modeling.remote import mla_decode_triton as kernel
from mla_zoo.modeling.remote.mla_decode_triton import DecodeConfig, mla_decode_reference
from triton.testing import do_bench


@dataclass(frozen=True)
class Dims:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    latent: int  # r
    rope: int  # 2R per KV head

    @property
    def rope_all(self) -> int:  # P
        return self.kv_heads * self.rope


DIMS = [
    Dims("SmolLM2-135M d_kv=32", 9, 3, 64, 96, 8),
    Dims("Llama-3-8B r=512", 32, 8, 128, 512, 16),
    Dims("Llama-3-8B r=256", 32, 8, 128, 256, 16),
]
CONTEXTS = [2048, 8192, 16384, 32768]
BATCHES = [1, 16, 64]
SWEEP_T = 16384  # the tile sweep runs at B = 16 and 64 at this context
COLD_BYTES = 256 << 20  # the inputs of the K back-to-back calls in one graph span at least this


def mla_inputs(d: Dims, b: int, t: int, seed: int = 0):
    """q_lat, q_rope, and c_kv / k_rope as views [:, 0] of [B, 1, T, .] cache tensors (bf16)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    q_lat = torch.randn(b, d.heads, d.latent, **kw)
    q_rope = torch.randn(b, d.heads, d.rope, **kw)
    c_kv = torch.randn(b, 1, t, d.latent, **kw)[:, 0]
    k_rope = torch.randn(b, 1, t, d.rope_all, **kw)[:, 0]
    return q_lat, q_rope, c_kv, k_rope


def graph_time_us(call, make_args, bytes_per_call: int, replays: int = 15) -> float:
    """Median time of one `call(*args)` over K back-to-back calls on distinct inputs in a CUDA graph."""
    k = max(2, min(256, math.ceil(COLD_BYTES / max(bytes_per_call, 1))))
    args = [make_args(i) for i in range(k)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for a in args[:2]:
            call(*a)  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in args:
            call(*a)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / k)
    del graph, args
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbps() -> float:
    """(bytes read + bytes written) / time of a 2 GiB device-to-device `copy_`."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * 2 * n / (t_ms * 1e-3) / 1e9


def mla_bytes(d: Dims, b: int, t: int) -> int:
    return b * t * (d.latent + d.rope_all) * 2


def gqa_bytes(d: Dims, b: int, t: int) -> int:
    return 2 * b * d.kv_heads * t * d.head_dim * 2


# ----------------------------------------------------------------------------------------------
# Tuning sweep
# ----------------------------------------------------------------------------------------------


def kernel_time_us(d: Dims, b: int, t: int, cfg: DecodeConfig, mask: str | None = None) -> float:
    scale = d.head_dim**-0.5
    kv_mask = None
    if mask == "full":
        kv_mask = torch.ones(b, t, dtype=torch.bool, device="cuda")
    call = lambda *a: kernel._launch(*a, kv_mask, scale, cfg=cfg)
    return graph_time_us(call, lambda i: mla_inputs(d, b, t, seed=i), mla_bytes(d, b, t))


TILE_GRID = {  # (block_n, num_warps, num_stages) tried per latent width; the first is the default
    "narrow": [(128, 8, 3), (64, 4, 3), (128, 4, 3), (128, 4, 2), (64, 8, 3), (256, 8, 2), (64, 4, 4)],
    "wide": [(32, 4, 3), (32, 4, 2), (64, 8, 2), (32, 8, 2), (64, 4, 3), (16, 4, 4)],
}
PLAN_GRID = [(4, 256), (1, 256), (2, 256), (8, 256), (4, 128), (4, 512)]  # (programs_per_sm, min_split_tokens)


def sweep(d: Dims, deadline: float) -> dict:
    """Tile configs at B = 16/64 x T = 16K, then the split plan at B = 1/16/64 x T = 2K/16K."""
    tiles = []
    for block_n, warps, stages in TILE_GRID["narrow" if d.latent <= 128 else "wide"]:
        if time.time() > deadline:
            break
        cfg = DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages)
        row = {"block_n": block_n, "num_warps": warps, "num_stages": stages}
        try:
            for b in (16, 64):
                row[f"us_b{b}"] = round(kernel_time_us(d, b, SWEEP_T, cfg), 2)
                row[f"gbps_b{b}"] = round(mla_bytes(d, b, SWEEP_T) / row[f"us_b{b}"] / 1e3)
        except Exception as e:  # out of shared memory, registers, ...
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print("sweep", d.name, json.dumps(row), flush=True)
        tiles.append(row)
    ok = [r for r in tiles if "error" not in r and "us_b64" in r]
    if not ok:
        return {"tiles": tiles}
    best = min(ok, key=lambda r: r["us_b16"] + r["us_b64"])
    base = DecodeConfig(**{k: best[k] for k in ("block_n", "num_warps", "num_stages")})
    plans = []
    for pps, min_tok in PLAN_GRID:
        if time.time() > deadline:
            break
        cfg = dataclasses.replace(base, programs_per_sm=pps, min_split_tokens=min_tok)
        row = {"programs_per_sm": pps, "min_split_tokens": min_tok}
        for b, t in itertools.product([1, 16, 64], [SWEEP_T // 8, SWEEP_T]):
            row[f"us_b{b}_t{t}"] = round(kernel_time_us(d, b, t, cfg), 2)
        print("plan", d.name, json.dumps(row), flush=True)
        plans.append(row)
    tuned = base
    if plans:  # the smallest sum of times, each relative to the best time of its setting
        keys = [k for k in plans[0] if k.startswith("us_")]
        best_plan = min(plans, key=lambda r: sum(r[k] / min(p[k] for p in plans) for k in keys))
        tuned = dataclasses.replace(
            base, programs_per_sm=best_plan["programs_per_sm"], min_split_tokens=best_plan["min_split_tokens"]
        )
    return {"tiles": tiles, "plans": plans, "tuned": dataclasses.asdict(tuned)}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sdpa_gqa_packed(q, k, v):
    b, h, _, hd = q.shape
    n_kv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(b, n_kv, h // n_kv, hd), k, v)  # G queries per KV head


def measure(d: Dims, b: int, t: int, cfg: DecodeConfig | None, copy_gbps: float) -> dict:
    scale = d.head_dim**-0.5
    nbytes = mla_bytes(d, b, t)
    row = {"model": d.name, "B": b, "T": t, "mla_bytes": nbytes, "gqa_bytes": gqa_bytes(d, b, t)}
    args = mla_inputs(d, b, t)
    ref = mla_decode_reference(*args, None, scale)
    out = kernel._launch(*args, None, scale, cfg=cfg)
    row["rel_err_vs_reference"] = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    default = kernel.default_config(d.latent, torch.bfloat16)
    row["config"] = dataclasses.asdict(cfg or default)
    row["splits"] = kernel.plan_splits(b, 1, t, kernel._num_sms(args[0].device), cfg or default)[0]
    del ref, out
    row["kernel_us"] = kernel_time_us(d, b, t, cfg or default)
    row["kernel_default_cfg_us"] = graph_time_us(  # through the registered op, default config
        lambda *a: kernel.mla_decode(*a, None, scale), lambda i: mla_inputs(d, b, t, seed=i), nbytes
    ) if cfg not in (None, default) else row["kernel_us"]
    row["kernel_masked_us"] = kernel_time_us(d, b, t, cfg or default, mask="full")
    row["kernel_gbps"] = nbytes / row["kernel_us"] / 1e3
    row["kernel_pct_of_copy"] = 100 * row["kernel_gbps"] / copy_gbps

    if nbytes * 4 < 40e9:  # the fp32 reference holds an fp32 copy of the latent and the scores
        reference = lambda: mla_decode_reference(*args, None, scale)
        row["reference_us"] = 1e3 * do_bench(reference, warmup=5, rep=50, return_mode="median")

    def mqa_args(i, packed):  # K = [latent | all RoPE keys] as ONE KV head, V = the latent (a view)
        g = torch.Generator(device="cuda").manual_seed(i)
        shape = (b, 1, d.heads, d.latent + d.rope_all) if packed else (b, d.heads, 1, d.latent + d.rope_all)
        q = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # H query rows or H heads
        kk = torch.randn(b, 1, t, d.latent + d.rope_all, device="cuda", dtype=torch.bfloat16, generator=g)
        return q, kk, kk[..., : d.latent]

    for name, packed in (("mqa_sdpa_gqa_us", False), ("mqa_sdpa_packed_us", True)):
        if not packed and nbytes * d.heads > 20e9:  # enable_gqa may fall back to repeating K and V per head
            continue
        try:
            row[name] = graph_time_us(sdpa_gqa, lambda i, packed=packed: mqa_args(i, packed), nbytes)
        except Exception as e:
            row[name.replace("_us", "_error")] = f"{type(e).__name__}: {str(e)[:160]}"
            torch.cuda.empty_cache()
    mqa = [row[k] for k in ("mqa_sdpa_gqa_us", "mqa_sdpa_packed_us") if k in row]
    if mqa:
        row["mqa_sdpa_us"] = min(mqa)

    def gqa_args(i):
        g = torch.Generator(device="cuda").manual_seed(i)
        kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
        q = torch.randn(b, d.heads, 1, d.head_dim, **kw)
        return q, torch.randn(b, d.kv_heads, t, d.head_dim, **kw), torch.randn(b, d.kv_heads, t, d.head_dim, **kw)

    row["gqa_sdpa_us"] = graph_time_us(sdpa_gqa, gqa_args, row["gqa_bytes"])
    row["gqa_sdpa_packed_us"] = graph_time_us(sdpa_gqa_packed, gqa_args, row["gqa_bytes"])
    best_gqa = min(row["gqa_sdpa_us"], row["gqa_sdpa_packed_us"])
    row["gqa_gbps"] = row["gqa_bytes"] / best_gqa / 1e3
    row["speedup_vs_gqa_best"] = best_gqa / row["kernel_us"]
    row["bytes_ratio"] = row["gqa_bytes"] / nbytes
    torch.cuda.empty_cache()
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device']}, torch {result['torch']}, triton {result['triton']}; copy bandwidth "
        f"{result['copy_gbps']:.0f} GB/s ((read + write) / time of a 2 GiB copy_). Times in µs per call "
        "(median, CUDA graph of back-to-back calls on cold inputs).",
        "",
        "| model | B | T | MLA MB | kernel µs | GB/s | % copy | + mask µs | ref µs "
        "| MQA-SDPA µs | GQA SDPA µs (gqa / packed) | GQA GB/s | vs GQA | bytes ratio | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['B']} | {r['T']} | error: {r['error'][:80]} |")
            continue
        mqa = f"{r['mqa_sdpa_us']:.1f}" if "mqa_sdpa_us" in r else "error"
        ref = f"{r['reference_us']:.0f}" if "reference_us" in r else "-"
        lines.append(
            f"| {r['model']} | {r['B']} | {r['T']} | {r['mla_bytes'] / 1e6:.1f} | {r['kernel_us']:.1f} "
            f"| {r['kernel_gbps']:.0f} | {r['kernel_pct_of_copy']:.0f}% | {r['kernel_masked_us']:.1f} "
            f"| {ref} | {mqa} "
            f"| {r['gqa_sdpa_us']:.1f} / {r['gqa_sdpa_packed_us']:.1f} "
            f"| {r['gqa_gbps']:.0f} | {r['speedup_vs_gqa_best']:.2f}x | {r['bytes_ratio']:.2f} "
            f"| {r['rel_err_vs_reference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/decode_kernel_h200.json")
    p.add_argument("--md", default="bench/results/decode_kernel_h200.md")
    p.add_argument("--sweep", action="store_true", help="tune tiles and the split plan first, use the best")
    p.add_argument("--budget-s", type=float, default=420, help="stop sweeping / measuring after this long")
    args = p.parse_args()
    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python bench/decode_kernel_gpu.py" + (" --sweep" if args.sweep else ""),
    }
    print(json.dumps(result), flush=True)
    result["copy_gbps"] = round(copy_bandwidth_gbps(), 1)
    print("copy bandwidth GB/s (read + write)", result["copy_gbps"], flush=True)
    tuned = {}
    if args.sweep:
        result["sweep"] = {}
        for i, d in enumerate(DIMS):  # an equal share of half the budget each
            result["sweep"][d.name] = sweep(d, deadline=t0 + args.budget_s * 0.5 * (i + 1) / len(DIMS))
            if "tuned" in result["sweep"][d.name]:
                tuned[d.name] = DecodeConfig(**result["sweep"][d.name]["tuned"])
                print("tuned", d.name, json.dumps(result["sweep"][d.name]["tuned"]), flush=True)
    result["rows"] = []
    goal_first = lambda x: (x[1] != 16384 or x[2] != 16, x[1] < 16384 or x[2] < 16)  # 16K x 16, then >= 16K x >= 16
    order = sorted(itertools.product(DIMS, CONTEXTS, BATCHES), key=goal_first)
    for d, t, b in order:
        if time.time() - t0 > args.budget_s:
            result["stopped_early"] = True
            break
        try:
            row = measure(d, b, t, tuned.get(d.name), result["copy_gbps"])
        except Exception as e:  # keep the rows measured so far
            row = {"model": d.name, "B": b, "T": t, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        write_atomic(Path(args.out), json.dumps(result, indent=1))
    result["rows"].sort(key=lambda r: ([x.name for x in DIMS].index(r["model"]), r["T"], r["B"]))
    write_atomic(Path(args.out), json.dumps(result, indent=1))
    write_atomic(Path(args.md), markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
