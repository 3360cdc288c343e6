"""The fp16 error of the SmolLM2-135M-MLA export with the CUDA kernel's own code, on a CPU: the op runs the
emulated CUDA source (kernels/cuda_emulation.h) inside onnxruntime's CPU provider, against PyTorch fp32, with
tests/test_onnx_cuda_gpu.py's metric (max abs logit error / max abs logit over a prefill and N decode steps of
random tokens, two left-padded chat prompts).

    MLA_ZOO_CUDA_KERNEL=warps python bench/onnx_cuda_fp16_emulated.py 16    # ~5 min on 2 cores
    MLA_ZOO_CUDA_KERNEL=blocks python bench/onnx_cuda_fp16_emulated.py 16
"""

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


def main(decode_steps: int) -> None:
    model, tok, info = sources.resolve("smollm2-135m")
    settings = ConvertSettings(svd="whitened", calib_tokens=512, **SMOLLM2_PAPER_SETTING)
    mla, _ = convert_model(model, tok, info, settings, progress=False)
    mla.eval()
    report = exporter.export_model(copy.deepcopy(mla).half(), Path("/tmp/onnx_cuda_fp16_emulated"), dtype="fp16")
    so = ort.SessionOptions()
    so.register_custom_ops_library(build.build_emulation().library)
    decoder = runner.OnnxDecoder(report.output_dir, use_kernels=False)
    decoder.session = ort.InferenceSession(report.model_path, so, providers=["CPUExecutionProvider"])

    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for p in PROMPTS]
    ids, mask = left_padded(prompts, pad=tok.pad_token_id or 0)  # [B, P]
    steps = np.random.default_rng(0).integers(3, mla.config.vocab_size, size=(decode_steps, ids.shape[0]))  # [N, B]
    full_ids = np.concatenate([ids, steps.T], 1)  # [B, P + N]
    full_mask = np.concatenate([mask, np.ones_like(steps.T)], 1)  # [B, P + N]
    pos = runner.position_ids_from_mask(full_mask, full_ids.shape[1])
    with torch.no_grad():
        ref = mla(input_ids=torch.from_numpy(full_ids), attention_mask=torch.from_numpy(full_mask),
                  position_ids=torch.from_numpy(pos), use_cache=False).logits.float().numpy()  # [B, P + N, V]

    started = time.time()
    logits, past = decoder.step(ids, mask, runner.position_ids_from_mask(mask, ids.shape[1]),
                                decoder.empty_past(ids.shape[0]))
    got = [logits]
    for t in range(decode_steps):
        m = full_mask[:, : ids.shape[1] + t + 1]
        logits, past = decoder.step(steps[t][:, None], m, runner.position_ids_from_mask(m, 1), past)
        got.append(logits)
    got = np.concatenate(got, 1).astype(np.float32)  # [B, P + N, V]
    diff = np.abs(got - ref)
    scale = np.abs(ref[full_mask.astype(bool)]).max()
    print(json.dumps({"kernel": os.environ.get("MLA_ZOO_CUDA_KERNEL", "default"),
                      "rel": float(diff[full_mask.astype(bool)].max() / scale),
                      "rel_prefill": float(diff[:, : ids.shape[1]][mask.astype(bool)].max() / scale),
                      "rel_decode": float(diff[:, ids.shape[1]:].max() / scale),
                      "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
