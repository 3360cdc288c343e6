"""The teacher's packed GQA decode attention (synth-data) against transformers' own SDPA and eager attention."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_source
from mla_zoo.zoo.train.packed_gqa import NAME, use_packed_gqa


def _generate(model, ids, mask):
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=None, cache_implementation="static", output_logits=True,
                          return_dict_in_generate=True)


# transformers' eager attention gives NaN on a left-padded row in float64 (its fully masked pad queries),
# so it is the reference of an unpadded batch; its softmax runs in float32, hence its bound
@pytest.mark.parametrize(("reference", "first", "bound"), [("sdpa", [0, 0, 1, 5, 6, 7], 1e-12),
                                                           ("eager", [1, 2, 3, 5, 6, 7], 1e-6)])
def test_packed_decode_equals_transformers_attention_in_float64(reference, first, bound):
    """Static cache: every decode step's logits (float64) and the greedy tokens."""
    ids = torch.tensor([first, [1, 9, 10, 11, 12, 13]])
    mask = (ids != 0).long()
    ref = tiny_source("llama-gqa").double().eval()
    ref.set_attn_implementation(reference)
    packed = tiny_source("llama-gqa").double().eval()
    assert use_packed_gqa(packed) and packed.config._attn_implementation == NAME
    want, got = _generate(ref, ids, mask), _generate(packed, ids, mask)
    assert torch.equal(want.sequences, got.sequences)
    err = (torch.stack(want.logits) - torch.stack(got.logits)).abs().max() / torch.stack(want.logits).abs().max()
    assert err < bound


def test_the_decode_steps_take_the_packed_path(monkeypatch):
    """One packed SDPA call per layer and decode step: the query rows are a group's heads, K/V not repeated."""
    model = tiny_source("llama-gqa").eval()
    use_packed_gqa(model)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):  # q [B, H_kv, G, D] against k [B, H_kv, L, D] when packed
        packed = q.shape[1] == k.shape[1] == model.config.num_key_value_heads and q.shape[2] > 1
        seen.append(packed and kw["attn_mask"] is not None)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                   cache_implementation="static")
    assert seen.count(True) == 3 * model.config.num_hidden_layers  # 4 new tokens: prefill + 3 decode steps


def test_mha_and_other_attention_stay_as_they_are():
    mha = tiny_source("llama-mha").eval()
    assert not use_packed_gqa(mha) and mha.config._attn_implementation == "sdpa"
    eager = tiny_source("llama-gqa").eval()
    eager.set_attn_implementation("eager")
    assert not use_packed_gqa(eager) and eager.config._attn_implementation == "eager"
