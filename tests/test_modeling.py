"""The MLA model itself (the remote code): its attention paths against references, the latent cache,
and generate() in every mode a user calls, each equal to a reference.

These tests run twice in CI: with the newest transformers, and in a venv pinned to the lowest
supported release (`.ci/run`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cache_of, convert_tiny, tiny_source
from mla_zoo.modeling.convert import kv_bytes_per_token
from mla_zoo.modeling.remote.configuration_llama_mla import LlamaMLAConfig
from mla_zoo.modeling.remote.modeling_llama_mla import cache_nbytes, mla_absorbed_attention
from transformers import DynamicCache, StaticCache


@pytest.fixture(scope="module")
def mla():
    """A lossy conversion (partial RoPE, low rank) of a tiny GQA model with q/k/v biases."""
    model, _ = convert_tiny(tiny_source("qwen2-bias"), rope_pairs=2, kv_lora_rank=12, rope_strategy="uniform")
    return model


def run(model, mode, **kwargs):
    model.config.mla_attention = mode
    try:
        with torch.no_grad():
            return model(**kwargs)
    finally:
        model.config.mla_attention = "auto"


def generate(model, ids, mask=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    mask = mask if mask is not None else torch.ones_like(ids)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, **kwargs)


def left_padded_batch():
    a, b = torch.randint(3, 384, (1, 8)), torch.randint(3, 384, (1, 5))
    batch = torch.cat((a, torch.cat((torch.zeros(1, 3, dtype=torch.long), b), 1)))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    return a, b, batch, mask


# ----------------------------------------------------------------------------------------------
# The attention math
# ----------------------------------------------------------------------------------------------


def test_absorbed_core_equals_a_naive_per_head_computation_in_float64():
    g = torch.Generator().manual_seed(0)
    b, s, t, n_kv, grp, nope, rope, r, dv = 2, 3, 7, 2, 3, 5, 4, 6, 8
    h = n_kv * grp
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q_nope, q_rope, c, k_rope = rnd(b, h, s, nope), rnd(b, h, s, rope), rnd(b, t, r), rnd(b, t, n_kv * rope)
    w_uk, w_uv = rnd(n_kv, nope, r), rnd(n_kv, dv, r)
    mask = torch.rand(b, 1, s, t, generator=g) > 0.3
    mask[..., 0] = True
    q_lat = torch.stack([q_nope[:, i] @ w_uk[i // grp] for i in range(h)], 1)  # [B, H, S, r]
    o_lat, probs = mla_absorbed_attention(q_lat, q_rope, c, k_rope, mask, 0.3)
    absorbed = torch.stack([o_lat[:, i] @ w_uv[i // grp].T for i in range(h)], 1)  # [B, H, S, dv]

    naive = torch.zeros(b, h, s, dv, dtype=torch.float64)  # every head's key and value built by hand
    for i in range(h):
        kv = i // grp
        k = torch.cat((k_rope[:, :, kv * rope : (kv + 1) * rope], c @ w_uk[kv].T), -1)  # [B, T, rope + nope]
        q = torch.cat((q_rope[:, i], q_nope[:, i]), -1)  # [B, S, rope + nope]
        scores = (q @ k.transpose(1, 2) * 0.3).masked_fill(~mask[:, 0], float("-inf"))
        naive[:, i] = scores.softmax(-1) @ (c @ w_uv[kv].T)
    assert (absorbed - naive).abs().max() < 1e-12
    assert torch.allclose(probs.sum(-1), torch.ones(b, h, s, dtype=torch.float64))


def test_owned_building_blocks_equal_transformers_llama_ones():
    """The remote code owns RMSNorm, MLP and the rotary embedding: they must equal Llama's."""
    from mla_zoo.modeling.remote import modeling_llama_mla as m
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ref

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    for rope in ({"rope_type": "default", "rope_theta": 10000.0}, llama3):
        cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, rope_parameters=rope)
        pos = torch.arange(300)[None]
        x = torch.randn(1, 300, 64, dtype=torch.float64)
        ours, theirs = m.LlamaMLARotaryEmbedding(cfg).double(), ref.LlamaRotaryEmbedding(cfg).double()
        for a, b in zip(ours(x, pos), theirs(x, pos), strict=True):
            assert (a - b).abs().max() < 1e-12
    norm, mlp = m.LlamaMLARMSNorm(64, 1e-5).double(), m.LlamaMLAMLP(cfg).double()
    ref_norm, ref_mlp = ref.LlamaRMSNorm(64, 1e-5).double(), ref.LlamaMLP(cfg).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref_norm.load_state_dict(norm.state_dict())
    ref_mlp.load_state_dict(mlp.state_dict())
    assert (norm(x) - ref_norm(x)).abs().max() < 1e-12
    assert (mlp(x) - ref_mlp(x)).abs().max() < 1e-12


def test_explicit_absorbed_and_eager_paths_agree_with_padding_and_cache(mla):
    ids = torch.randint(3, 384, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    explicit = run(mla, "explicit", input_ids=ids, attention_mask=mask, use_cache=False).logits
    absorbed = run(mla, "absorbed", input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert (explicit - absorbed)[mask.bool()].abs().max() < 1e-4
    mla.config._attn_implementation = "eager"
    try:
        eager = run(mla, "explicit", input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        mla.config._attn_implementation = "sdpa"
    assert (explicit - eager)[mask.bool()].abs().max() < 1e-4
    # prefill 7 tokens explicitly, then 3 single steps on the absorbed path over the cache
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes for left padding
    out = run(mla, "explicit", input_ids=ids[:, :7], attention_mask=mask[:, :7], position_ids=positions[:, :7])
    cache, steps = cache_of(out), []
    for i in range(7, 10):
        step = run(mla, "absorbed", input_ids=ids[:, i : i + 1], attention_mask=mask[:, : i + 1],
                   cache=cache, position_ids=positions[:, i : i + 1])
        steps.append(step.logits)
    with_pos = run(mla, "explicit", input_ids=ids, attention_mask=mask, use_cache=False,
                   position_ids=positions).logits
    assert (torch.cat(steps, 1) - with_pos[:, 7:]).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_cache_holds_only_latent_and_rope_keys(mla, kind):
    cfg = mla.config
    b, t = 3, 11
    cache = DynamicCache(config=cfg) if kind == "dynamic" else StaticCache(config=cfg, max_cache_len=t)
    run(mla, "auto", input_ids=torch.randint(3, 384, (b, t)), cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert tuple(layer.keys.shape) == (b, 1, t, cfg.kv_lora_rank)
    assert tuple(layer.values.shape) == (b, 1, t, cfg.num_key_value_heads * cfg.qk_rope_head_dim)
    assert int(cache.get_seq_length()) == t
    # the bytes it holds are exactly the formula the conversion report prints
    assert cache_nbytes(cache) == b * t * kv_bytes_per_token(cfg, 4)["after"]
    assert kv_bytes_per_token(cfg, 4)["after"] == cfg.num_hidden_layers * 4 * (12 + 2 * 4)


def test_the_cache_argument_has_both_names(mla):
    """transformers >= 5.24 passes `cache=`, older releases `past_key_values=`."""
    ids = torch.randint(3, 384, (1, 6))
    from mla_zoo.modeling.remote.modeling_llama_mla import CACHE_FIELD

    new = run(mla, "auto", input_ids=ids[:, :5], cache=DynamicCache(config=mla.config))
    if CACHE_FIELD == "cache":  # transformers >= 5.24 renamed it: the old name warns, as built-in models do
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            old = run(mla, "auto", input_ids=ids[:, :5], past_key_values=DynamicCache(config=mla.config))
    else:
        old = run(mla, "auto", input_ids=ids[:, :5], past_key_values=DynamicCache(config=mla.config))
    a = run(mla, "auto", input_ids=ids[:, 5:], cache=cache_of(new)).logits
    b = run(mla, "auto", input_ids=ids[:, 5:], past_key_values=cache_of(old)).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        run(mla, "auto", input_ids=ids, cache=DynamicCache(), past_key_values=DynamicCache())


def test_crop_continues_like_a_fresh_cache(mla):
    ids = torch.randint(3, 384, (2, 12))
    full = cache_of(run(mla, "auto", input_ids=ids[:, :10]))
    full.crop(-2)  # drop the last two tokens, as assisted decoding does
    assert full.get_seq_length() == 8
    after_crop = run(mla, "auto", input_ids=ids[:, 8:], cache=full).logits
    fresh = cache_of(run(mla, "auto", input_ids=ids[:, :8]))
    reference = run(mla, "auto", input_ids=ids[:, 8:], cache=fresh).logits
    assert (after_crop - reference).abs().max() < 1e-5  # prefills of 10 vs 8 tokens round differently


# ----------------------------------------------------------------------------------------------
# generate(), every mode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [
    {"do_sample": False},
    {"do_sample": True, "top_k": 20},
    {"do_sample": False, "num_beams": 3},  # reorders the cache every step
])
def test_cached_generation_equals_uncached(mla, mode):
    ids = torch.randint(3, 384, (2, 6))
    assert torch.equal(generate(mla, ids, **mode), generate(mla, ids, use_cache=False, **mode))


@pytest.mark.parametrize("drafts", ["assistant", "prompt-lookup"])
def test_speculative_decoding_crops_the_cache_and_equals_greedy(mla, drafts):
    """Rejected draft tokens are cropped from the cache: the result must be plain greedy's."""
    ids = torch.randint(3, 384, (1, 6)).repeat(1, 3)  # repeats give prompt lookup drafts to try
    if drafts == "assistant":
        assistant, _ = convert_tiny(tiny_source("qwen2-bias", seed=1), rope_pairs=2, kv_lora_rank=12)
        kwargs = {"assistant_model": assistant}
    else:
        kwargs = {"prompt_lookup_num_tokens": 3}
    assert torch.equal(generate(mla, ids, do_sample=False, **kwargs), generate(mla, ids, do_sample=False))


def test_seeded_sampling_is_reproducible(mla):
    ids = torch.randint(3, 384, (2, 6))
    one, two = (generate(mla, ids, seed=7, do_sample=True, top_k=50) for _ in range(2))
    assert torch.equal(one, two)
    assert not torch.equal(one, generate(mla, ids, seed=8, do_sample=True, top_k=50))


def test_left_padded_batch_generates_like_each_prompt_alone(mla):
    a, b, batch, mask = left_padded_batch()
    together = generate(mla, batch, mask)
    assert torch.equal(together[0, 8:], generate(mla, a)[0, 8:])
    assert torch.equal(together[1, 8:], generate(mla, b)[0, 5:])


def test_static_cache_generates_what_the_dynamic_cache_does(mla):
    _, _, batch, mask = left_padded_batch()
    for kwargs in ({"do_sample": False}, {"do_sample": False, "num_beams": 2}):
        static = generate(mla, batch, mask, cache_implementation="static", **kwargs)
        assert torch.equal(static, generate(mla, batch, mask, **kwargs)), kwargs


def test_compiled_decode_step_has_no_graph_break_and_generates_the_same(mla):
    from transformers.generation.configuration_utils import CompileConfig

    ids = torch.randint(3, 384, (2, 6))
    cache = StaticCache(config=mla.config, max_cache_len=16)
    with torch.no_grad():
        mla(ids, cache=cache)
        step = dict(attention_mask=torch.ones(2, 7, dtype=torch.long), cache=cache, position_ids=torch.full((2, 1), 6))
        explained = torch._dynamo.explain(mla.forward)(torch.randint(3, 384, (2, 1)), **step)
    assert explained.graph_break_count == 0, explained.break_reasons
    # generate() compiles the decode step itself (fullgraph) once the cache is static
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # CPU: generate() compiles only on accelerators by default
    compiled = generate(mla, ids, do_sample=False, cache_implementation="static", compile_config=config)
    assert hasattr(mla, "_compiled_call")
    assert torch.equal(compiled, generate(mla, ids, do_sample=False))


# ----------------------------------------------------------------------------------------------
# What a transformers model returns, and what it refuses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["explicit", "absorbed"])
def test_attentions_hidden_states_and_tuples(mla, mode):
    ids = torch.randint(3, 384, (2, 6))
    out = run(mla, mode, input_ids=ids, output_attentions=True, output_hidden_states=True)
    cfg = mla.config
    assert len(out.attentions) == cfg.num_hidden_layers and len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert out.attentions[0].shape == (2, cfg.num_attention_heads, 6, 6)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(2, cfg.num_attention_heads, 6))
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
    plain = run(mla, mode, input_ids=ids)
    assert torch.allclose(out.logits, plain.logits, atol=1e-5)
    as_tuple = run(mla, mode, input_ids=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)


def test_explicit_and_absorbed_attentions_are_the_same_probabilities(mla):
    ids = torch.randint(3, 384, (2, 6))
    a = run(mla, "explicit", input_ids=ids, output_attentions=True).attentions
    b = run(mla, "absorbed", input_ids=ids, output_attentions=True).attentions
    assert all((x - y).abs().max() < 1e-5 for x, y in zip(a, b, strict=True))


def test_unsupported_attention_implementations_fail_clearly(tmp_path, mla):
    mla.save_pretrained(tmp_path)
    with pytest.raises((ValueError, ImportError), match="(?i)flash"):
        type(mla).from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    mla.config._attn_implementation = "paged|sdpa"
    try:
        with pytest.raises(ValueError, match="supports attn_implementation"):
            run(mla, "auto", input_ids=torch.randint(3, 384, (1, 4)))
    finally:
        mla.config._attn_implementation = "sdpa"


def test_config_writes_deepseek_dims_and_rejects_inconsistent_fields(tmp_path):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    cfg = LlamaMLAConfig(**base, kv_lora_rank=8, rope_pairs=[[[0, 3], [1, 2]]] * 2)
    cfg.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["kv_lora_rank"], saved["qk_rope_head_dim"], saved["qk_nope_head_dim"], saved["v_head_dim"]) == (
        8, 4, 12, 16)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        LlamaMLAConfig(**base, kv_lora_rank=1000)
    with pytest.raises(ValueError, match="same number"):
        LlamaMLAConfig(**base, kv_lora_rank=8, rope_pairs=[[[0], [0, 1]], [[0], [1]]])
    with pytest.raises(ValueError, match="distinct pair indices"):
        LlamaMLAConfig(**base, kv_lora_rank=8, rope_pairs=[[[0], [8]], [[0], [1]]])
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        LlamaMLAConfig(**base, kv_lora_rank=8, rope_pairs=[[[0], [1]]] * 2, qk_rope_head_dim=4)


def test_per_layer_latent_ranks():
    """Rank allocation gives each layer its own latent width: the cache and generate() follow it."""
    model, _ = convert_tiny(tiny_source("llama-gqa"), rope_pairs=2, kv_lora_rank=12)
    cfg = LlamaMLAConfig(**{**model.config.to_dict(), "kv_lora_ranks": [8, 16]})
    mla = type(model)(cfg).eval()  # random weights: the shapes are what is tested
    ids = torch.randint(3, 384, (2, 6))
    out = run(mla, "auto", input_ids=ids)
    assert [layer.keys.shape[-1] for layer in cache_of(out).layers] == [8, 16]
    assert cache_nbytes(cache_of(out)) == 2 * 6 * 4 * cfg.kv_cache_values_per_token()
    assert cfg.kv_cache_values_per_token() == (8 + 2 * 4) + (16 + 2 * 4)
    assert torch.equal(generate(mla, ids), generate(mla, ids, use_cache=False))
    assert torch.equal(generate(mla, ids, cache_implementation="static"), generate(mla, ids))
    with pytest.raises(ValueError, match="kv_lora_ranks has 1 layers"):
        LlamaMLAConfig(**{**model.config.to_dict(), "kv_lora_ranks": [8]})
