"""Where the fp16 error of the SmolLM2-135M-MLA export comes from: onnxruntime fp16 logits against PyTorch, with
tests/test_onnx_cuda_gpu.py's conversion and metric (max abs logit error / max abs reference logit over a prefill
and N decode steps of random tokens, two left-padded chat prompts), against two references: PyTorch float64 on the
CPU (the exact model) and PyTorch fp32 on the device (what the GPU test compares with).

    MLA_ZOO_CUDA_KERNEL=warps python bench/onnx_fp16_errors.py --ort emulated   # CPU, the op runs the emulated CUDA
                                                               # source (kernels/cuda_emulation.h); ~5 min on 2 cores
    MLA_ZOO_CUDA_KERNEL=blocks python bench/onnx_fp16_errors.py --ort cuda      # GPU: our CUDA kernel on the CUDA EP
    python bench/onnx_fp16_errors.py --ort cuda-body           # GPU: the op's portable function body on the CUDA EP
                                                               # (standard ops only: no custom library)
    python bench/onnx_fp16_errors.py --ort cuda --fp16-residual   # an all-fp16 export (`--no-fp32-residual`)

On a GPU each run also reports PyTorch fp32 and fp16 on CUDA against float64. The tuning is read once per
process (MLA_ZOO_CUDA_KERNEL), so each kernel is its own run. One JSON line per run (`--out` appends it).
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from mla_zoo.export import exporter, runner
from mla_zoo.export.kernels import build
from mla_zoo.modeling import sources
from mla_zoo.modeling.convert import convert_model
from mla_zoo.modeling.convert_schema import ConvertSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SMOLLM2_PAPER_SETTING  # noqa: E402  (the GPU test's conversion)
from test_onnx_export import left_padded  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea and the wind."]


def torch_logits(model, ids: np.ndarray, mask: np.ndarray, device: str) -> np.ndarray:
    """[B, S, V] float64 logits of one full forward (no cache)."""
    pos = runner.position_ids_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                    position_ids=torch.from_numpy(pos).to(device), use_cache=False)
    return out.logits.double().cpu().numpy()


def smollm2_case(decode_steps: int) -> tuple:
    """The GPU test's case: (SmolLM2-135M-MLA fp32 (whitened SVD, 512 calibration tokens), ids [B, P] and
    mask [B, P] of two left-padded chat prompts, `decode_steps` random tokens [N, B])."""
    model, tok, info = sources.resolve("smollm2-135m")
    settings = ConvertSettings(svd="whitened", calib_tokens=512, **SMOLLM2_PAPER_SETTING)
    mla, _ = convert_model(model, tok, info, settings, progress=False)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for q in PROMPTS]
    ids, mask = left_padded(prompts, pad=tok.pad_token_id or 0)  # [B, P]
    steps = np.random.default_rng(0).integers(3, mla.config.vocab_size, size=(decode_steps, ids.shape[0]))  # [N, B]
    return mla.eval(), ids, mask, steps


def decoder_for(mode: str, output_dir: Path, model_path: str) -> runner.OnnxDecoder:
    if mode == "cuda":
        return runner.OnnxDecoder(output_dir, use_kernels=True, device="cuda")
    if mode == "cuda-body":
        return runner.OnnxDecoder(output_dir, use_kernels=False, device="cuda")
    decoder = runner.OnnxDecoder(output_dir, use_kernels=False)  # emulated: the CUDA source on the CPU provider
    so = ort.SessionOptions()
    so.register_custom_ops_library(build.build_emulation().library)
    decoder.session = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    return decoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ort", choices=("emulated", "cuda", "cuda-body"), default="emulated")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--fp16-residual", action="store_true",
                   help="export all-fp16, the residual stream included (the export's --no-fp32-residual)")
    p.add_argument("--out", help="append the JSON line to this file")
    a = p.parse_args()
    mla, ids, mask, steps = smollm2_case(a.decode_steps)
    export_dir = Path("/tmp/onnx_fp16_errors" + ("_fp16_residual" if a.fp16_residual else ""))
    if not (export_dir / "model.onnx").is_file():  # the same graph for every --ort: made by the first run
        exporter.export_model(copy.deepcopy(mla).half(), export_dir, dtype="fp16",
                              fp32_residual=not a.fp16_residual)
    decoder = decoder_for(a.ort, export_dir, str(export_dir / "model.onnx"))

    full_ids = np.concatenate([ids, steps.T], 1)  # [B, P + N]
    full_mask = np.concatenate([mask, np.ones_like(steps.T)], 1)  # [B, P + N]
    refs = {"float64_cpu": torch_logits(copy.deepcopy(mla).double(), full_ids, full_mask, "cpu")}
    device = "cuda" if a.ort != "emulated" else "cpu"
    refs["float32_" + device] = torch_logits(mla.to(device), full_ids, full_mask, device)
    if device == "cuda":
        refs["float16_cuda"] = torch_logits(copy.deepcopy(mla).half(), full_ids, full_mask, device)

    started = time.time()
    logits, past = decoder.step(ids, mask, runner.position_ids_from_mask(mask, ids.shape[1]),
                                decoder.empty_past(ids.shape[0]))
    got = [logits]
    for t in range(a.decode_steps):
        m = full_mask[:, : ids.shape[1] + t + 1]
        logits, past = decoder.step(steps[t][:, None], m, runner.position_ids_from_mask(m, 1), past)
        got.append(logits)
    got = np.concatenate(got, 1).astype(np.float64)  # [B, P + N, V]
    keep = full_mask.astype(bool)

    def rel(x: np.ndarray, ref: np.ndarray) -> float:
        return float(np.abs(x - ref)[keep].max() / np.abs(ref[keep]).max())

    exact = refs["float64_cpu"]
    errors = {f"ort_vs_{name}": rel(got, ref) for name, ref in refs.items()}
    errors |= {f"torch_{name}_vs_float64": rel(ref, exact) for name, ref in refs.items() if name != "float64_cpu"}
    errors["ort_prefill_vs_float64"] = float(np.abs(got - exact)[:, : ids.shape[1]][mask.astype(bool)].max()
                                             / np.abs(exact[keep]).max())
    errors["ort_decode_vs_float64"] = float(np.abs(got - exact)[:, ids.shape[1]:].max() / np.abs(exact[keep]).max())
    line = json.dumps({"ort": a.ort, "kernel": os.environ.get("MLA_ZOO_CUDA_KERNEL", "default"),
                       "fp32_residual": not a.fp16_residual,
                       "onnxruntime": ort.__version__, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "decode_steps": a.decode_steps, **{k: round(v, 6) for k, v in errors.items()},
                       "seconds": round(time.time() - started, 1)})
    print(line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
