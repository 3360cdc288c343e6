"""The MLA model itself: absorbed vs explicit attention, the compressed cache, and generate()."""

from __future__ import annotations

import pytest
import torch
from conftest import convert_tiny, tiny_source
from mla_zoo.modeling.convert import kv_bytes_per_token
from mla_zoo.modeling.remote.modeling_llama_mla import MLACache, mla_absorbed_attention, mla_explicit_attention


@pytest.fixture(scope="module")
def mla():
    """A lossy conversion (partial RoPE, low rank) of a tiny GQA model with q/k/v biases."""
    model, _ = convert_tiny(tiny_source("qwen2-bias"), rope_pairs=2, kv_rank=12, rope_strategy="uniform")
    return model


def run(model, mode, **kwargs):
    model.config.mla_attention = mode
    try:
        with torch.no_grad():
            return model(**kwargs)
    finally:
        model.config.mla_attention = "auto"


def test_absorbed_function_equals_explicit_function_in_float64():
    g = torch.Generator().manual_seed(0)
    b, s, t, n_kv, grp, nope, rope, r, dv = 2, 3, 7, 2, 3, 5, 4, 6, 8
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    args = (rnd(b, s, n_kv, grp, nope), rnd(b, s, n_kv, grp, rope), rnd(b, t, r), rnd(b, t, n_kv, rope),
            rnd(n_kv, nope, r), rnd(n_kv, dv, r))
    mask = torch.rand(b, 1, s, t, generator=g) > 0.3
    mask[..., 0] = True
    absorbed = mla_absorbed_attention(*args, mask, 0.3)
    explicit = mla_explicit_attention(*args, mask, 0.3)
    # and a third, naive computation: build every head's key and value by hand
    q_nope, q_rope, c, kr, w_uk, w_uv = args
    naive = torch.zeros_like(absorbed)
    for kv in range(n_kv):
        k = torch.cat((kr[:, :, kv], c @ w_uk[kv].T), -1)  # [B, T, rope + nope]
        v = c @ w_uv[kv].T  # [B, T, dv]
        for h in range(grp):
            q = torch.cat((q_rope[:, :, kv, h], q_nope[:, :, kv, h]), -1)  # [B, S, rope + nope]
            scores = (q @ k.transpose(1, 2) * 0.3).masked_fill(~mask[:, 0], float("-inf"))
            naive[:, :, kv, h] = scores.softmax(-1) @ v
    assert (absorbed - naive).abs().max() < 1e-12
    assert (explicit - naive).abs().max() < 1e-12


def test_model_paths_agree_with_padding_and_cache(mla):
    ids = torch.randint(3, 384, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    explicit = run(mla, "explicit", input_ids=ids, attention_mask=mask, use_cache=False).logits
    absorbed = run(mla, "absorbed", input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert (explicit - absorbed)[mask.bool()].abs().max() < 1e-4
    # prefill 7 tokens explicitly, then 3 single steps on the absorbed path over the cache
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes for left padding
    out = run(mla, "explicit", input_ids=ids[:, :7], attention_mask=mask[:, :7], position_ids=positions[:, :7])
    cache, steps = out.past_key_values, []
    for i in range(7, 10):
        step = run(mla, "absorbed", input_ids=ids[:, i : i + 1], attention_mask=mask[:, : i + 1],
                   past_key_values=cache, position_ids=positions[:, i : i + 1])
        steps.append(step.logits)
    with_pos = run(mla, "explicit", input_ids=ids, attention_mask=mask, use_cache=False,
                   position_ids=positions).logits
    assert (torch.cat(steps, 1) - with_pos[:, 7:]).abs().max() < 1e-4


def test_cache_holds_only_latent_and_rope_keys(mla):
    cfg = mla.config
    b, t = 3, 11
    out = run(mla, "auto", input_ids=torch.randint(3, 384, (b, t)), use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, MLACache)
    layer = cache.layers[0]
    assert tuple(layer.keys.shape) == (b, 1, t, cfg.kv_lora_rank)
    assert tuple(layer.values.shape) == (b, cfg.num_key_value_heads, t, cfg.qk_rope_head_dim)
    # the bytes it holds are exactly the formula the conversion report prints
    assert cache.nbytes() == b * t * kv_bytes_per_token(cfg, 4)["after"]
    assert kv_bytes_per_token(cfg, 4)["after"] == cfg.num_hidden_layers * 4 * (12 + 2 * 4)


def generate(model, ids, mask=None, **kwargs):
    torch.manual_seed(0)
    return model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=8, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("mode", [
    {"do_sample": False},
    {"do_sample": True, "top_k": 20},
    {"do_sample": False, "num_beams": 3},
])
def test_cached_generation_equals_uncached(mla, mode):
    ids = torch.randint(3, 384, (2, 6))
    assert torch.equal(generate(mla, ids, **mode), generate(mla, ids, use_cache=False, **mode))


def test_left_padded_batch_generates_like_each_prompt_alone(mla):
    a, b = torch.randint(3, 384, (1, 8)), torch.randint(3, 384, (1, 5))
    batch = torch.cat((a, torch.cat((torch.zeros(1, 3, dtype=torch.long), b), 1)))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = generate(mla, batch, mask)
    assert torch.equal(together[0, 8:], generate(mla, a)[0, 8:])
    assert torch.equal(together[1, 8:], generate(mla, b)[0, 5:])


def test_config_rejects_inconsistent_mla_fields():
    from mla_zoo.modeling.remote.configuration_llama_mla import LlamaMLAConfig

    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        LlamaMLAConfig(**base, kv_lora_rank=1000)
    with pytest.raises(ValueError, match="same number"):
        LlamaMLAConfig(**base, kv_lora_rank=8, rope_pairs=[[[0], [0, 1]], [[0], [1]]])
    with pytest.raises(ValueError, match="distinct pair indices"):
        LlamaMLAConfig(**base, kv_lora_rank=8, rope_pairs=[[[0], [8]], [[0], [1]]])
