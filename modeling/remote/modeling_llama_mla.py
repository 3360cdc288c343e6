"""Llama-family decoder with Multi-head Latent Attention (MLA), as produced by MHA2MLA.

This file is copied verbatim into every mla-zoo checkpoint and loaded with
`AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`, so it imports only torch,
transformers and `configuration_llama_mla`. It is ordered as the model runs: partial RoPE, the two
attention functions, the attention block, the decoder layer, the model, the LM head.

One attention layer, per token x (the post-norm hidden state):

    q        = W_q x                      per head: [rope (2R) | nope (head_dim - 2R)]
    c_kv     = W_dkv x                    the shared latent, kv_lora_rank wide    <- cached
    k_rope   = RoPE(W_kr x)               2R dims per KV head                     <- cached
    k_nope   = W_uk[g] c_kv               per KV head g
    v        = W_uv[g] c_kv               per KV head g

Two paths compute the same function:
* explicit: up-project k_nope and v for every cached token, then ordinary (GQA) SDPA. Cheap when
  the queries are many (training, prefill).
* absorbed: fold W_uk into the query (q_lat = W_uk^T q_nope) and W_uv into the output, so the
  scores and the weighted sum run directly over the cached latent (DeepSeek-V2's trick). Cheap
  when the queries are few and the cache is long (decoding). `mla_absorbed_attention` is that
  core as one function of plain tensors: the ONNX op and the GPU kernel implement exactly it.

Biases (Qwen2 has q/k/v biases) fit both paths exactly: a bias on k_nope adds q_nope . b to every
score of a query, which softmax ignores; a bias on v adds b to every output because the attention
weights sum to one.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_llama_mla import LlamaMLAConfig

# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


class MLACache(DynamicCache):
    """The compressed KV cache: per layer only the latent and the RoPE key dims are held.

    It reuses DynamicCache's layers (so beam search, cropping and `generate()` work unchanged):
    the "keys" slot of layer l holds the latent `[batch, 1, T, kv_lora_rank]` and the "values"
    slot the rotated RoPE keys `[batch, num_key_value_heads, T, 2R]`. A plain `DynamicCache`
    that `generate()` creates is filled the same way; this class adds accounting.
    """

    def nbytes(self) -> int:
        return cache_nbytes(self)


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes held by a cache filled by this model (latent + RoPE keys of every layer)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# Partial RoPE
# ----------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def select_rope(cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the kept pairs, per KV head, laid out for `rotate_half` over 2R dims.

    cos, sin: [B, S, head_dim] from the model's rotary embedding (its second half repeats the
    first); pairs: [n_kv, R] pair indices. Returns [B, S, n_kv, 2R].
    """
    cos = cos[..., pairs]  # [B, S, n_kv, R]
    sin = sin[..., pairs]
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# The two attention functions (plain tensors in, plain tensors out)
# ----------------------------------------------------------------------------------------------


def mla_absorbed_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """MLA attention computed over the latent cache, with W_uk and W_uv absorbed.

    q_nope: [B, S, n_kv, G, d_nope]   queries' NoPE dims (G = query heads per KV head)
    q_rope: [B, S, n_kv, G, 2R]       queries' RoPE dims, already rotated
    c_kv:   [B, T, r]                 cached latent (r = kv_lora_rank)
    k_rope: [B, T, n_kv, 2R]          cached RoPE keys, already rotated
    w_uk:   [n_kv, d_nope, r]         latent -> NoPE key, per KV head
    w_uv:   [n_kv, d_v, r]            latent -> value, per KV head
    attn_mask: [B, 1, S, T] bool (True = attend) or None (attend to everything)
    returns: [B, S, n_kv, G, d_v]     (value bias not included)
    """
    q_lat = torch.einsum("bsgqd,gdr->bsgqr", q_nope, w_uk)  # [B, S, n_kv, G, r]
    scores = torch.einsum("bsgqr,btr->bgqst", q_lat, c_kv)  # [B, n_kv, G, S, T]
    scores = scores + torch.einsum("bsgqe,btge->bgqst", q_rope, k_rope)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # softmax in >= fp32
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask[:, :, None], float("-inf"))  # mask: [B, 1, 1, S, T]
    probs = scores.softmax(dim=-1).to(c_kv.dtype)
    o_lat = torch.einsum("bgqst,btr->bsgqr", probs, c_kv)  # [B, S, n_kv, G, r]
    return torch.einsum("bsgqr,gdr->bsgqd", o_lat, w_uv)  # [B, S, n_kv, G, d_v]


def mla_explicit_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool = False,
    k_bias: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The same attention, computed the plain way: up-project keys and values, then SDPA.

    Arguments as `mla_absorbed_attention`; `is_causal` replaces a mask for the common training
    case; `k_bias`: [n_kv, d_nope] (softmax ignores it, kept so the keys equal the converted
    source's). Returns [B, S, n_kv, G, d_v] (value bias not included).
    """
    b, s, n_kv, g, _ = q_nope.shape
    k_nope = torch.einsum("btr,gdr->bgtd", c_kv, w_uk)  # [B, n_kv, T, d_nope]
    if k_bias is not None:
        k_nope = k_nope + k_bias[None, :, None]
    v = torch.einsum("btr,gdr->bgtd", c_kv, w_uv)  # [B, n_kv, T, d_v]
    k = torch.cat((k_rope.transpose(1, 2), k_nope), dim=-1)  # [B, n_kv, T, head_dim]
    q = torch.cat((q_rope, q_nope), dim=-1)  # [B, S, n_kv, G, head_dim]
    q = q.permute(0, 2, 3, 1, 4).reshape(b, n_kv * g, s, -1)  # [B, H, S, head_dim]
    k = k.repeat_interleave(g, dim=1)  # [B, H, T, head_dim]
    v = v.repeat_interleave(g, dim=1)  # [B, H, T, d_v]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal and attn_mask is None, scale=scale
    )  # [B, H, S, d_v]
    return out.view(b, n_kv, g, s, -1).permute(0, 3, 1, 2, 4)  # [B, S, n_kv, G, d_v]


def make_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device, allow_none: bool
) -> torch.Tensor | None:
    """Causal + padding mask, [B or 1, 1, S, T] bool, True where a query may attend.

    Query i sits at cache slot past_len + i. A padded query (left padding) would attend to nothing
    and produce NaNs that then leak into real tokens through 0 * NaN, so every query may always
    see its own slot; for real tokens that changes nothing. With `allow_none`, returns None when
    there is nothing to mask or plain causal attention from slot 0 suffices (SDPA's fast path).
    """
    kv_len = past_len + q_len
    if attention_mask is None or bool(attention_mask[:, -kv_len:].all()):
        if q_len == 1:
            return None if allow_none else torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=device)
        if past_len == 0 and allow_none:
            return None
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # [S, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, T]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, S, T]
    if attention_mask is not None:
        keep = attention_mask[:, -kv_len:].bool()[:, None, None, :]  # [B, 1, 1, T]
        mask = (mask & keep) | (k_pos == q_pos)[None, None]
    return mask


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
        self.num_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.nope_dim = config.qk_nope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scaling = self.head_dim**-0.5  # the source model's scale: q.k still spans head_dim dims

        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.kv_a_proj = nn.Linear(hidden, self.kv_lora_rank, bias=False)  # down-projection W_dkv
        self.k_rope_proj = nn.Linear(hidden, self.num_kv_heads * self.rope_dim, bias=config.attention_bias)
        self.kv_b_proj = nn.Linear(  # up-projection [W_uk; W_uv] per KV head
            self.kv_lora_rank, self.num_kv_heads * (self.nope_dim + self.v_dim), bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=config.attention_output_bias)
        pairs = torch.tensor(config.rope_pairs[layer_idx], dtype=torch.long)  # [n_kv, R]
        self.register_buffer("rope_pairs", pairs, persistent=False)

    def up_projections(self):
        """W_uk [n_kv, d_nope, r], W_uv [n_kv, d_v, r], and the biases b_uk, b_uv (or None)."""
        w = self.kv_b_proj.weight.view(self.num_kv_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        b = self.kv_b_proj.bias
        if b is not None:
            b = b.view(self.num_kv_heads, self.nope_dim + self.v_dim)
            b = (b[:, : self.nope_dim], b[:, self.nope_dim :])
        else:
            b = (None, None)
        return w[:, : self.nope_dim], w[:, self.nope_dim :], b[0], b[1]

    def use_absorbed(self, q_len: int, past_len: int) -> bool:
        mode = self.config.mla_attention
        if mode == "auto":  # absorbed pays off when few queries meet a cache
            return past_len > 0 and q_len <= 16
        return mode == "absorbed"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        cos, sin = select_rope(*position_embeddings, self.rope_pairs)  # [B, S, n_kv, 2R]

        q = self.q_proj(hidden_states).view(b, s, self.num_kv_heads, self.num_groups, self.head_dim)
        q_rope = apply_rope(q[..., : self.rope_dim], cos[:, :, :, None], sin[:, :, :, None])  # [B, S, n_kv, G, 2R]
        q_nope = q[..., self.rope_dim :]  # [B, S, n_kv, G, d_nope]

        c_kv = self.kv_a_proj(hidden_states)  # [B, S, r]
        k_rope = self.k_rope_proj(hidden_states).view(b, s, self.num_kv_heads, self.rope_dim)
        k_rope = apply_rope(k_rope, cos, sin)  # [B, S, n_kv, 2R]

        past_len = 0
        if past_key_values is not None:
            past_len = past_key_values.get_seq_length(self.layer_idx)
            c_all, k_all = past_key_values.update(c_kv[:, None], k_rope.transpose(1, 2), self.layer_idx)
            c_kv, k_rope = c_all[:, 0], k_all.transpose(1, 2)  # [B, T, r], [B, T, n_kv, 2R]

        w_uk, w_uv, b_uk, b_uv = self.up_projections()
        if self.use_absorbed(s, past_len):
            mask = make_attention_mask(attention_mask, s, past_len, hidden_states.device, allow_none=False)
            out = mla_absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, self.scaling)
        else:
            # None = causal from slot 0 (is_causal) or nothing to mask (one query): SDPA's fast paths
            mask = make_attention_mask(attention_mask, s, past_len, hidden_states.device, allow_none=True)
            dropout = self.config.attention_dropout if self.training else 0.0
            out = mla_explicit_attention(
                q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, self.scaling, s > 1, b_uk, dropout
            )
        if b_uv is not None:
            out = out + b_uv[:, None]  # [n_kv, 1, d_v] broadcast over the group
        return self.o_proj(out.reshape(b, s, self.num_heads * self.v_dim))


class LlamaMLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaMLAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaMLAAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class LlamaMLAPreTrainedModel(PreTrainedModel):
    config_class = LlamaMLAConfig
    config: LlamaMLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LlamaMLAAttention):  # a non-persistent buffer: rebuilt from the config at load
            with torch.no_grad():
                module.rope_pairs.copy_(torch.tensor(self.config.rope_pairs[module.layer_idx]))


class LlamaMLAModel(LlamaMLAPreTrainedModel):
    def __init__(self, config: LlamaMLAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaMLADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)  # all frequencies; each layer picks its pairs
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("LlamaMLA takes a 2D [batch, kv_len] attention_mask (1 = token, 0 = padding)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, S, hidden]
        if use_cache and past_key_values is None:
            past_key_values = MLACache()
        if not use_cache:
            past_key_values = None
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)  # cos, sin: [B, S, head_dim]
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )


class LlamaMLAForCausalLM(LlamaMLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaMLAConfig):
        super().__init__(config)
        self.model = LlamaMLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # [B, S, vocab]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = ["LlamaMLAForCausalLM", "LlamaMLAModel", "LlamaMLAPreTrainedModel", "MLACache", "mla_absorbed_attention"]
