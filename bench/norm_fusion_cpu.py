"""The exported RMSNorm's two forms side by side on the CPU (export/wrapper.RMSNormForExport): the modeling file's
`x * rsqrt(...)`, which onnxruntime leaves as 7 nodes, and the export's `x / sqrt(...)`, which it fuses into one
SimplifiedLayerNormalization. SmolLM2-135M-MLA (d_kv=32, weight-only SVD: speed does not depend on the weights),
fp32, our kernel library; for each form: the nodes of onnxruntime's optimized graph, then one decode step's median
time, the two sessions in alternating rounds.

    python bench/norm_fusion_cpu.py [--threads 2] [--workdir /tmp/mla-zoo-norm-fusion]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def rsqrt_forward(self, hidden: torch.Tensor) -> torch.Tensor:  # the modeling file's form, for the comparison
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/mla-zoo-norm-fusion")
    p.add_argument("--points", default="512x1,2048x1,512x8", help="past x batch, comma-separated")
    a = p.parse_args()
    import onnx
    import onnxruntime as ort
    from mla_zoo.export import wrapper
    from mla_zoo.export.exporter import export_model
    from mla_zoo.export.kernels.build import get_library_path
    from mla_zoo.modeling import sources
    from mla_zoo.modeling.convert import convert_model
    from mla_zoo.modeling.convert_schema import ConvertSettings

    ort.set_default_logger_severity(3)
    root = Path(a.workdir)
    div_forward = wrapper.RMSNormForExport.forward
    forms = {"rsqrt": rsqrt_forward, "div": div_forward}
    if not all((root / name / "model.onnx").exists() for name in forms):
        model, tokenizer, info = sources.resolve("smollm2-135m", dtype=torch.float32)
        settings = ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="high", svd="joint",
                                   dtype="float32")
        mla, _ = convert_model(model, tokenizer, info, settings, progress=False)
        for name, forward in forms.items():
            wrapper.RMSNormForExport.forward = forward
            export_model(mla.eval(), root / name)
        wrapper.RMSNormForExport.forward = div_forward
    sessions, result = {}, {"threads": a.threads, "onnxruntime": ort.__version__, "forms": {}, "points": []}
    for name in forms:
        so = ort.SessionOptions()
        so.register_custom_ops_library(get_library_path())
        so.intra_op_num_threads = a.threads
        so.optimized_model_filepath = str(root / name / "optimized.onnx")
        sessions[name] = ort.InferenceSession(str(root / name / "model.onnx"), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        result["forms"][name] = {"optimized_nodes": len(ops), "norm_nodes": ops.count("SimplifiedLayerNormalization")}
    rng = np.random.default_rng(0)
    for point in a.points.split(","):
        past, batch = (int(x) for x in point.split("x"))
        feed = {"input_ids": np.zeros((batch, 1), np.int64), "attention_mask": np.ones((batch, past + 1), np.int64),
                "position_ids": np.full((batch, 1), past, np.int64)}
        for i in sessions["div"].get_inputs()[3:]:
            feed[i.name] = rng.standard_normal((batch, 1, past, i.shape[3])).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(5):  # rounds: A B A B ...
            for name, session in sessions.items():
                session.run(None, feed)
                for _ in range(4):
                    t = time.perf_counter()
                    session.run(None, feed)
                    times[name].append(time.perf_counter() - t)
        ms = {name: 1e3 * float(np.median(v)) for name, v in times.items()}
        result["points"].append({"past": past, "batch": batch, "ms_median": ms, "speedup": ms["rsqrt"] / ms["div"]})
        print(json.dumps(result["points"][-1]), flush=True)
    print(json.dumps(result["forms"]))


if __name__ == "__main__":
    main()
