"""One MultiHeadLatentAttention decode step on onnxruntime's CPU provider: op version 1 (the present is a
new [B, 1, P+1, w] tensor, the past copied into it) against version 2 with one bound buffer (op_spec.md:
past and present are the same OrtValue, only the new row is written), at SmolLM2-135M-MLA's attention dims
(9 heads, 3 KV heads, head_dim 64, 4 RoPE pairs, r = 96: d_kv = 32), fp32, our kernel library.

    python bench/shared_cache_cpu.py --contexts 2048,16384 --batches 1,16 --out bench/results/shared_cache_cpu.json

Both forms run in alternating rounds (A B A B) on the same inputs; each row reports the median step, and
the bytes each form moves through the cache (version 1: the past read and written again, version 2: read).

    python bench/shared_cache_cpu.py --model --contexts 2048,8192 --batches 1,8   # the whole model

`--model`: a decode step of all of SmolLM2-135M-MLA (bench/onnx_cpu.py's conversion), exported as version 1
and with `--shared-cache`, both with every input an OrtValue (IOBinding), kernel library registered.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from mla_zoo.export import op
from mla_zoo.export.kernels import build

HEADS, KV_HEADS, HEAD_DIM, PAIRS, RANK = 9, 3, 64, 4, 96
KEY_ROPE = KV_HEADS * 2 * PAIRS


def inputs(batch: int, past: int, capacity: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Version 2's feed (buffers of `capacity` rows); version 1 reads the first `past` rows."""
    f = np.float32
    half = HEAD_DIM // 2
    angles = rng.standard_normal((batch, 1, half)).astype(f)
    return dict(
        query=rng.standard_normal((batch, 1, HEADS * HEAD_DIM)).astype(f),
        latent=rng.standard_normal((batch, 1, RANK)).astype(f),
        key_rope=rng.standard_normal((batch, 1, KEY_ROPE)).astype(f),
        past_latent=rng.standard_normal((batch, 1, capacity, RANK)).astype(f),
        past_key_rope=rng.standard_normal((batch, 1, capacity, KEY_ROPE)).astype(f),
        attention_mask=np.ones((batch, capacity), np.int64),
        cos=np.cos(angles), sin=np.sin(angles),
        w_uk=(rng.standard_normal((KV_HEADS, HEAD_DIM - 2 * PAIRS, RANK)) / RANK**0.5).astype(f),
        w_uv=(rng.standard_normal((KV_HEADS, HEAD_DIM, RANK)) / RANK**0.5).astype(f),
        past_length=np.array([past], np.int64),
    )


def bound(session: ort.InferenceSession, feed: dict[str, np.ndarray], shared: bool) -> ort.IOBinding:
    """Every input as an OrtValue; version 2 binds each present to its past's OrtValue."""
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("output")
    if shared:
        binding.bind_ortvalue_output("present_latent", values["past_latent"])
        binding.bind_ortvalue_output("present_key_rope", values["past_key_rope"])
    else:
        binding.bind_output("present_latent")
        binding.bind_output("present_key_rope")
    return binding


def step_ms(session: ort.InferenceSession, binding: ort.IOBinding, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def model_rows(contexts: list[int], batches: list[int], steps: int, so: ort.SessionOptions, workdir: str) -> list:
    """Whole-model decode steps, version 1 against one shared buffer per cache tensor."""
    from pathlib import Path

    import torch
    from mla_zoo.export.exporter import export_model
    from mla_zoo.export.runner import OnnxDecoder
    from onnx_cpu import prepare

    dirs = prepare(Path(workdir))
    shared_dir = Path(workdir) / "smollm2-mla-shared"
    if not (shared_dir / "model.onnx").exists():
        from mla_zoo.modeling import sources
        from mla_zoo.modeling.convert import convert_model
        from mla_zoo.modeling.convert_schema import ConvertSettings

        model, tokenizer, info = sources.resolve("smollm2-135m", dtype=torch.float32)
        settings = ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="high", svd="joint",
                                   dtype="float32")  # onnx_cpu.prepare's conversion
        mla, _ = convert_model(model, tokenizer, info, settings, progress=False)
        export_model(mla.eval(), shared_dir, shared_cache=True)
    v1, v2 = OnnxDecoder(dirs["mla"], use_kernels=True), OnnxDecoder(shared_dir, use_kernels=True)
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        for batch in batches:
            ids = rng.integers(0, 1000, (batch, 1))
            pos = np.full((batch, 1), context, np.int64)
            b1 = v1.session.io_binding()
            for name, value in (("input_ids", ids), ("attention_mask", np.ones((batch, context + 1), np.int64)),
                                ("position_ids", pos)):
                b1.bind_cpu_input(name, value)
            for i, w in enumerate(v1.cache.widths()):
                kind = "latent" if i % 2 == 0 else "key_rope"
                b1.bind_cpu_input(f"past_key_values.{i // 2}.{kind}",
                                  rng.standard_normal((batch, 1, context, w), dtype=np.float32))
            for o in v1.output_names:
                b1.bind_output(o)
            buffers = v2.cache_buffers(batch, context + 1)
            mask = np.ones((batch, context + 1), np.int64)

            run_v2 = functools.partial(v2.step_in_place, ids, mask, pos, context, buffers)  # as runner.generate steps
            run_v2()
            v1.session.run_with_iobinding(b1)
            t1, t2 = [], []
            for _ in range(4):
                for _ in range(steps):
                    start = time.perf_counter()
                    v1.session.run_with_iobinding(b1)
                    t1.append(1e3 * (time.perf_counter() - start))
                for _ in range(steps):
                    start = time.perf_counter()
                    run_v2()
                    t2.append(1e3 * (time.perf_counter() - start))
            row = dict(context=context, batch=batch, v1_ms=statistics.median(t1), v2_shared_ms=statistics.median(t2))
            row["speedup"] = row["v1_ms"] / row["v2_shared_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048,16384")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=10, help="steps per round (4 rounds of each form)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--out", default=None)
    p.add_argument("--model", action="store_true", help="the whole model's decode step instead of the op alone")
    p.add_argument("--workdir", default="/tmp/mla-zoo-bench-onnx", help="--model: the exports (kept)")
    a = p.parse_args()

    so = ort.SessionOptions()
    so.register_custom_ops_library(build.build_kernels(build.BuildSettings()).library)
    if a.threads:
        so.intra_op_num_threads = a.threads
    attrs = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, rope_pairs=list(range(PAIRS)) * KV_HEADS,
                 scale=HEAD_DIM**-0.5)
    contexts, batches = [int(c) for c in a.contexts.split(",")], [int(b) for b in a.batches.split(",")]
    if a.model:
        rows = model_rows(contexts, batches, a.steps, so, a.workdir)
        report = dict(onnxruntime=ort.__version__, model="SmolLM2-135M-MLA fp32", steps_per_round=a.steps, rows=rows)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)
        return
    v1 = ort.InferenceSession(op.node_model(attrs, with_body=False).SerializeToString(), so)
    v2 = ort.InferenceSession(op.node_model(attrs, with_body=False, shared_cache=True).SerializeToString(), so)
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        for batch in batches:
            feed = inputs(batch, context, context + 1, rng)
            feed_v1 = {k: v for k, v in feed.items() if k != "past_length"}
            feed_v1["past_latent"] = np.ascontiguousarray(feed["past_latent"][:, :, :context])
            feed_v1["past_key_rope"] = np.ascontiguousarray(feed["past_key_rope"][:, :, :context])
            feed_v1["attention_mask"] = feed["attention_mask"]  # [B, P+1]: the whole buffer is the step's mask
            b1, b2 = bound(v1, feed_v1, shared=False), bound(v2, feed, shared=True)
            v2.run_with_iobinding(b2)  # warm-up (writes row P; each step rewrites the same row)
            v1.run_with_iobinding(b1)
            t1, t2 = [], []
            for _ in range(4):
                t1 += step_ms(v1, b1, a.steps)
                t2 += step_ms(v2, b2, a.steps)
            cache_bytes = 4 * batch * context * (RANK + KEY_ROPE)
            row = dict(context=context, batch=batch, v1_ms=statistics.median(t1), v2_shared_ms=statistics.median(t2),
                       v1_cache_bytes=2 * cache_bytes, v2_cache_bytes=cache_bytes)
            row["speedup"] = row["v1_ms"] / row["v2_shared_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = dict(onnxruntime=ort.__version__, threads=a.threads or None, steps_per_round=a.steps, rows=rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
