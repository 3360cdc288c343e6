"""The flex decode attention (synth-data's teacher, filled cache slots only) against SDPA and `packed_gqa`.

Eager `flex_attention` on CPU is torch's unfused reference: it applies the mask_mod to every slot and ignores
the block lists; only compiled (inductor's CPU flex template, which needs a C++ compiler and a cache length
that is a multiple of 128) does it skip the KV blocks the BlockMask leaves out, so the block lists are tested
compiled and directly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_source
from mla_zoo.zoo.train.flex_decode import KV_BLOCK, NAME, decode_block_mask, flex_decode_attention, use_flex_decode
from mla_zoo.zoo.train.packed_gqa import NAME as PACKED
from mla_zoo.zoo.train.packed_gqa import packed_gqa_attention, use_packed_gqa

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _allowed(slots: int, first: list[int], last: int) -> torch.Tensor:
    """[B, slots] bool: row b attends to slots first[b]..last (left padding before, empty cache slots after)."""
    s = torch.arange(slots)  # [L]
    return (s[None] >= torch.tensor(first)[:, None]) & (s[None] <= last)  # [B, L]


def test_the_block_mask_lists_only_blocks_with_an_allowed_slot():
    allowed = _allowed(4 * KV_BLOCK, [0, 5, 130, 300], 300)  # blocks 0..2 filled at most, block 3 empty
    bm = decode_block_mask(allowed, 3)
    partial = bm.kv_num_blocks.flatten().tolist()
    full = bm.full_kv_num_blocks.flatten().tolist()
    assert partial == [1, 2, 2, 1] and full == [2, 1, 0, 0]  # row 0: blocks 0, 1 whole, block 2 up to slot 300
    listed = [sorted(bm.kv_indices[b, 0, 0, :p].tolist() + bm.full_kv_indices[b, 0, 0, :f].tolist())
              for b, (p, f) in enumerate(zip(partial, full, strict=True))]
    assert listed == [[0, 1, 2], [0, 1, 2], [1, 2], [2]]
    assert bm.seq_lengths == (3, 4 * KV_BLOCK)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_attention_equals_packed_gqa(compiled):
    """q [B, H, 1, D] against a static cache [B, H_kv, L, D] with left padding and empty tail slots; a group of 3
    query heads (not a power of 2, as SmolLM2's 9 / 3); two decode positions (the second without recompiling)."""
    torch.manual_seed(0)
    b, h, kv_heads, slots, d = 4, 6, 2, 2 * KV_BLOCK, 16
    module = torch.nn.Module()
    module.num_key_value_groups = h // kv_heads
    q = torch.randn(b, h, 1, d)  # [B, H, 1, D]
    k, v = torch.randn(b, kv_heads, slots, d), torch.randn(b, kv_heads, slots, d)  # [B, H_kv, L, D]

    def flex(q, k, v, mask):
        return flex_decode_attention(module.eval(), q, k, v, mask, scaling=0.25)[0]

    run = torch.compile(flex, fullgraph=True) if compiled else flex
    for last in (100, 200):
        mask = _allowed(slots, [0, 3, 60, 100], last)[:, None, None, :]  # [B, 1, 1, L]
        want, _ = packed_gqa_attention(module, q, k, v, mask, scaling=0.25)  # [B, 1, H, D]
        got = run(q, k, v, mask)
        assert got.shape == want.shape == (b, 1, h, d)
        assert (got - want).abs().max() < 1e-5


def _generate(model, ids, mask, compiled: bool):
    from transformers import StaticCache
    from transformers.generation.utils import ALL_CACHE_NAMES

    name = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"  # renamed in transformers 5.2x
    cache = StaticCache(config=model.config, max_cache_len=2 * KV_BLOCK)
    if compiled:  # what generate() does on CUDA with a static cache; on CPU only when asked
        from transformers.generation.configuration_utils import CompileConfig

        config = CompileConfig(mode="default")
        config._compile_all_devices = True
        kwargs = {"compile_config": config}
    else:
        kwargs = {"disable_compile": True}
    return model.generate(ids, attention_mask=mask, **{name: cache}, max_new_tokens=20, do_sample=False,
                          pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True,
                          **kwargs)


@pytest.mark.parametrize("compiled", [False, True])
def test_generate_with_a_static_cache_equals_sdpa(compiled):
    """Left-padded prompts of different lengths, greedy; the decode crosses from the first KV block into the second
    (prompts of 120 slots, 20 new tokens)."""
    lengths = [120, 90, 7, 119]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # [B, W]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, W]
    ref = tiny_source("llama-gqa", vocab_size=128).eval()
    flex = tiny_source("llama-gqa", vocab_size=128).eval()
    assert use_flex_decode(flex) and flex.config._attn_implementation == NAME
    want, got = _generate(ref, ids, mask, False), _generate(flex, ids, mask, compiled)
    assert torch.equal(want.sequences, got.sequences)
    assert (torch.stack(want.logits) - torch.stack(got.logits)).abs().max() < 1e-5


def test_the_switch_takes_sdpa_and_packed_models_only():
    eager = tiny_source("llama-gqa").eval()
    eager.set_attn_implementation("eager")
    assert not use_flex_decode(eager) and eager.config._attn_implementation == "eager"
    packed = tiny_source("llama-gqa").eval()
    assert use_packed_gqa(packed) and packed.config._attn_implementation == PACKED
    assert use_flex_decode(packed) and packed.config._attn_implementation == NAME
    mha = tiny_source("llama-mha").eval()
    assert use_flex_decode(mha) and mha.config._attn_implementation == NAME
