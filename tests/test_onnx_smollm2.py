"""SmolLM2-135M-MLA (the bundled model, converted at the paper's mildest setting: d_kv=32, r=4 with
2-norm RoPE pairs, so every KV head keeps its own pairs, and whitened SVD) exported to ONNX:
onnxruntime with our kernel, onnxruntime with the function body and PyTorch agree on logits over a
prefill and 16 decode steps, and on 32 greedy tokens, at batch 2 with left padding."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from mla_zoo.export import exporter, runner  # noqa: E402
from mla_zoo.export.kernels import build  # noqa: E402
from test_onnx_export import three_way_logits  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea and the wind."]


@pytest.fixture(scope="module")
def mla_and_tokenizer(smollm2_mla, smollm2):
    """The session's SmolLM2-135M-MLA (conftest: the paper's mildest setting, whitened SVD) and its tokenizer."""
    mla, _ = smollm2_mla
    pairs = mla.config.rope_pairs
    assert any(len({tuple(h) for h in layer}) > 1 for layer in pairs)  # heads really differ
    return mla, smollm2[1]


@pytest.fixture(scope="module")
def smollm2_decoders(mla_and_tokenizer, tmp_path_factory):
    model, _ = mla_and_tokenizer
    build.build_kernels()
    report = exporter.export_model(model, tmp_path_factory.mktemp("onnx_smollm2") / "onnx")
    assert report.mla_nodes == model.config.num_hidden_layers == 30
    assert report.cache_bytes_per_token == 30 * (96 + 3 * 8) * 4  # -68.75% against 30 * 2 * 3 * 64 * 4
    return {"kernel": runner.OnnxDecoder(report.output_dir, use_kernels=True),
            "body": runner.OnnxDecoder(report.output_dir, use_kernels=False)}


def chat_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for p in PROMPTS]


def torch_greedy_choices(model, ids: np.ndarray, mask: np.ndarray, new: np.ndarray) -> np.ndarray:
    """PyTorch's greedy choice after each prefix of prompt + `new` ([B, n]), from ONE causal forward:
    PyTorch's greedy decoding emits exactly `new` iff these choices equal `new` (by induction over
    the steps), at the cost of one forward instead of n."""
    from test_onnx_export import torch_logits

    n = new.shape[1]
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    logits = torch_logits(model, full_ids, full_mask)  # [B, S + n, V]
    return logits[:, ids.shape[1] - 1 : ids.shape[1] - 1 + n].argmax(-1)


def test_smollm2_logits_agree_over_prefill_and_16_decode_steps(mla_and_tokenizer, smollm2_decoders):
    model, tokenizer = mla_and_tokenizer
    prompts = chat_prompts(tokenizer)
    assert len(prompts[0]) != len(prompts[1])  # left padding really happens
    worst = three_way_logits(model, smollm2_decoders, prompts, decode_steps=16)
    assert max(worst.values()) < 1e-3, worst


def test_smollm2_32_greedy_tokens_identical(mla_and_tokenizer, smollm2_decoders):
    from test_onnx_export import left_padded

    model, tokenizer = mla_and_tokenizer
    ids, mask = left_padded(chat_prompts(tokenizer), pad=tokenizer.pad_token_id or 0)
    tokens = {name: runner.generate(dec, ids, mask, max_new_tokens=32) for name, dec in smollm2_decoders.items()}
    np.testing.assert_array_equal(tokens["kernel"], tokens["body"])
    np.testing.assert_array_equal(torch_greedy_choices(model, ids, mask, tokens["kernel"]), tokens["kernel"])
    assert tokens["kernel"].shape == (2, 32)
    assert len(set(tokens["kernel"][0].tolist())) > 8, tokenizer.decode(tokens["kernel"][0])  # not one token looping
