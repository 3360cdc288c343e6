"""Configuration of a Llama-family model whose attention was converted to Multi-head Latent Attention.

This file is copied verbatim into every mla-zoo checkpoint (remote code), so it imports only
`transformers` (and, through it, torch). It extends `LlamaConfig` with the few fields MLA needs:

* `kv_lora_rank`: the TOTAL width of the shared latent c_kv that is cached (DeepSeek's name). The
  MHA2MLA paper's d_kv is per KV head: `kv_lora_rank = d_kv * num_key_value_heads`.
* `kv_lora_ranks`: optional per-layer latent widths (rank allocation: layers whose SVD loses most
  get more), at the same total; None = `kv_lora_rank` in every layer.
* `rope_pairs[layer][kv_head]`: the RoPE frequency pairs each KV head keeps (pair i = dims i and
  i + head_dim/2 in the rotate-half layout of the source model). Storing explicit indices makes
  every partial-RoPE strategy (high, low, uniform, 2-norm) representable with one format.
* DeepSeek's head dims, written to config.json as real fields (derived from `rope_pairs` and
  `head_dim` when not given, checked against them when given): `qk_rope_head_dim = 2 * R`,
  `qk_nope_head_dim = head_dim - 2 * R`, `v_head_dim = head_dim`.

Per token and layer the cache holds `kv_lora_rank + num_key_value_heads * qk_rope_head_dim`
values, against `2 * num_key_value_heads * head_dim` for the source model.
"""

from transformers import LlamaConfig


class LlamaMLAConfig(LlamaConfig):
    r"""
    Args (beyond [`LlamaConfig`]):
        kv_lora_rank (`int`): total width of the cached latent (all KV heads together).
        kv_lora_ranks (`list[int]`, optional): that width per layer, when the layers differ.
        rope_pairs (`list[list[list[int]]]`): per layer, per KV head, the sorted RoPE pair indices
            kept (each in `[0, head_dim // 2)`); every head keeps the same number R of pairs.
        rope_strategy (`str`): how the pairs were chosen (informational: "high", "low", "uniform",
            "2-norm", "full").
        attention_output_bias (`bool`): whether `o_proj` has a bias. `attention_bias` covers the
            q/k/v biases only (Llama sets both; Qwen2 has q/k/v biases and none on `o_proj`).
        mla_attention (`str`): "auto" (absorbed attention for decoding over a cache, explicit
            otherwise), "explicit" or "absorbed". Both paths compute the same function.
        source_model (`str`): what this model was converted from (informational).
    """

    model_type = "llama_mla"
    # Tensor parallelism: query heads and each KV head's RoPE key / up-projection split by columns;
    # the latent (kv_a_proj) is shared by all heads and stays replicated.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_rope_proj": "colwise",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    kv_lora_rank: int = 256
    kv_lora_ranks: list | None = None
    rope_pairs: list | None = None
    rope_strategy: str = "full"
    attention_output_bias: bool | None = None
    mla_attention: str = "auto"
    source_model: str | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.rope_pairs is None:  # default: keep RoPE on every pair (an exact copy of Llama attention)
            pairs = list(range(self.head_dim // 2))
            self.rope_pairs = [[pairs] * self.num_key_value_heads for _ in range(self.num_hidden_layers)]
        # `auto_map` lets AutoConfig / AutoModel* find the classes of this remote code.
        self.auto_map = {
            "AutoConfig": "configuration_llama_mla.LlamaMLAConfig",
            "AutoModel": "modeling_llama_mla.LlamaMLAModel",
            "AutoModelForCausalLM": "modeling_llama_mla.LlamaMLAForCausalLM",
        }
        self.check_mla_fields()
        derived = {
            "qk_rope_head_dim": 2 * self.num_rope_pairs,
            "qk_nope_head_dim": self.head_dim - 2 * self.num_rope_pairs,
            "v_head_dim": self.head_dim,
        }
        for name, value in derived.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
            elif getattr(self, name) != value:
                raise ValueError(f"{name}={getattr(self, name)} does not fit rope_pairs/head_dim (expected {value})")

    def check_mla_fields(self):
        """Checks the MLA fields against the model shape, so a wrong checkpoint fails at load."""
        half = self.head_dim // 2
        if len(self.rope_pairs) != self.num_hidden_layers:
            raise ValueError(f"rope_pairs has {len(self.rope_pairs)} layers, expected {self.num_hidden_layers}")
        counts = set()
        for layer, heads in enumerate(self.rope_pairs):
            if len(heads) != self.num_key_value_heads:
                raise ValueError(
                    f"rope_pairs[{layer}] has {len(heads)} KV heads, expected {self.num_key_value_heads}"
                )
            for pairs in heads:
                counts.add(len(pairs))
                if len(set(pairs)) != len(pairs) or any(not 0 <= p < half for p in pairs):
                    raise ValueError(f"rope_pairs[{layer}] must hold distinct pair indices in [0, {half})")
        if len(counts) != 1 or counts == {0}:
            raise ValueError("every KV head must keep the same number (>= 1) of RoPE pairs")
        max_rank = self.num_key_value_heads * (2 * self.head_dim - 2 * len(self.rope_pairs[0][0]))
        for rank in [self.kv_lora_rank, *(self.kv_lora_ranks or [])]:
            if not 1 <= rank <= max_rank:
                raise ValueError(f"kv_lora_rank must be in [1, {max_rank}] for this shape, got {rank}")
        if self.kv_lora_ranks is not None and len(self.kv_lora_ranks) != self.num_hidden_layers:
            raise ValueError(f"kv_lora_ranks has {len(self.kv_lora_ranks)} layers, expected {self.num_hidden_layers}")
        if self.mla_attention not in ("auto", "explicit", "absorbed"):
            raise ValueError(f"mla_attention must be 'auto', 'explicit' or 'absorbed', got {self.mla_attention!r}")

    @property
    def num_rope_pairs(self) -> int:
        """R: the RoPE frequency pairs each KV head keeps."""
        return len(self.rope_pairs[0][0])

    def layer_kv_lora_rank(self, layer: int) -> int:
        """The latent width of one layer."""
        return self.kv_lora_ranks[layer] if self.kv_lora_ranks is not None else self.kv_lora_rank

    def kv_cache_values_per_token(self) -> int:
        """Values cached per token over all layers: the latent plus each KV head's RoPE key dims."""
        rope = self.num_key_value_heads * self.qk_rope_head_dim
        return sum(self.layer_kv_lora_rank(i) + rope for i in range(self.num_hidden_layers))


__all__ = ["LlamaMLAConfig"]
