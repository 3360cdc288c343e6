"""CPU decode latency in onnxruntime: SmolLM2-135M-MLA with our fused kernel, the same graph through
the op's function body, and the ORIGINAL GQA SmolLM2-135M exported with torch.onnx, at past length
512 / 2K / 8K and batch 1 / 8; peak RSS of each run; the kernel's achieved bytes/s against this
machine's memcpy bandwidth at 8K.

    python bench/onnx_cpu.py                      # everything (exports once into --workdir)
    python bench/onnx_cpu.py --past 512 --batch 1 # a quick look

Each (model, past, batch) point runs in its own process (a fresh session; its peak RSS is that
point's). A step feeds one token per row over a random past of the given length: the per-token
latency of decoding at that context. Writes bench/results/onnx_cpu.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("mla-fused", "mla-body", "gqa-original")


# ----------------------------------------------------------------------------------------------
# The original GQA model as a flat-cache decoder (its own weights and computation, torch.onnx)
# ----------------------------------------------------------------------------------------------


def gqa_decoder(model):
    import torch
    import torch.nn.functional as F
    from torch import nn

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    class GQADecoder(nn.Module):
        """LlamaForCausalLM with past K/V as flat tensors [B, n_kv, P, hd] (as optimum-onnx lays them out)."""

        def __init__(self, m):
            super().__init__()
            self.m, self.lm_head, c = m.model, m.lm_head, m.config
            self.h, self.kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
            b, s = input_ids.shape
            hidden = self.m.embed_tokens(input_ids)
            cos, sin = self.m.rotary_emb(hidden, position_ids)  # [B, S, hd]
            cos, sin = cos[:, None], sin[:, None]
            t = attention_mask.shape[1]
            q_pos = torch.arange(s, device=input_ids.device)[:, None] + (t - s)
            k_pos = torch.arange(t, device=input_ids.device)[None]
            mask = (k_pos <= q_pos)[None, None] & attention_mask.bool()[:, None, None]  # [B, 1, S, T]
            presents = []
            for i, layer in enumerate(self.m.layers):
                a, x = layer.self_attn, layer.input_layernorm(hidden)
                q = a.q_proj(x).view(b, s, self.h, self.hd).transpose(1, 2)
                k = a.k_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
                v = a.v_proj(x).view(b, s, self.kv, self.hd).transpose(1, 2)
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
                k, v = torch.cat([past[2 * i], k], 2), torch.cat([past[2 * i + 1], v], 2)  # [B, n_kv, T, hd]
                presents += [k, v]
                g = self.h // self.kv
                o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                   attn_mask=mask)  # [B, H, S, hd]
                hidden = hidden + a.o_proj(o.transpose(1, 2).reshape(b, s, -1))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            return self.lm_head(self.m.norm(hidden)), presents

    return GQADecoder(model).eval()


def export_gqa(model, path: Path, dtype=None) -> None:
    """The original GQA model with flat past K/V [B, n_kv, P, hd], in `dtype` (float32 by default,
    checked against the HF model's logits; bench/onnx_cuda.py exports it in float16)."""
    import torch

    dtype = dtype or torch.float32
    dec = gqa_decoder(model).to(dtype).eval()
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 3))
    mask = torch.ones(2, 7, dtype=torch.long)
    pos = torch.arange(4, 7)[None].expand(2, -1).contiguous()
    past = [torch.zeros(2, c.num_key_value_heads, 4, c.head_dim, dtype=dtype) for _ in range(2 * c.num_hidden_layers)]
    if dtype == torch.float32:
        with torch.no_grad():  # it is the original model: its logits equal the HF model's
            ref = model(ids, attention_mask=mask[:, 4:], position_ids=torch.arange(3)[None].expand(2, -1)).logits
            got, _ = dec(ids, mask[:, 4:], torch.arange(3)[None].expand(2, -1), [p[:, :, :0] for p in past])
            assert (ref - got).abs().max() < 1e-3
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past", "total"))
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
              "past": [{0: b, 2: p} for _ in past]}
    program = torch.onnx.export(dec, (ids, mask, pos, past), dynamo=True, dynamic_shapes=shapes, opset_version=18,
                                verbose=False)
    names = ["input_ids", "attention_mask", "position_ids"]
    names += [f"past_key_values.{i}.{kv}" for i in range(c.num_hidden_layers) for kv in ("key", "value")]
    for value, name in zip(program.model.graph.inputs, names, strict=True):
        value.name = name
    path.mkdir(parents=True, exist_ok=True)
    program.save(str(path / "model.onnx"))


def prepare(workdir: Path) -> dict[str, Path]:
    """Exports (once) SmolLM2-135M-MLA (d_kv=32, r=4: -68.75% cache) and the original."""
    import torch
    from mla_zoo.export.exporter import export_model
    from mla_zoo.export.kernels.build import build_kernels
    from mla_zoo.modeling import sources
    from mla_zoo.modeling.convert import convert_model
    from mla_zoo.modeling.convert_schema import ConvertSettings

    build_kernels()
    mla_dir, gqa_dir = workdir / "smollm2-mla", workdir / "smollm2-gqa"
    if not (mla_dir / "model.onnx").exists() or not (gqa_dir / "model.onnx").exists():
        model, tokenizer, info = sources.resolve("smollm2-135m", dtype=torch.float32)
        if not (gqa_dir / "model.onnx").exists():
            export_gqa(model.eval(), gqa_dir)
        if not (mla_dir / "model.onnx").exists():  # speed does not depend on the SVD: the fast one
            settings = ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="high", svd="joint",
                                       dtype="float32")
            mla, _ = convert_model(model, tokenizer, info, settings, progress=False)
            export_model(mla.eval(), mla_dir)
    return {"mla": mla_dir, "gqa": gqa_dir}


# ----------------------------------------------------------------------------------------------
# Workers (one process per point)
# ----------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(run, steps: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"ms_median": 1e3 * float(np.median(times)), "ms_min": 1e3 * float(np.min(times))}


def cpu_time_steps(make_session, feed: dict, steps: int) -> float:
    """Milliseconds of CPU time per run of a ONE-thread session: robust to other processes taking
    the cores (wall time on a shared machine is not)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = make_session(so)
    session.run(None, feed)
    start = time.process_time()
    for _ in range(steps):
        session.run(None, feed)
    return 1e3 * (time.process_time() - start) / steps


def worker_model(variant: str, path: Path, past: int, batch: int, steps: int) -> dict:
    import onnxruntime as ort

    def make_session(so=None):
        so = so or ort.SessionOptions()
        if variant == "mla-fused":
            from mla_zoo.export import get_library_path

            so.register_custom_ops_library(get_library_path())
        return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])

    session = make_session()
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 1000, (batch, 1)), "attention_mask": np.ones((batch, past + 1), np.int64),
            "position_ids": np.full((batch, 1), past, np.int64)}
    for i in session.get_inputs()[3:]:
        shape = [batch, i.shape[1], past, i.shape[3]]
        feed[i.name] = rng.standard_normal(shape, dtype=np.float32)
    cache_mb = sum(v.nbytes for k, v in feed.items() if k.startswith("past")) / 2**20
    result = time_steps(functools.partial(session.run, None, feed), steps)
    result.update(peak_rss_mb=peak_rss_mb(), past_cache_mb=cache_mb)
    session = None  # free it before the one-thread session (peak RSS is taken above)
    result["cpu1_ms"] = cpu_time_steps(make_session, feed, max(3, steps // 2))
    return result


def node_model_bytes(batch: int, past: int) -> tuple[bytes, dict, int]:
    """One MultiHeadLatentAttention node at SmolLM2-MLA's dims; the bytes its contract moves."""
    from mla_zoo.export import op

    h, kv, hd, pairs, r = 9, 3, 64, 4, 96
    rng = np.random.default_rng(0)
    f = np.float32
    feed = {
        "query": rng.standard_normal((batch, 1, h * hd), f), "latent": rng.standard_normal((batch, 1, r), f),
        "key_rope": rng.standard_normal((batch, 1, kv * 2 * pairs), f),
        "past_latent": rng.standard_normal((batch, 1, past, r), f),
        "past_key_rope": rng.standard_normal((batch, 1, past, kv * 2 * pairs), f),
        "attention_mask": np.ones((batch, past + 1), np.int64),
        "cos": rng.standard_normal((batch, 1, hd // 2), f), "sin": rng.standard_normal((batch, 1, hd // 2), f),
        "w_uk": rng.standard_normal((kv, hd - 2 * pairs, r), f), "w_uv": rng.standard_normal((kv, hd, r), f),
    }
    attrs = dict(num_heads=h, num_kv_heads=kv, rope_pairs=[28, 29, 30, 31] * kv, scale=hd**-0.5)

    model = op.node_model(attrs)
    cache = feed["past_latent"].nbytes + feed["past_key_rope"].nbytes
    # the traffic the op's contract needs: read the past once, write the present once (the kernel
    # attends to each chunk right after copying it, while it is in cache) - as memcpy's read + write
    return model.SerializeToString(), feed, 2 * cache


def worker_node(past: int, batch: int, steps: int, kernel: bool = True) -> dict:
    import onnxruntime as ort
    from mla_zoo.export import get_library_path

    model, feed, nbytes = node_model_bytes(batch, past)

    def make_session(so=None):
        so = so or ort.SessionOptions()
        if kernel:
            so.register_custom_ops_library(get_library_path())
        return ort.InferenceSession(model, so)

    session = make_session()
    result = time_steps(functools.partial(session.run, None, feed), steps)
    result["bytes"] = nbytes
    result["gb_per_s"] = nbytes / (result["ms_min"] / 1e3) / 1e9
    session = None  # its thread pool must not spin into the CPU-time measurement
    result["cpu1_ms"] = cpu_time_steps(make_session, feed, steps)
    return result


def memcpy_bandwidth(mb: int = 512, repeats: int = 10) -> float:
    """GB/s of a large copy, counting bytes read + bytes written (as the kernel's figure does)."""
    src = np.ones(mb * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--past", default="512,2048,8192")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/mla-zoo-bench-onnx")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx_cpu.json"))
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind in ("node", "node-body"):
            print(json.dumps(worker_node(int(rest[0]), int(rest[1]), int(rest[2]), kind == "node")))
        else:
            print(json.dumps(worker_model(kind, Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))))
        return

    import onnxruntime as ort

    dirs = prepare(Path(args.workdir))
    pasts = [int(x) for x in args.past.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    rows = []
    for past in pasts:
        for batch in batches:
            row = {"past": past, "batch": batch}
            for variant in VARIANTS:
                path = dirs["gqa" if variant == "gqa-original" else "mla"]
                row[variant] = run_worker([variant, str(path), str(past), str(batch), str(args.steps)])
            fused, body, gqa = (row[v].get("ms_median") for v in VARIANTS)
            if fused and body and gqa:
                row["fused_vs_body"] = body / fused
                row["fused_vs_gqa"] = gqa / fused
            # the attention op alone (one node, SmolLM2-MLA dims): kernel vs its function body
            row["op_kernel"] = run_worker(["node", str(past), str(batch), str(args.steps)])
            row["op_body"] = run_worker(["node-body", str(past), str(batch), str(args.steps)])
            if row["op_kernel"].get("cpu1_ms") and row["op_body"].get("cpu1_ms"):
                row["op_kernel_vs_body"] = row["op_body"]["cpu1_ms"] / row["op_kernel"]["cpu1_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    kernel = {}
    for batch in batches:
        kernel[str(batch)] = run_worker(["node", str(max(pasts)), str(batch), str(args.steps)])
    bandwidth = memcpy_bandwidth()
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1m_at_end": os.getloadavg()[0], "onnxruntime": ort.__version__},
        "steps": args.steps, "rows": rows,
        "kernel_at_max_past": {"past": max(pasts), "per_batch": kernel, "memcpy_gb_per_s": bandwidth,
                               "fraction_of_memcpy": {b: k.get("gb_per_s", 0) / bandwidth for b, k in kernel.items()}},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    lines = ["| past | batch | MLA fused ms | MLA body ms | GQA original ms | fused vs body | fused vs GQA | "
             "1-thread CPU ms (fused / body / GQA) | peak RSS MB (fused / body / GQA) | "
             "op alone, 1-thread CPU ms: kernel / body |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ms = [row[v].get("ms_median", float("nan")) for v in VARIANTS]
        rss = [row[v].get("peak_rss_mb", float("nan")) for v in VARIANTS]
        cpu = [row[v].get("cpu1_ms", float("nan")) for v in VARIANTS]
        lines.append(f"| {row['past']} | {row['batch']} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | "
                     f"{row.get('fused_vs_body', float('nan')):.2f}x | {row.get('fused_vs_gqa', float('nan')):.2f}x | "
                     f"{cpu[0]:.1f} / {cpu[1]:.1f} / {cpu[2]:.1f} | {rss[0]:.0f} / {rss[1]:.0f} / {rss[2]:.0f} | "
                     f"{row['op_kernel'].get('cpu1_ms', float('nan')):.2f} / "
                     f"{row['op_body'].get('cpu1_ms', float('nan')):.2f} "
                     f"({row.get('op_kernel_vs_body', float('nan')):.2f}x) |")
    k = result["kernel_at_max_past"]
    for b, r in k["per_batch"].items():
        lines.append(f"\nkernel alone, past {k['past']}, batch {b}: {r.get('ms_min', float('nan')):.3f} ms, "
                     f"{r.get('gb_per_s', float('nan')):.1f} GB/s = {k['fraction_of_memcpy'][b]:.2f} of memcpy "
                     f"({k['memcpy_gb_per_s']:.1f} GB/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
