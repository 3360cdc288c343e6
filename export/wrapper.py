"""The decoder-with-past that is exported: an MLA checkpoint's weights, wired as plain torch ops
around one `mla_zoo::multi_head_latent_attention` call per layer, with the cache as flat tensors.

Built from the checkpoint's weights (names and layouts: export/op_spec.md), not from the modeling
file's private helpers. Its eager forward runs the op's torch reference, so it can be checked
against the HF model before anything is exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mla_zoo.modeling.common import MlaZooError
from torch import nn

from . import op as _op  # noqa: F401  (registers torch.ops.mla_zoo.multi_head_latent_attention)


class NotMLACheckpointError(MlaZooError):
    """The checkpoint is not an mla-zoo MLA model."""


def check_mla_config(config) -> None:
    missing = [k for k in ("kv_lora_rank", "rope_pairs") if getattr(config, k, None) is None]
    if getattr(config, "model_type", None) != "llama_mla" or missing:
        raise NotMLACheckpointError(
            f"not an MLA checkpoint: model_type={getattr(config, 'model_type', None)!r}"
            + (f", missing {', '.join(missing)}" if missing else "")
            + "; convert it first with `mla-zoo convert` (only llama_mla checkpoints export with the fused op)"
        )


class MLAAttentionForExport(nn.Module):
    """One attention block: q / latent / RoPE-key projections, the fused op, the value bias, o_proj.

    Its latent width is its own (`kv_a_proj`'s rows): per-layer `kv_lora_ranks` export as they are."""

    def __init__(self, attn: nn.Module, config, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_dim = 2 * len(config.rope_pairs[layer_idx][0])
        self.nope_dim = self.head_dim - self.rope_dim
        self.v_dim = self.head_dim
        self.rope_pairs = [int(p) for head in config.rope_pairs[layer_idx] for p in head]
        self.scale = float(self.head_dim**-0.5)
        self.q_proj, self.kv_a_proj, self.k_rope_proj, self.o_proj = (
            attn.q_proj, attn.kv_a_proj, attn.k_rope_proj, attn.o_proj)
        r = attn.kv_a_proj.weight.shape[0]  # this layer's kv_lora_rank
        self.latent_dim = r
        self.key_rope_dim = self.num_kv_heads * self.rope_dim  # n_kv * 2R
        w = attn.kv_b_proj.weight.detach().view(self.num_kv_heads, self.nope_dim + self.v_dim, r)
        self.register_buffer("w_uk", w[:, : self.nope_dim].contiguous())  # [n_kv, d_nope, r]
        self.register_buffer("w_uv", w[:, self.nope_dim :].contiguous())  # [n_kv, d_v, r]
        b = attn.kv_b_proj.bias
        # A NoPE-key bias adds q_nope . b to every score of a query: softmax ignores it. A value bias
        # adds b to every output (the weights sum to one): one Add after the op, per query head.
        b_uv = None
        if b is not None:
            b_uv = b.detach().view(self.num_kv_heads, -1)[:, self.nope_dim :]  # [n_kv, d_v]
            groups = self.num_heads // self.num_kv_heads
            b_uv = b_uv.repeat_interleave(groups, dim=0).reshape(-1).contiguous()  # [H * d_v]
        self.register_buffer("b_uv", b_uv)

    def forward(self, hidden, past_latent, past_key_rope, attention_mask, cos, sin, past_length=None):
        query = self.q_proj(hidden)  # [B, S, H*hd]
        latent = F.linear(hidden, self.kv_a_proj.weight)  # [B, S, r]
        key_rope = self.k_rope_proj(hidden)  # [B, S, n_kv*2R]
        out, present_latent, present_key_rope = torch.ops.mla_zoo.multi_head_latent_attention(
            query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, self.w_uk, self.w_uv,
            self.num_heads, self.num_kv_heads, self.rope_pairs, self.scale, past_length,
        )  # [B, S, H*d_v], [B, 1, T, r], [B, 1, T, n_kv*2R] (version 2: T = the buffer's C rows)
        if self.b_uv is not None:
            out = out + self.b_uv
        return self.o_proj(out), present_latent, present_key_rope


class RMSNormForExport(nn.Module):
    """A checkpoint's RMSNorm, the same function written as x / sqrt(mean(x^2) + eps): the pattern (Pow ->
    ReduceMean -> Add -> Sqrt -> Div -> Mul) that onnxruntime's SimplifiedLayerNormFusion turns into one
    SimplifiedLayerNormalization node on the CPU and CUDA providers. The modeling file's rsqrt exports as
    Sqrt -> Reciprocal -> Mul, which no fusion matches: 7 nodes per norm instead of 1, two norms a layer."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        x = hidden.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)  # [B, S, 1]
        return self.weight * (x / torch.sqrt(variance + self.eps)).to(dtype)


class DecoderWithPast(nn.Module):
    """forward(input_ids, attention_mask, position_ids, past, past_length=None) -> (logits, presents).

    past / presents: flat list [latent_0, key_rope_0, latent_1, ...], latent_i [B, 1, P, r_i] (r_i: layer i's
    latent width) and key_rope_i [B, 1, P, n_kv*2R]; attention_mask [B, P+S] (1 = token, 0 = padding);
    position_ids [B, S]. With past_length (int64 [1], op version 2): every past tensor is a buffer of C rows
    whose first past_length hold the past, the mask is [B, C], and each present is its buffer with the new rows.
    """

    def __init__(self, model: nn.Module, residual_dtype: torch.dtype | None = None):
        super().__init__()
        config = model.config
        self.residual_dtype = residual_dtype  # the residual stream's dtype (None: the model's)
        check_mla_config(config)
        self.config = config
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.rotary_emb = inner.rotary_emb
        self.norm = RMSNormForExport(inner.norm)
        self.lm_head = model.lm_head
        self.input_norms = nn.ModuleList(RMSNormForExport(layer.input_layernorm) for layer in inner.layers)
        self.post_norms = nn.ModuleList(RMSNormForExport(layer.post_attention_layernorm) for layer in inner.layers)
        self.mlps = nn.ModuleList(layer.mlp for layer in inner.layers)
        self.attns = nn.ModuleList(
            MLAAttentionForExport(layer.self_attn, config, i) for i, layer in enumerate(inner.layers))
        self.half_dim = config.head_dim // 2

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor], past_length=None):
        hidden = self.embed_tokens(input_ids)  # [B, S, hidden]
        cos, sin = self.rotary_emb(hidden, position_ids)  # [B, S, hd]; the second half repeats the first
        cos, sin = cos[..., : self.half_dim], sin[..., : self.half_dim]  # [B, S, hd/2]
        dtype = hidden.dtype  # the weights'
        if self.residual_dtype is not None:  # the blocks read it cast back after their norms, add to it in fp32
            hidden = hidden.to(self.residual_dtype)
        presents = []
        for i, attn in enumerate(self.attns):
            out, present_latent, present_key_rope = attn(
                self._block_input(self.input_norms[i](hidden), dtype), past[2 * i], past[2 * i + 1], attention_mask,
                cos, sin, past_length)
            hidden = hidden + out
            hidden = hidden + self.mlps[i](self._block_input(self.post_norms[i](hidden), dtype))
            presents += [present_latent, present_key_rope]
        logits = self.lm_head(self._block_input(self.norm(hidden), dtype))  # [B, S, vocab]
        return logits, presents

    @staticmethod
    def _block_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A norm's output as its block's input: in the weights' dtype (a cast only with a wider residual)."""
        return x if x.dtype == dtype else x.to(dtype)

    def empty_past(self, batch: int, past_len: int = 0, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Zero past tensors in feed order, each layer at its own latent width."""
        dtype = dtype or self.lm_head.weight.dtype
        out = []
        for a in self.attns:
            out += [torch.zeros(batch, 1, past_len, a.latent_dim, dtype=dtype),  # [B, 1, P, r_i]
                    torch.zeros(batch, 1, past_len, a.key_rope_dim, dtype=dtype)]  # [B, 1, P, n_kv*2R]
        return out
