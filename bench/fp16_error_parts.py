"""Where the fp16 logits error of SmolLM2-135M-MLA comes from, in PyTorch on the CPU: the export's own forward
(`export.wrapper.DecoderWithPast`, the graph `mla-zoo export` writes, with the op's PyTorch reference) in fp16,
then with one part at a time in fp32 (the residual stream, the attention blocks, the MLPs, the RMSNorms, the final
norm + LM head), each against float64. The conversion, prompts, 16 random decode tokens and metric (max abs logit
error / max abs logit) are tests/test_onnx_cuda_gpu.py's, over one full forward (no cache).

    python bench/fp16_error_parts.py        # ~5 min on 2 cores
"""

import copy
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from mla_zoo.export import runner
from mla_zoo.export.wrapper import DecoderWithPast
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_fp16_errors import smollm2_case  # noqa: E402  (the GPU test's conversion, prompts and tokens)

PARTS = ("none", "residual", "attention", "mlp", "norms", "head")


class InFp32(nn.Module):
    """`inner` run in fp32 inside an fp16 model: fp16 in, fp16 out."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.float()

    def forward(self, *args):
        out = self.inner(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
        if isinstance(out, tuple):
            return tuple(o.half() if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.half()


def forward_fp32_residual(self, input_ids, attention_mask, position_ids, past):
    """DecoderWithPast.forward with the residual stream in fp32: each block reads it cast to fp16 after its norm
    and adds its fp16 output back in fp32."""
    low = self.lm_head.weight.dtype
    hidden = self.embed_tokens(input_ids).float()  # [B, S, hidden] fp32
    cos, sin = self.rotary_emb(hidden.to(low), position_ids)
    cos, sin = cos[..., : self.half_dim], sin[..., : self.half_dim]
    for i, attn in enumerate(self.attns):
        out, _, _ = attn(self.input_norms[i](hidden).to(low), past[2 * i], past[2 * i + 1], attention_mask, cos, sin)
        hidden = hidden + out.float()
        hidden = hidden + self.mlps[i](self.post_norms[i](hidden).to(low)).float()
    return self.lm_head(self.norm(hidden).to(low)), []


def decoder(mla, dtype: torch.dtype, part: str = "none") -> DecoderWithPast:
    model = copy.deepcopy(mla)
    if part == "head":  # the LM head is tied to the embedding: its own copy, in fp32
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    w = DecoderWithPast(model.to(dtype)).eval()
    if part == "residual":
        w.forward = types.MethodType(forward_fp32_residual, w)
    elif part == "attention":
        w.attns = nn.ModuleList(InFp32(m) for m in w.attns)
    elif part == "mlp":
        w.mlps = nn.ModuleList(InFp32(m) for m in w.mlps)
    elif part == "norms":
        w.input_norms = nn.ModuleList(InFp32(m) for m in w.input_norms)
        w.post_norms = nn.ModuleList(InFp32(m) for m in w.post_norms)
    elif part == "head":
        w.norm, w.lm_head = InFp32(w.norm), InFp32(w.lm_head)
    return w


def main() -> None:
    mla, ids, mask, steps = smollm2_case(16)
    ids, mask = np.concatenate([ids, steps.T], 1), np.concatenate([mask, np.ones_like(steps.T)], 1)  # [B, P + N]
    pos = runner.position_ids_from_mask(mask, ids.shape[1])
    keep = mask.astype(bool)

    empty = DecoderWithPast(mla).empty_past(ids.shape[0])  # [B, 1, 0, width] each: no past

    def logits(w: DecoderWithPast) -> np.ndarray:
        past = [p.to(w.embed_tokens.weight.dtype) for p in empty]
        with torch.no_grad():
            out, _ = w(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), past)
        return out.double().numpy()  # [B, P + N, V]

    exact = logits(decoder(mla, torch.float64))
    scale = np.abs(exact[keep]).max()
    errors = {"fp32": float(np.abs(logits(decoder(mla, torch.float32)) - exact)[keep].max() / scale)}
    for part in PARTS:
        errors[f"fp16, {part} in fp32"] = float(np.abs(logits(decoder(mla, torch.float16, part)) - exact)[keep].max()
                                                / scale)
        print(f"{part:10s} {errors[f'fp16, {part} in fp32']:.3e}", flush=True)
    print(json.dumps({"torch": torch.__version__, "errors_vs_float64": errors}))


if __name__ == "__main__":
    main()
