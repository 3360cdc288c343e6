"""Decode latency in onnxruntime-gpu (CUDA execution provider), fp16: SmolLM2-135M-MLA (d_kv=32, r=4:
-68.75% cache) exported with `mla_zoo.export` and run with our CUDA kernel, against the ORIGINAL
SmolLM2-135M exported with `torch.onnx` (dynamo, opset 18, flat past K/V, its attention as
onnxruntime's graph optimizer leaves it) on the same provider; plus the kernel alone (one node at
SmolLM2-MLA's dims) and its achieved bandwidth against the device's copy bandwidth.

    python bench/onnx_cuda.py --out $OUT/onnx_cuda.json          # on the GPU machine (bench/ort_cuda_gpu.sh)
    python bench/onnx_cuda.py --contexts 16384 --batches 16      # the goal's point only

A step feeds one token per row over a random past of the given length, with every tensor bound to
the GPU (IOBinding: past in, present out; no host copies of the cache), so the figure is the
per-token decode latency at that context. tokens/s = batch / latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch  # before onnxruntime (imported where used): torch loads the CUDA libraries its CUDA provider needs

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
DEVICE = "cuda"  # where the bound tensors live (tests of this script's bindings set "cpu")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def export_original_fp16(model, path: Path) -> None:
    """The original GQA model, fp16, flat past K/V [B, n_kv, P, hd] (bench/onnx_cpu.py's decoder)."""
    from onnx_cpu import export_gqa

    export_gqa(model, path, torch.float16)


def prepare(workdir: Path, fp16_residual: bool = False, shared_cache: bool = False) -> dict[str, Path]:
    """Exports (once) SmolLM2-135M-MLA and the original, both fp16 (and, with `fp16_residual`, the MLA export
    all-fp16: `--no-fp32-residual`; with `shared_cache`, the MLA export with one buffer per cache tensor:
    `--shared-cache`)."""
    from mla_zoo.export.exporter import export_model
    from mla_zoo.modeling import sources
    from mla_zoo.modeling.convert import convert_model
    from mla_zoo.modeling.convert_schema import ConvertSettings

    mla_dir, gqa_dir = workdir / "smollm2-mla-fp16", workdir / "smollm2-gqa-fp16"
    narrow_dir = workdir / "smollm2-mla-fp16-fp16-residual"
    dirs = {"mla": mla_dir, "gqa": gqa_dir} | ({"mla-fp16-residual": narrow_dir} if fp16_residual else {})
    dirs |= {"mla-shared": workdir / "smollm2-mla-fp16-shared"} if shared_cache else {}
    if not all((d / "model.onnx").exists() for d in dirs.values()):
        model, tokenizer, info = sources.resolve("smollm2-135m", dtype=torch.float32)
        if not (gqa_dir / "model.onnx").exists():
            export_original_fp16(model.eval(), gqa_dir)
        # speed does not depend on the SVD: the fast one
        settings = ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="high", svd="joint",
                                   dtype="float32")
        mla, _ = convert_model(model, tokenizer, info, settings, progress=False)
        for name, wide, shared in (("mla", True, False), ("mla-fp16-residual", False, False),
                                   ("mla-shared", True, True)):
            if name in dirs and not (dirs[name] / "model.onnx").exists():
                export_model(mla.eval().half(), dirs[name], dtype="fp16", fp32_residual=wide, shared_cache=shared)
    return dirs


# ----------------------------------------------------------------------------------------------
# Timing with every tensor on the GPU
# ----------------------------------------------------------------------------------------------


def bound_step(session, feed_shapes: dict, int_feeds: dict[str, np.ndarray], seed: int = 0):
    """An IOBinding with the int inputs and random fp16 past tensors on the GPU, outputs on the GPU. A shared-cache
    export (input past_length, kept in host memory as its CUDA kernel reads it) gets each present bound to its
    past's buffer, as runner.OnnxDecoder.step_in_place binds them."""
    import onnxruntime as ort

    binding = session.io_binding()
    rng = np.random.default_rng(seed)
    keep, pasts = [], {}
    for name, value in int_feeds.items():
        v = ort.OrtValue.ortvalue_from_numpy(value) if name == "past_length" else \
            ort.OrtValue.ortvalue_from_numpy(value, DEVICE, 0)
        keep.append(v)
        binding.bind_ortvalue_input(name, v)
    for name, shape in feed_shapes.items():
        v = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape, dtype=np.float32).astype(np.float16), DEVICE, 0)
        keep.append(v)
        pasts[name] = v
        binding.bind_ortvalue_input(name, v)
    shared = "past_length" in int_feeds
    for out in session.get_outputs():
        past = ("past_key_values." + out.name.removeprefix("present.") if out.name.startswith("present.")
                else out.name.replace("present_", "past_"))  # the model's names; the node's
        if shared and past in pasts:
            binding.bind_ortvalue_output(out.name, pasts[past])
        else:
            binding.bind_output(out.name, DEVICE, 0)
    return binding, keep


def time_binding(session, binding, steps: int, warmup: int = 3) -> list[float]:
    """Seconds of each of `steps` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        session.run_with_iobinding(binding)  # returns when the outputs are ready
        times.append(time.perf_counter() - t)
    return times


def stats(times: list[float]) -> dict:
    return {"ms_median": 1e3 * float(np.median(times)), "ms_min": 1e3 * float(np.min(times))}


def model_session(path: Path, fused: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if fused:
        from mla_zoo.export.kernels.build import get_library_path

        so.register_custom_ops_library(get_library_path(cuda=True))
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=PROVIDERS)


def decode_points(sessions: dict, past: int, batch: int, steps: int, rounds: int = 4) -> dict[str, dict]:
    """Each session's decode step at (past, batch): `steps` timed runs in `rounds` alternating rounds (A B A B ...,
    so a slow phase of the GPU falls on every session alike); a session that fails (e.g. out of memory) gets an
    "error" instead."""
    ints = {"input_ids": np.random.default_rng(0).integers(0, 100, (batch, 1)).astype(np.int64),  # in any vocabulary
            "attention_mask": np.ones((batch, past + 1), np.int64),
            "position_ids": np.full((batch, 1), past, np.int64)}
    bound, times, results = {}, {}, {}
    for name, session in sessions.items():
        shared = any(i.name == "past_length" for i in session.get_inputs())  # buffers of past + 1 rows
        rows = past + 1 if shared else past
        shapes = {i.name: [batch, i.shape[1], rows, i.shape[3]] for i in session.get_inputs()
                  if i.name.startswith("past_key_values.")}
        feeds = ints | ({"past_length": np.array([past], np.int64)} if shared else {})
        try:
            bound[name] = (session, *bound_step(session, shapes, feeds))
        except Exception as e:  # e.g. out of memory: the row says so, the others still run
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        results[name] = {"past_cache_mb": sum(2 * int(np.prod(s)) for s in shapes.values()) / 2**20}
    for _ in range(rounds):
        for name, (session, binding, _keep) in list(bound.items()):
            try:
                times.setdefault(name, []).extend(time_binding(session, binding, max(1, steps // rounds)))
            except Exception as e:
                results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                del bound[name]
    for name in bound:
        results[name] |= stats(times[name])
        results[name]["tokens_per_s"] = batch / (results[name]["ms_median"] / 1e3)
    del bound
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return results


def placement(path: Path, fused: bool, past: int = 64, batch: int = 2) -> dict[str, list[str]]:
    """op type -> the providers its nodes ran on in one decode step, from onnxruntime's profiling output: what
    a CUDA graph of the whole step (`enable_cuda_graph`: every node on the CUDA provider) would have to change."""
    import onnxruntime as ort
    from mla_zoo.export.runner import providers_by_op

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(path / "placement")
    if fused:
        from mla_zoo.export.kernels.build import get_library_path

        so.register_custom_ops_library(get_library_path(cuda=True))
    session = ort.InferenceSession(str(path / "model.onnx"), so, providers=PROVIDERS)
    shared = any(i.name == "past_length" for i in session.get_inputs())
    rows = past + 1 if shared else past
    shapes = {i.name: [batch, i.shape[1], rows, i.shape[3]] for i in session.get_inputs()
              if i.name.startswith("past_key_values.")}
    ints = {"input_ids": np.zeros((batch, 1), np.int64), "attention_mask": np.ones((batch, past + 1), np.int64),
            "position_ids": np.full((batch, 1), past, np.int64)}
    ints |= {"past_length": np.array([past], np.int64)} if shared else {}
    binding, keep = bound_step(session, shapes, ints)
    session.run_with_iobinding(binding)
    del keep
    return providers_by_op(session)


# ----------------------------------------------------------------------------------------------
# The kernel alone: one node at SmolLM2-MLA's dims, fp16
# ----------------------------------------------------------------------------------------------


def node_model(h=9, kv=3, hd=64, pairs=4, shared_cache: bool = False) -> bytes:
    from mla_zoo.export import op
    from onnx import TensorProto

    attrs = dict(num_heads=h, num_kv_heads=kv, rope_pairs=[28, 29, 30, 31] * kv, scale=hd**-0.5)
    return op.node_model(attrs, TensorProto.FLOAT16, with_body=False, shared_cache=shared_cache).SerializeToString()


def node_shapes(batch: int, rows: int, h=9, kv=3, hd=64, pairs=4, r=96) -> dict[str, list[int]]:
    """The node's float inputs at SmolLM2-MLA's dims, one new token per row over `rows` cached ones."""
    return {"query": [batch, 1, h * hd], "latent": [batch, 1, r], "key_rope": [batch, 1, kv * 2 * pairs],
            "past_latent": [batch, 1, rows, r], "past_key_rope": [batch, 1, rows, kv * 2 * pairs],
            "cos": [batch, 1, hd // 2], "sin": [batch, 1, hd // 2], "w_uk": [kv, hd - 2 * pairs, r],
            "w_uv": [kv, hd, r]}


def kernel_point(past: int, batch: int, steps: int, shared_cache: bool = False) -> dict:
    """One node at SmolLM2-MLA's dims, fp16. Version 1 reads the past and writes it into the present (bytes =
    2 x past); version 2 (`shared_cache`: one buffer of past + 1 rows bound as past and present) reads the past
    and writes the new row alone (bytes = past + 1 row)."""
    import onnxruntime as ort
    from mla_zoo.export.kernels.build import get_library_path

    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path(cuda=True))
    session = ort.InferenceSession(node_model(shared_cache=shared_cache), so, providers=PROVIDERS)
    shapes = node_shapes(batch, past + 1 if shared_cache else past)
    r, kr = shapes["latent"][2], shapes["key_rope"][2]
    ints = {"attention_mask": np.ones((batch, past + 1), np.int64)}
    ints |= {"past_length": np.array([past], np.int64)} if shared_cache else {}
    binding, keep = bound_step(session, shapes, ints, seed=1)
    result = stats(time_binding(session, binding, steps))
    row = 2 * batch * (r + kr)  # bytes of one cached token over the batch (fp16)
    result["bytes"] = past * row + (row if shared_cache else past * row)  # the past read + what is written
    result["gb_per_s"] = result["bytes"] / (result["ms_min"] / 1e3) / 1e9
    del keep
    return result


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device copy, read + write counted (as the kernel's figure)."""
    a = torch.empty(2**30, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return 2 * a.numel() * 2 / best / 1e9


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048,8192,16384,32768")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/mla-zoo-bench-onnx-cuda")
    p.add_argument("--out", default=str(ROOT / "results" / "onnx_cuda.json"))
    p.add_argument("--fp16-residual", action="store_true",
                   help="also the all-fp16 MLA export (`export --no-fp32-residual`), timed in rounds alternating "
                        "with the default's")
    p.add_argument("--shared-cache", action="store_true",
                   help="also the MLA export with one buffer per cache tensor (`export --shared-cache`, op version "
                        "2), timed in rounds alternating with the default's")
    args = p.parse_args()

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"needs onnxruntime-gpu: this onnxruntime ({ort.__version__}) has {ort.get_available_providers()}")
    dirs = prepare(Path(args.workdir), args.fp16_residual, args.shared_cache)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    sessions = {"mla-fused": model_session(dirs["mla"], True)}
    if args.fp16_residual:
        sessions["mla-fused-fp16-residual"] = model_session(dirs["mla-fp16-residual"], True)
    if args.shared_cache:
        sessions["mla-fused-shared"] = model_session(dirs["mla-shared"], True)
    sessions["original"] = model_session(dirs["gqa"], False)
    placed = {name: placement(dirs[key], name != "original") for name, key in
              (("mla-fused", "mla"), ("mla-fused-shared", "mla-shared"), ("original", "gqa")) if key in dirs}
    print(json.dumps({"placement": placed}), flush=True)
    rows = []
    for context in contexts:
        for batch in batches:
            row = {"context": context, "batch": batch}
            mla = {name: session for name, session in sessions.items() if name != "original"}
            row |= decode_points(mla, context, batch, args.steps)  # the MLA graphs in alternating rounds
            row |= decode_points({"original": sessions["original"]}, context, batch, args.steps)
            if "ms_median" in row["mla-fused"] and "ms_median" in row["original"]:
                row["speedup"] = row["original"]["ms_median"] / row["mla-fused"]["ms_median"]
            if "ms_median" in row.get("mla-fused-fp16-residual", {}) and "ms_median" in row["mla-fused"]:
                # the default's step over the all-fp16 graph's
                row["fp32_residual_cost"] = row["mla-fused"]["ms_median"] / row["mla-fused-fp16-residual"]["ms_median"]
            if "ms_median" in row.get("mla-fused-shared", {}) and "ms_median" in row["mla-fused"]:
                # the default's step over the shared-cache graph's (> 1: one buffer is faster)
                row["shared_cache_speedup"] = row["mla-fused"]["ms_median"] / row["mla-fused-shared"]["ms_median"]
            row["kernel"] = kernel_point(context, batch, args.steps)
            if args.shared_cache:
                row["kernel-shared"] = kernel_point(context, batch, args.steps, shared_cache=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    bandwidth = copy_bandwidth()
    for row in rows:
        for k in ("kernel", "kernel-shared"):
            if k in row:
                row[k]["fraction_of_copy"] = row[k]["gb_per_s"] / bandwidth
    result = {"device": torch.cuda.get_device_name(), "onnxruntime": ort.__version__, "torch": torch.__version__,
              "copy_gb_per_s": bandwidth, "steps": args.steps, "placement": placed, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    lines = [f"{result['device']}, onnxruntime {result['onnxruntime']}, copy {result['copy_gb_per_s']:.0f} GB/s",
             "| context | batch | MLA fused ms | original ms | speed-up | MLA tokens/s | original tokens/s | "
             "kernel alone µs | kernel GB/s | of copy |", "|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in result["rows"]:
        m, o, k = r["mla-fused"], r["original"], r["kernel"]
        lines.append(f"| {r['context']} | {r['batch']} | {m.get('ms_median', nan):.2f} | "
                     f"{o.get('ms_median', nan):.2f} | {r.get('speedup', nan):.2f}x | "
                     f"{m.get('tokens_per_s', nan):,.0f} | {o.get('tokens_per_s', nan):,.0f} | "
                     f"{1e3 * k['ms_min']:.1f} | {k['gb_per_s']:.0f} | {k['fraction_of_copy']:.0%} |")
    if any("kernel-shared" in r for r in result["rows"]):  # op version 2 (export --shared-cache) beside version 1
        lines += ["", "| context | batch | version 1 ms | shared-cache ms | shared-cache speed-up | kernel v1 µs | "
                  "kernel v2 µs | v2 GB/s | v2 of copy |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            m, v2, k, k2 = r["mla-fused"], r.get("mla-fused-shared", {}), r["kernel"], r["kernel-shared"]
            lines.append(f"| {r['context']} | {r['batch']} | {m.get('ms_median', nan):.2f} | "
                         f"{v2.get('ms_median', nan):.2f} | {r.get('shared_cache_speedup', nan):.2f}x | "
                         f"{1e3 * k['ms_min']:.1f} | {1e3 * k2['ms_min']:.1f} | {k2['gb_per_s']:.0f} | "
                         f"{k2['fraction_of_copy']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
