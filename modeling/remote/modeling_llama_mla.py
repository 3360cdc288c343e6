"""Llama-family decoder with Multi-head Latent Attention (MLA), as produced by MHA2MLA.

This file is copied verbatim into every mla-zoo checkpoint and loaded with
`AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`, so it imports only torch,
transformers and the two files beside it (`configuration_llama_mla`, and `mla_decode_triton`, the
GPU decode kernel, used when triton imports). It owns its small building blocks (RMSNorm, MLP,
rotary embedding) instead of importing Llama's, which change between transformers releases, and it
runs on transformers 5.17 through the newest release (the cache argument is `cache` from 5.24 on,
`past_key_values` before: both are accepted). It is ordered as the model runs.

One attention layer, per token x (the post-norm hidden state):

    q        = W_q x                      per head: [rope (2R) | nope (head_dim - 2R)]
    c_kv     = W_dkv x                    the shared latent, kv_lora_rank (r) wide   <- cached
    k_rope   = RoPE(W_kr x)               2R dims per KV head, all heads side by side <- cached
    k_nope   = W_uk[g] c_kv               per KV head g
    v        = W_uv[g] c_kv               per KV head g

The cache is an ordinary transformers cache (DynamicCache, StaticCache, ...). Like DeepSeek-V3 in
transformers, each layer stores two single-"head" tensors: the latent as the "keys"
[B, 1, T, r] and the rotated RoPE keys of all KV heads as the "values" [B, 1, T, n_kv * 2R]. So
beam search, cropping, static caches and torch.compile work unchanged, and only the latent and the
RoPE key dims are held.

Two paths compute the same attention:
* explicit: up-project k_nope and v for every cached token, then SDPA (or eager). Cheap when the
  queries are many (training, prefill).
* absorbed: fold W_uk into the query (q_lat = W_uk^T q_nope) and W_uv into the output, so scores
  and the weighted sum run directly over the cached latent (DeepSeek-V2's trick). Cheap when few
  queries meet a long cache (decoding). `mla_absorbed_attention` is that core as one function of
  plain tensors; the Triton kernel (decode, CUDA) and the ONNX op implement exactly it.

Biases (Qwen2 has q/k/v biases) fit both paths exactly: a bias on k_nope adds q_nope . b to every
score of a query, which softmax ignores; a bias on v adds b to every output because the attention
weights sum to one.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_llama_mla import LlamaMLAConfig

try:  # the GPU decode kernel; absent triton (CPU installs) the PyTorch path runs
    from .mla_decode_triton import is_supported as triton_decode_supported
    from .mla_decode_triton import mla_decode as triton_decode
except ImportError:
    triton_decode = triton_decode_supported = None

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the outputs' cache field from `past_key_values` to `cache`.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Keyword arguments that callers of a transformers model pass and this model may ignore.
IGNORED_KWARGS = {"cache_position", "num_logits_to_keep", "token_type_ids"}
# Loss arguments the Trainer passes through a model's forward.
LOSS_KWARGS = {"num_items_in_batch", "ignore_index", "shift_labels"}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
ABSORBED_MAX_QUERIES = 16  # "auto" takes the absorbed path for up to this many new tokens over a cache
USE_TRITON_DECODE = True  # set False to decode with the PyTorch path on CUDA too (tests, benchmarks)


# ----------------------------------------------------------------------------------------------
# Building blocks (owned copies: transformers' Llama classes change between releases)
# ----------------------------------------------------------------------------------------------


class LlamaMLARMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(dtype)


class LlamaMLAMLP(nn.Module):
    def __init__(self, config: LlamaMLAConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaMLARotaryEmbedding(nn.Module):
    """cos/sin of every RoPE frequency of the source model; each layer then picks its kept pairs.

    Every rope type of transformers' `ROPE_INIT_FUNCTIONS` works ("default", "linear", "llama3",
    "yarn", ...); "dynamic" and "longrope" recompute their frequencies with the sequence length
    through transformers' `dynamic_rope_update`, which reads the attributes set here.
    """

    def __init__(self, config: LlamaMLAConfig):
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim / 2]
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_inv_freq(config: LlamaMLAConfig) -> tuple[torch.Tensor, float]:
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config)
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float)  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, head_dim]
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def select_rope(cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the kept pairs per KV head, laid out for `rotate_half` over 2R dims.

    cos, sin: [B, S, head_dim] (the second half repeats the first); pairs: [n_kv, R] pair
    indices. Returns [B, S, n_kv, 2R].
    """
    cos, sin = cos[..., pairs], sin[..., pairs]  # [B, S, n_kv, R]
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Attention cores (plain tensors in, plain tensors out)
# ----------------------------------------------------------------------------------------------


def apply_mask(scores: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """scores: [B, H, S, T] (float32). attn_mask: [B or 1, 1, S, T], bool (True = attend) as built for
    SDPA, or additive float as built for eager; None = causal from slot 0 (SDPA's `is_causal`: query i
    sees keys 0..i), which for one query means everything. A fully masked row stays finite."""
    low = torch.finfo(scores.dtype).min
    if attn_mask is None:
        s, t = scores.shape[-2:]
        if s == 1:
            return scores
        attn_mask = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril()  # [S, T]
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, low)
    return (scores + attn_mask).clamp_min(low)


def mla_absorbed_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA attention over the latent cache, with W_uk absorbed into the query (W_uv is applied after).

    q_lat:  [B, H, S, r]       queries in latent space: head h's q_nope times W_uk of its KV head
    q_rope: [B, H, S, 2R]      rotated RoPE query dims
    c_kv:   [B, T, r]          cached latent
    k_rope: [B, T, n_kv * 2R]  cached rotated RoPE keys; KV head g owns dims [g*2R, (g+1)*2R) and
                               serves query heads g*G .. g*G+G-1 (G = H / n_kv)
    attn_mask: see `apply_mask`
    returns o_lat [B, H, S, r] (the weighted sum of latents) and probs [B, H, S, T]
    """
    b, h, s, _ = q_lat.shape
    rope = q_rope.shape[-1]
    n_kv = k_rope.shape[-1] // rope
    scores = q_lat @ c_kv[:, None].transpose(-1, -2)  # [B, H, S, T]
    k_rope = k_rope.unflatten(-1, (n_kv, rope)).permute(0, 2, 3, 1)  # [B, n_kv, 2R, T]
    scores = scores + (q_rope.reshape(b, n_kv, -1, rope) @ k_rope).view_as(scores)  # per KV-head group
    scores = apply_mask(scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale, attn_mask)
    probs = scores.softmax(dim=-1)  # [B, H, S, T], at least float32
    o_lat = probs.to(c_kv.dtype) @ c_kv[:, None]  # [B, H, S, r]
    return o_lat, probs


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention that returns its weights, with transformers' attention-interface signature.

    query: [B, H, S, D], key: [B, n_kv, T, D], value: [B, n_kv, T, Dv]; returns [B, S, H, Dv] and the
    weights [B, H, S, T]. `ALL_ATTENTION_FUNCTIONS` supplies "sdpa" with the same signature.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # [B, H, T, D]
    scores = query @ key.transpose(-1, -2)  # [B, H, S, T]
    scores = apply_mask(scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling, attention_mask)
    probs = scores.softmax(dim=-1)
    out = F.dropout(probs, p=dropout, training=module.training).to(value.dtype) @ value  # [B, H, S, Dv]
    return out.transpose(1, 2), probs


# ----------------------------------------------------------------------------------------------
# Attention block, decoder layer
# ----------------------------------------------------------------------------------------------


class LlamaMLAAttention(nn.Module):
    """MLA attention converted from a Llama-family block (see the module docstring)."""

    def __init__(self, config: LlamaMLAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_groups = self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.is_causal = True
        self.head_dim = config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.nope_dim = config.qk_nope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.layer_kv_lora_rank(layer_idx)
        self.scaling = self.head_dim**-0.5  # the source model's scale: q.k still spans head_dim dims

        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.kv_a_proj = nn.Linear(hidden, self.kv_lora_rank, bias=False)  # down-projection W_dkv
        self.k_rope_proj = nn.Linear(hidden, self.num_kv_heads * self.rope_dim, bias=config.attention_bias)
        self.kv_b_proj = nn.Linear(  # up-projection [W_uk; W_uv] per KV head
            self.kv_lora_rank, self.num_kv_heads * (self.nope_dim + self.v_dim), bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=config.attention_output_bias)
        self.register_buffer("rope_pairs", self.config_rope_pairs(), persistent=False)  # [n_kv, R]

    def config_rope_pairs(self) -> torch.Tensor:
        return torch.tensor(self.config.rope_pairs[self.layer_idx], dtype=torch.long)

    def up_projections(self):
        """W_uk [n_kv, d_nope, r], W_uv [n_kv, d_v, r], and the biases b_uk, b_uv (or None)."""
        w = self.kv_b_proj.weight.view(self.num_kv_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        b_uk = b_uv = None
        if self.kv_b_proj.bias is not None:
            b_uk, b_uv = self.kv_b_proj.bias.view(self.num_kv_heads, -1).split([self.nope_dim, self.v_dim], -1)
        return w[:, : self.nope_dim], w[:, self.nope_dim :], b_uk, b_uv

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = hidden_states.shape
        n_kv, grp = self.num_kv_heads, self.num_groups
        cos, sin = select_rope(*position_embeddings, self.rope_pairs)  # [B, S, n_kv, 2R]

        q = self.q_proj(hidden_states).view(b, s, n_kv, grp, self.head_dim)
        q_rope = apply_rope(q[..., : self.rope_dim], cos[:, :, :, None], sin[:, :, :, None])  # [B, S, n_kv, G, 2R]
        q_nope = q[..., self.rope_dim :]  # [B, S, n_kv, G, d_nope]

        c_kv = self.kv_a_proj(hidden_states)  # [B, S, r]
        k_rope = self.k_rope_proj(hidden_states).view(b, s, n_kv, self.rope_dim)
        k_rope = apply_rope(k_rope, cos, sin).flatten(2)  # [B, S, n_kv * 2R]
        if cache is not None:
            c_all, k_all = cache.update(c_kv[:, None], k_rope[:, None], self.layer_idx)  # [B, 1, T, r], [B, 1, T, P]
            c_kv, k_rope = c_all[:, 0], k_all[:, 0]  # [B, T, r], [B, T, n_kv * 2R]

        w_uk, w_uv, b_uk, b_uv = self.up_projections()
        mode = self.config.mla_attention
        absorbed = mode == "absorbed" or (mode == "auto" and cache is not None and s <= ABSORBED_MAX_QUERIES)
        if absorbed:
            q_lat = torch.einsum("bsgqd,gdr->bgqsr", q_nope, w_uk).reshape(b, self.num_heads, s, -1)  # [B, H, S, r]
            q_rope = q_rope.permute(0, 2, 3, 1, 4).reshape(b, self.num_heads, s, -1)  # [B, H, S, 2R]
            o_lat, weights = self.absorbed_core(q_lat, q_rope, c_kv, k_rope, attention_mask, output_attentions)
            o_lat = o_lat.view(b, n_kv, grp, s, -1)
            out = torch.einsum("bgqsr,gdr->bsgqd", o_lat, w_uv)  # [B, S, n_kv, G, d_v]
        else:
            k_nope = torch.einsum("btr,gdr->bgtd", c_kv, w_uk)  # [B, n_kv, T, d_nope]
            if b_uk is not None:
                k_nope = k_nope + b_uk[None, :, None]
            v = torch.einsum("btr,gdr->bgtd", c_kv, w_uv)  # [B, n_kv, T, d_v]
            k = torch.cat((k_rope.unflatten(-1, (n_kv, -1)).transpose(1, 2), k_nope), dim=-1)  # [B, n_kv, T, hd]
            q = torch.cat((q_rope, q_nope), dim=-1).permute(0, 2, 3, 1, 4).reshape(b, self.num_heads, s, -1)
            dropout = self.config.attention_dropout if self.training else 0.0
            attention = eager_attention_forward  # "eager", and whenever the weights are asked for
            if not output_attentions:
                attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, attention)
            out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling)
            out = out.reshape(b, s, n_kv, grp, -1)  # [B, S, n_kv, G, d_v]
        if b_uv is not None:
            out = out + b_uv[:, None]  # [n_kv, 1, d_v] broadcast over the group
        out = self.o_proj(out.reshape(b, s, self.num_heads * self.v_dim))  # [B, S, hidden]
        return out, (weights.to(hidden_states.dtype) if output_attentions else None)

    def absorbed_core(self, q_lat, q_rope, c_kv, k_rope, attention_mask, output_attentions):
        """`mla_absorbed_attention`, through the Triton kernel for one-token decode on CUDA."""
        s = q_lat.shape[2]
        mask_ok = attention_mask is None or attention_mask.dtype == torch.bool
        if s == 1 and not output_attentions and mask_ok and triton_decode is not None and USE_TRITON_DECODE:
            if triton_decode_supported(q_lat, c_kv):
                kv_mask = None
                if attention_mask is not None:  # [B or 1, 1, 1, T] -> [B, T]
                    kv_mask = attention_mask[:, 0, -1].expand(q_lat.shape[0], -1)
                o_lat = triton_decode(q_lat[:, :, 0], q_rope[:, :, 0], c_kv, k_rope, kv_mask, self.scaling)
                return o_lat[:, :, None], None  # [B, H, 1, r]
        return mla_absorbed_attention(q_lat, q_rope, c_kv, k_rope, attention_mask, self.scaling)


class LlamaMLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaMLAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaMLAAttention(config, layer_idx)
        self.mlp = LlamaMLAMLP(config)
        self.input_layernorm = LlamaMLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaMLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, output_attentions
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """transformers >= 5.24 passes `cache=`, older releases `past_key_values=`: accept either, not both."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    if past_key_values is not None and CACHE_FIELD == "cache":  # this transformers calls it `cache`
        warnings.warn("`past_key_values` is deprecated: pass the cache as `cache`", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def check_unused_kwargs(kwargs: dict, where: str) -> None:
    unknown = sorted(set(kwargs) - IGNORED_KWARGS - LOSS_KWARGS)
    if unknown:
        logger.warning_once(f"{where} ignores arguments it does not know: {', '.join(unknown)}")


class LlamaMLAPreTrainedModel(PreTrainedModel):
    config_class = LlamaMLAConfig
    config: LlamaMLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False  # transformers refuses these with a clear error
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = True  # generate() compiles the decode step with a static cache

    def _init_weights(self, module):
        # The non-persistent buffers are rebuilt from the config whenever transformers (re)initialises.
        with torch.no_grad():
            if isinstance(module, LlamaMLARotaryEmbedding):
                inv_freq = module.compute_inv_freq(self.config)[0]
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)
            elif isinstance(module, LlamaMLAAttention):
                module.rope_pairs.copy_(module.config_rope_pairs())
            elif isinstance(module, LlamaMLARMSNorm):
                module.weight.fill_(1.0)
            else:
                super()._init_weights(module)

    def _get_static_cache_init_shape(self, *args, **kwargs):
        return None  # keys and values differ in width here: StaticCache initialises lazily, on the first update


class LlamaMLAModel(LlamaMLAPreTrainedModel):
    def __init__(self, config: LlamaMLAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaMLADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaMLARMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaMLARotaryEmbedding(config)  # all frequencies; each layer picks its pairs
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, past_key_values: Cache | None = None,
                **kwargs) -> BaseModelOutputWithPast | tuple:
        check_unused_kwargs(kwargs, type(self).__name__)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        impl = self.config._attn_implementation or "sdpa"
        if impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"LlamaMLA supports attn_implementation {ATTENTION_IMPLEMENTATIONS}, got {impl!r}")
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        use_cache = cfg.use_cache if use_cache is None else use_cache
        cache = resolve_cache_argument(cache, past_key_values)
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a checkpointed layer would write the cache twice
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=cfg)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, S, hidden]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]

        # Built once per forward, for every layer: bool [B, 1, S, T] (sdpa), additive (eager) or None.
        mask = create_causal_mask(cfg, inputs_embeds, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin: [B, S, head_dim]

        hidden_states = inputs_embeds
        all_hidden, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(hidden_states, position_embeddings, mask, cache, output_attentions)
            if output_attentions:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{CACHE_FIELD: cache},
        )
        return out if return_dict else out.to_tuple()


class LlamaMLAForCausalLM(LlamaMLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LlamaMLAConfig):
        super().__init__(config)
        self.model = LlamaMLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: Cache | None = None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        loss_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in LOSS_KWARGS}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)  # [B, S, vocab]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return out if return_dict else out.to_tuple()


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache this model filled (the latent + RoPE keys of every layer)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


__all__ = ["LlamaMLAForCausalLM", "LlamaMLAModel", "LlamaMLAPreTrainedModel", "mla_absorbed_attention"]
