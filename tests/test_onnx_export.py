"""ONNX export of a tiny random MLA model: one fused node per layer, and three runs that agree
(onnxruntime with our kernel, onnxruntime with the op's function body, PyTorch), at batch 2 with
left padding, over a prefill and 16 decode steps, and over 32 greedy tokens; the same for a model
converted with per-layer latent widths (`--rank-allocation energy`); clear errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import cache_of, perturbed, tiny_source

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mla_zoo.export import exporter, op, runner  # noqa: E402
from mla_zoo.export.kernels import build  # noqa: E402
from mla_zoo.modeling.common import MlaZooError  # noqa: E402

# per layer, per KV head: deliberately different, unsorted-looking but valid pair sets
ROPE_PAIRS = [[[0, 5], [2, 7]], [[1, 3], [4, 6]]]
PROMPTS = [[5, 17, 99, 23], [7, 8, 250, 31, 64, 12, 3]]  # batch 2, left padded to 7


def tiny_mla(seed: int = 0):
    """A random LlamaMLA model built from its config (no conversion): GQA, q/k/v biases, llama3 RoPE."""
    from mla_zoo.modeling.remote.configuration_llama_mla import LlamaMLAConfig
    from mla_zoo.modeling.remote.modeling_llama_mla import LlamaMLAForCausalLM

    config = LlamaMLAConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, kv_lora_rank=20, rope_pairs=ROPE_PAIRS, attention_bias=True,
        attention_output_bias=False, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, initializer_range=0.15,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    torch.manual_seed(seed)
    return perturbed(LlamaMLAForCausalLM(config).eval())


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.array([[pad] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    return ids, mask


@pytest.fixture(scope="session")
def kernel_library() -> str:
    """The kernel library, built once (cached under the mla-zoo cache for these sources)."""
    return build.build_kernels().library


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_mla()


@pytest.fixture(scope="module")
def tiny_exports(tiny_model, tmp_path_factory, kernel_library):
    """{"fused": dir with the node + body, "portable": dir with the body inlined}."""
    root = tmp_path_factory.mktemp("onnx_tiny")
    return {kind: exporter.export_model(tiny_model, root / kind, portable=kind == "portable")
            for kind in ("fused", "portable")}


def three_decoders(exports: dict) -> dict[str, runner.OnnxDecoder]:
    """The three onnxruntime runs: kernel, function body (same file, no library), inlined body."""
    fused = exports["fused"].output_dir
    out = {"kernel": runner.OnnxDecoder(fused, use_kernels=True),
           "body": runner.OnnxDecoder(fused, use_kernels=False),
           "portable": runner.OnnxDecoder(exports["portable"].output_dir)}
    assert [d.uses_kernels for d in out.values()] == [True, False, False]
    return out


@pytest.fixture(scope="module")
def decoders(tiny_exports):
    return three_decoders(tiny_exports)


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Full-sequence PyTorch logits (no cache): the reference for every cached step."""
    pos = runner.position_ids_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), use_cache=False)
    return out.logits.float().numpy()


def three_way_logits(model, decoders: dict, prompts, decode_steps: int, seed: int = 0) -> dict[str, float]:
    """Max |logits - torch| of each onnxruntime run over the real positions of a prefill and
    `decode_steps` teacher-forced decode steps (tokens fixed in advance, the same for every run)."""
    ids, mask = left_padded(prompts)
    rng = np.random.default_rng(seed)
    steps = rng.integers(3, model.config.vocab_size, size=(decode_steps, ids.shape[0]))
    full_ids = np.concatenate([ids, steps.T], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(steps.T)], axis=1)
    ref = torch_logits(model, full_ids, full_mask)  # [B, S + steps, V]
    real = full_mask.astype(bool)
    worst = {}
    for name, dec in decoders.items():
        past = dec.empty_past(ids.shape[0])
        logits, past = dec.step(ids, mask, runner.position_ids_from_mask(mask, ids.shape[1]), past)
        got = [logits]
        for t in range(decode_steps):
            m = full_mask[:, : ids.shape[1] + t + 1]
            logits, past = dec.step(steps[t][:, None], m, runner.position_ids_from_mask(m, 1), past)
            got.append(logits)
        got = np.concatenate(got, axis=1)
        assert got.shape == ref.shape
        assert [p.shape for p in past] == [(ids.shape[0], 1, full_ids.shape[1], w) for w in dec.cache.widths()]
        worst[name] = float(np.abs(got - ref)[real].max())
    return worst


def torch_greedy(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """PyTorch generate(): exactly `new_tokens` greedy tokens [B, new_tokens] (no eos stop)."""
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def past_dims(model) -> dict[str, list]:
    """{input or output name: its dims} of an onnx.ModelProto (symbolic dims by name)."""
    values = list(model.graph.input) + list(model.graph.output)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


# ----------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------


def test_graph_has_one_fused_node_per_layer_and_passes_the_checker(tiny_exports, tiny_model):
    report = tiny_exports["fused"]
    model = onnx.load(report.model_path)
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.op_type == op.OP_NAME]
    assert len(nodes) == tiny_model.config.num_hidden_layers == report.mla_nodes
    assert all(n.domain == op.DOMAIN for n in nodes)
    assert {(f.domain, f.name) for f in model.functions} >= {(op.DOMAIN, op.OP_NAME)}
    assert {o.domain: o.version for o in model.opset_import}[op.DOMAIN] == op.OP_VERSION
    assert [i.name for i in model.graph.input] == exporter.input_names(2)
    assert [o.name for o in model.graph.output] == exporter.output_names(2)
    # the cache holds only the latent and the RoPE key dims
    assert (report.latent_dims, report.key_rope_dim) == ([20, 20], 2 * 2 * 2)
    past = past_dims(model)
    assert past["past_key_values.1.latent"] == ["batch_size", 1, "past_sequence_length", 20]
    assert past["past_key_values.1.key_rope"] == ["batch_size", 1, "past_sequence_length", 8]
    # the weights the node reads are initializers
    inits = {i.name for i in model.graph.initializer}
    assert all(n.input[8] in inits and n.input[9] in inits for n in nodes)
    with open(f"{report.output_dir}/genai_config.json") as f:
        genai = json.load(f)
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.latent"
    assert genai["model"]["decoder"]["head_size"] == 20  # one latent width for all layers
    assert genai["search"]["past_present_share_buffer"] is False  # a growing cache (version 1)


def test_portable_export_has_only_standard_ops(tiny_exports):
    model = onnx.load(tiny_exports["portable"].model_path)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert not model.functions
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)


def test_onnxruntime_fuses_every_norm_into_one_node(tiny_exports, tiny_model, tmp_path, kernel_library):
    """The exported RMSNorms are written in the pattern onnxruntime's SimplifiedLayerNormFusion matches: the
    session's optimized graph has one SimplifiedLayerNormalization per norm (two a layer and the final one) and
    none of the pieces left (the modeling file's rsqrt form kept 7 nodes a norm: a third of a layer's nodes)."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernel_library)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(tiny_exports["fused"].model_path, so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 2 * tiny_model.config.num_hidden_layers + 1, ops
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div"} & set(ops), ops


# ----------------------------------------------------------------------------------------------
# Three runs agree
# ----------------------------------------------------------------------------------------------


def test_export_wrapper_in_eager_torch_equals_the_model(tiny_model):
    """What is exported (weights rewired around the op's torch reference) computes the HF model."""
    from mla_zoo.export.wrapper import DecoderWithPast

    wrapper = DecoderWithPast(tiny_model).eval()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        pos = torch.from_numpy(runner.position_ids_from_mask(mask, ids.shape[1]))
        logits, past = wrapper(torch.from_numpy(ids), torch.from_numpy(mask), pos, wrapper.empty_past(2))
        step_mask = torch.from_numpy(np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1))
        step, _ = wrapper(torch.tensor([[9], [10]]), step_mask,
                          torch.from_numpy(runner.position_ids_from_mask(step_mask.numpy(), 1)), past)
    ref = torch_logits(tiny_model, np.concatenate([ids, [[9], [10]]], axis=1), step_mask.numpy())
    real = step_mask.numpy().astype(bool)
    got = torch.cat([logits, step], dim=1).numpy()
    assert np.abs(got - ref)[real].max() < 1e-4


def test_logits_agree_over_prefill_and_16_decode_steps_batch2_left_padded(tiny_model, decoders):
    worst = three_way_logits(tiny_model, decoders, PROMPTS, decode_steps=16)
    assert max(worst.values()) < 1e-3, worst


def test_32_greedy_tokens_identical_to_pytorch_generate(tiny_model, decoders):
    ids, mask = left_padded(PROMPTS)
    ref = torch_greedy(tiny_model, ids, mask, 32)
    assert ref.shape == (2, 32)
    assert len(set(ref.ravel().tolist())) > 4  # a real sequence, not one repeated token
    for name, dec in decoders.items():
        got = runner.generate(dec, ids, mask, max_new_tokens=32)
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_sampling_is_seeded_and_respects_top_k(decoders):
    ids, mask = left_padded(PROMPTS)
    dec = decoders["kernel"]
    a = runner.generate(dec, ids, mask, 12, do_sample=True, temperature=1.5, seed=3)
    b = runner.generate(dec, ids, mask, 12, do_sample=True, temperature=1.5, seed=3)
    np.testing.assert_array_equal(a, b)
    greedy = runner.generate(dec, ids, mask, 12)
    np.testing.assert_array_equal(runner.generate(dec, ids, mask, 12, do_sample=True, top_k=1, seed=5), greedy)


# ----------------------------------------------------------------------------------------------
# One buffer for past and present (`export --shared-cache`, op version 2)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_exports(tiny_model, tmp_path_factory, kernel_library):
    root = tmp_path_factory.mktemp("onnx_shared")
    return {kind: exporter.export_model(tiny_model, root / kind, portable=kind == "portable", shared_cache=True)
            for kind in ("fused", "portable")}


@pytest.fixture(scope="module")
def shared_decoders(shared_exports):
    out = three_decoders(shared_exports)
    assert all(d.shared_cache for d in out.values())
    return out


def test_shared_cache_graph_takes_buffers_and_past_length(shared_exports):
    report = shared_exports["fused"]
    model = onnx.load(report.model_path)
    onnx.checker.check_model(model, full_check=True)
    assert report.shared_cache and report.mla_nodes == 2
    nodes = [n for n in model.graph.node if n.op_type == op.OP_NAME]
    assert [n.overload for n in nodes] == [op.SHARED_CACHE_OVERLOAD] * 2 and all(len(n.input) == 11 for n in nodes)
    assert {o.domain: o.version for o in model.opset_import}[op.DOMAIN] == op.SHARED_CACHE_VERSION == 2
    assert [i.name for i in model.graph.input] == exporter.input_names(2) + ["past_length"]
    dims = past_dims(model)
    assert dims["past_key_values.1.latent"] == dims["present.1.latent"] == ["batch_size", 1, "cache_capacity", 20]
    assert dims["attention_mask"] == ["batch_size", "cache_capacity"] and dims["past_length"] == [1]
    with open(f"{report.output_dir}/genai_config.json") as f:
        genai = json.load(f)
    assert genai["search"]["past_present_share_buffer"] is True  # one buffer of the context's capacity
    assert genai["model"]["decoder"]["inputs"]["past_sequence_length"] == "past_length"


def test_shared_cache_logits_agree_over_prefill_and_16_decode_steps_batch2_left_padded(tiny_model, shared_decoders):
    """The kernel (one buffer, written in place), the function body and the inlined body, against PyTorch without
    a cache, in buffers with 3 spare rows (noise-free zeros) beyond the last step."""
    ids, mask = left_padded(PROMPTS)
    rng = np.random.default_rng(0)
    steps = rng.integers(3, tiny_model.config.vocab_size, size=(16, 2))
    full_ids = np.concatenate([ids, steps.T], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(steps.T)], axis=1)
    ref = torch_logits(tiny_model, full_ids, full_mask)  # [B, S + 16, V]
    capacity = full_ids.shape[1] + 3
    for name, dec in shared_decoders.items():
        buffers = dec.cache_buffers(2, capacity)
        got = []
        for t in range(17):
            seq = ids.shape[1] if t == 0 else 1
            end = ids.shape[1] + t  # columns of the mask so far, this step's included
            m = np.zeros((2, capacity), dtype=np.int64)
            m[:, :end] = full_mask[:, :end]
            step_ids = ids if t == 0 else steps[t - 1][:, None]
            got.append(dec.step_in_place(step_ids, m, runner.position_ids_from_mask(full_mask[:, :end], seq),
                                         end - seq, buffers))
        got = np.concatenate(got, axis=1)
        assert float(np.abs(got - ref)[full_mask.astype(bool)].max()) < 1e-3, name
        assert not buffers[0].numpy()[:, :, full_ids.shape[1]:].any()  # the spare rows never written


def test_shared_cache_32_greedy_tokens_identical_to_pytorch_generate(tiny_model, shared_decoders):
    ids, mask = left_padded(PROMPTS)
    ref = torch_greedy(tiny_model, ids, mask, 32)
    for name, dec in shared_decoders.items():
        np.testing.assert_array_equal(runner.generate(dec, ids, mask, max_new_tokens=32), ref, err_msg=name)


def test_each_cache_form_refuses_the_other_forms_step(decoders, shared_decoders):
    ids, mask = left_padded(PROMPTS)
    pos = runner.position_ids_from_mask(mask, ids.shape[1])
    shared = shared_decoders["kernel"]
    with pytest.raises(MlaZooError, match="shares past and present"):
        shared.step(ids, mask, pos, shared.empty_past(2))
    with pytest.raises(MlaZooError, match="has a growing cache"):
        decoders["kernel"].step_in_place(ids, mask, pos, 0, shared.cache_buffers(2, ids.shape[1]))
    buffers = shared.cache_buffers(2, ids.shape[1])  # no room for one more token
    with pytest.raises(runner.CacheShapeError, match=r"past_length 7 \+ 1 new tokens at most the buffers' 7 rows"):
        shared.step_in_place(ids[:, :1], mask, pos[:, :1], ids.shape[1], buffers)


# ----------------------------------------------------------------------------------------------
# Per-layer latent widths (`mla-zoo convert --rank-allocation energy`)
# ----------------------------------------------------------------------------------------------

RANKS = [8, 24]  # what energy allocation gives the source of `ranked_checkpoint` at --kv-rank 16


@pytest.fixture(scope="module")
def ranked_checkpoint(tmp_path_factory, tokenizer):
    """A checkpoint dir (remote code, tokenizer) converted by `mla-zoo convert --rank-allocation energy` from
    a tiny GQA source whose layer 0 has rank-4 keys and values: kv_lora_ranks [8, 24], the total of 2 x 16."""
    from mla_zoo.zoo.cli import main

    source = tiny_source("llama-gqa")
    with torch.no_grad():
        for proj in (source.model.layers[0].self_attn.k_proj, source.model.layers[0].self_attn.v_proj):
            proj.weight.copy_(proj.weight[:, :4] @ proj.weight[:4] / 4)
    root = tmp_path_factory.mktemp("ranked")
    source.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    assert main(["convert", str(root / "source"), "-o", str(root / "mla"), "--rank-allocation", "energy",
                 "--rope-strategy", "high", "--rope-pairs", "2", "--kv-rank", "16", "--svd", "joint",
                 "--dtype", "float32"]) == 0
    assert json.loads((root / "mla" / "config.json").read_text())["kv_lora_ranks"] == RANKS
    return root / "mla"


@pytest.fixture(scope="module")
def ranked_model(ranked_checkpoint):
    """The checkpoint as the export loads it (remote code, float32)."""
    return exporter.load_checkpoint(str(ranked_checkpoint), "fp32")


@pytest.fixture(scope="module")
def ranked_exports(ranked_checkpoint, tmp_path_factory, kernel_library):
    """`mla-zoo export` of the checkpoint: {"fused": ExportReport, "portable": ExportReport}."""
    root = tmp_path_factory.mktemp("onnx_ranked")
    return {kind: exporter.run_export(exporter.ExportSettings(checkpoint=str(ranked_checkpoint),
                                                              output_dir=str(root / kind), portable=kind == "portable"))
            for kind in ("fused", "portable")}


@pytest.fixture(scope="module")
def ranked_decoders(ranked_exports):
    return three_decoders(ranked_exports)


def test_per_layer_widths_export_each_layer_at_its_own_width(ranked_exports, ranked_decoders):
    report = ranked_exports["fused"]
    assert (report.latent_dims, report.key_rope_dim, report.mla_nodes) == (RANKS, 2 * 2 * 2, 2)
    model = onnx.load(report.model_path)
    onnx.checker.check_model(model, full_check=True)
    dims = past_dims(model)
    for i, r in enumerate(RANKS):
        assert dims[f"past_key_values.{i}.latent"] == ["batch_size", 1, "past_sequence_length", r]
        assert dims[f"present.{i}.latent"] == ["batch_size", 1, "total_sequence_length", r]
        assert dims[f"past_key_values.{i}.key_rope"] == ["batch_size", 1, "past_sequence_length", 8]
    # the node takes its width from its inputs: W_uk per layer, no attribute carries it
    nodes = [n for n in model.graph.node if n.op_type == op.OP_NAME]
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    assert [inits[n.input[8]] for n in nodes] == [[2, 16 - 4, r] for r in RANKS]  # [n_kv, d_nope, r]
    assert all({a.name for a in n.attribute} == {"num_heads", "num_kv_heads", "rope_pairs", "scale"} for n in nodes)
    for dec in ranked_decoders.values():
        assert (dec.cache.latent_dims, dec.cache.key_rope_dim) == (RANKS, 8)
    with open(f"{report.output_dir}/genai_config.json") as f:
        decoder = json.load(f)["model"]["decoder"]
    assert "head_size" not in decoder  # genai has one head_size for all layers: none is true here
    assert decoder["num_hidden_layers"] == 2


def test_per_layer_widths_logits_agree_over_prefill_and_8_decode_steps_batch2_left_padded(ranked_model,
                                                                                          ranked_decoders):
    worst = three_way_logits(ranked_model, ranked_decoders, PROMPTS, decode_steps=8)
    assert max(worst.values()) < 1e-3, worst


def test_per_layer_widths_24_greedy_tokens_identical_to_pytorch_generate(ranked_model, ranked_decoders):
    ids, mask = left_padded(PROMPTS)
    ref = torch_greedy(ranked_model, ids, mask, 24)
    assert len(set(ref.ravel().tolist())) > 4  # a real sequence, not one repeated token
    for name, dec in ranked_decoders.items():
        np.testing.assert_array_equal(runner.generate(dec, ids, mask, max_new_tokens=24), ref, err_msg=name)


def test_per_layer_widths_cache_sizes_in_the_report_are_the_real_ones(ranked_model, ranked_exports,
                                                                      ranked_decoders, ranked_checkpoint):
    """The report's widths and bytes per token are what the caches hold: onnxruntime's presents, the
    cache PyTorch fills, and what the conversion reported, layer by layer."""
    from mla_zoo.modeling.remote.modeling_llama_mla import cache_nbytes

    report = ranked_exports["fused"]
    ids, mask = left_padded(PROMPTS)
    tokens = ids.size  # B * T cache rows per layer
    dec = ranked_decoders["kernel"]
    _, presents = dec.step(ids, mask, runner.position_ids_from_mask(mask, ids.shape[1]), dec.empty_past(2))
    assert [p.shape[-1] for p in presents[0::2]] == report.latent_dims == ranked_model.config.kv_lora_ranks
    assert [p.shape[-1] for p in presents[1::2]] == [report.key_rope_dim] * 2
    assert sum(p.nbytes for p in presents) == report.cache_bytes_per_token * tokens
    with torch.no_grad():
        out = ranked_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=True)
    cache = cache_of(out)
    assert [layer.keys.shape[-1] for layer in cache.layers] == report.latent_dims  # the latent, per layer
    assert cache_nbytes(cache) == report.cache_bytes_per_token * tokens
    conversion = json.loads((ranked_checkpoint / "conversion.json").read_text())
    assert conversion["kv_cache"]["bytes_per_token_after"] == report.cache_bytes_per_token  # both float32


def test_per_layer_widths_a_past_at_another_layers_width_is_a_clear_error(ranked_decoders):
    ids, mask = left_padded(PROMPTS)
    dec = ranked_decoders["kernel"]
    past = dec.empty_past(2)
    past[0], past[2] = past[2], past[0]  # layer 0's latent at layer 1's width, and the reverse
    with pytest.raises(runner.CacheShapeError,
                       match=r"past_key_values.0.latent has shape \(2, 1, 0, 24\) .*, expected \(2, 1, 0, 8\)"):
        dec.step(ids, mask, runner.position_ids_from_mask(mask, ids.shape[1]), past)


def test_mla_zoo_export_and_generate_run_a_per_layer_checkpoint(ranked_checkpoint, tmp_path, capsys,
                                                                kernel_library):
    from mla_zoo.zoo.cli import main

    assert main(["export", str(ranked_checkpoint), "-o", str(tmp_path / "onnx")]) == 0
    assert "cache 8-24 (per layer) + 8 values per token per layer" in capsys.readouterr().out
    texts = {}
    for backend, path in (("onnx", tmp_path / "onnx"), ("torch", ranked_checkpoint)):
        assert main(["generate", str(path), "The weather today", "--backend", backend, "--max-new-tokens", "8",
                     "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["new_tokens"] >= 1 and result["fused_kernel"] == (backend == "onnx")
        texts[backend] = result["text"]
    assert texts["onnx"] == texts["torch"]


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------


def test_non_mla_checkpoint_is_refused(source_dir, tmp_path):
    settings = exporter.ExportSettings(checkpoint=str(source_dir("llama-gqa")), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="not an MLA checkpoint: model_type='llama'"):
        exporter.run_export(settings)
    assert not (tmp_path / "o").exists()


def test_unsupported_dtype_is_refused(tiny_model, tmp_path):
    from mla_zoo.modeling.common import SettingsError

    with pytest.raises(SettingsError, match="`dtype` must be one of fp32, fp16 \\(got 'bf16'\\)"):
        exporter.ExportSettings(checkpoint=str(tmp_path), output_dir=str(tmp_path / "o"), dtype="bf16")
    with pytest.raises(exporter.ExportError, match="unsupported dtype 'bf16': choose one of fp32, fp16 "
                                                   "\\(onnxruntime's CPU provider has no bfloat16 MatMul\\)"):
        exporter.export_model(tiny_model, tmp_path / "o", dtype="bf16")
    assert not (tmp_path / "o").exists()


def test_mismatched_cache_shapes_give_clear_errors(decoders, tiny_exports):
    ids, mask = left_padded(PROMPTS)
    dec = decoders["kernel"]
    _, past = dec.step(ids, mask, runner.position_ids_from_mask(mask, ids.shape[1]), dec.empty_past(2))
    step_mask = np.ones((2, ids.shape[1] + 1), dtype=np.int64)
    bad = list(past)
    bad[3] = bad[3][:, :, :-1]  # layer 1's RoPE keys one token short
    with pytest.raises(runner.CacheShapeError, match=r"past_key_values.1.key_rope has shape \(2, 1, 6, 8\)"):
        dec.step(ids[:, :1], step_mask, np.zeros((2, 1), dtype=np.int64), bad)
    # the kernel itself checks too, for callers that drive the session directly
    feed = {"input_ids": ids[:, :1], "attention_mask": step_mask, "position_ids": np.zeros((2, 1), dtype=np.int64)}
    for i, t in enumerate(bad):
        feed[exporter.input_names(2)[3 + i]] = t
    with pytest.raises(Exception, match="MultiHeadLatentAttention: input 'past_key_rope' has shape"):
        dec.session.run(None, feed)


def test_missing_library_falls_back_to_the_body_with_a_warning(tiny_model, tiny_exports, monkeypatch, tmp_path):
    monkeypatch.setenv("MLA_ZOO_CACHE", str(tmp_path))  # an empty cache: no library for these sources
    with pytest.raises(FileNotFoundError, match="mla-zoo build-kernels"):
        runner.OnnxDecoder(tiny_exports["fused"].output_dir, use_kernels=True)
    with pytest.warns(UserWarning, match="mla-zoo build-kernels"):
        dec = runner.OnnxDecoder(tiny_exports["fused"].output_dir)
    assert not dec.uses_kernels
    ids, mask = left_padded(PROMPTS)  # the fallback still decodes what PyTorch does
    np.testing.assert_array_equal(runner.generate(dec, ids, mask, 6), torch_greedy(tiny_model, ids, mask, 6))


def test_a_missing_compiler_is_a_clear_build_error(monkeypatch, tmp_path, kernel_library):
    monkeypatch.setenv("MLA_ZOO_CACHE", str(tmp_path))
    monkeypatch.setenv("MLA_ZOO_ORT_INCLUDE", str(tmp_path))  # a dir without the headers
    with pytest.raises(build.KernelBuildError, match="has no onnxruntime_lite_custom_op.h"):
        build.build_kernels()
    monkeypatch.delenv("MLA_ZOO_ORT_INCLUDE")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, apt-get or compiler on PATH
    with pytest.raises(build.KernelBuildError, match="apt-get|cmake"):
        build.build_kernels()


def test_the_library_cache_key_covers_every_kernel_source(tmp_path, monkeypatch):
    """A built library is reused while `source_hash` is unchanged: every source file in export/kernels must be in
    it, or an edit to the one left out would keep serving the old library."""
    on_disk = {f.name for f in build.SOURCE_DIR.iterdir()
               if f.suffix in (".cc", ".cu", ".cuh", ".h") or f.name == "CMakeLists.txt"}
    assert set(build.SOURCES) == on_disk
    copy = tmp_path / "kernels"
    copy.mkdir()
    for name in build.SOURCES:
        (copy / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    before = build.source_hash("avx2", "cuda")
    (copy / "mla_attention_ort.h").write_text((copy / "mla_attention_ort.h").read_text() + "\n")
    assert build.source_hash("avx2", "cuda") != before


# ----------------------------------------------------------------------------------------------
# The commands (settings dataclasses the CLI wires)
# ----------------------------------------------------------------------------------------------


def test_run_export_and_generate_from_a_checkpoint_dir(tiny_model, tokenizer, tmp_path, kernel_library):
    from mla_zoo.modeling.remote import REMOTE_CODE_DIR, REMOTE_CODE_FILES

    ckpt = tmp_path / "ckpt"
    tiny_model.save_pretrained(ckpt)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, ckpt / name)
    tokenizer.save_pretrained(ckpt)
    report = exporter.run_export(exporter.ExportSettings(checkpoint=str(ckpt), output_dir=str(tmp_path / "onnx")))
    assert report.mla_nodes == 2 and (tmp_path / "onnx" / "tokenizer.json").is_file()
    with pytest.raises(exporter.MlaZooError, match="already exists; pass `overwrite`"):  # the output rule
        exporter.run_export(exporter.ExportSettings(checkpoint=str(ckpt), output_dir=str(tmp_path / "onnx")))
    texts = {}
    for backend, path in (("onnx", tmp_path / "onnx"), ("torch", ckpt)):
        settings = runner.GenerateSettings(model=str(path), prompt="The weather today", backend=backend,
                                           max_new_tokens=8)
        result = runner.run_generate(settings)
        assert result.new_tokens >= 1
        texts[backend] = result.text
    assert texts["onnx"] == texts["torch"]


def test_onnxruntime_genai_loads_the_export_but_cannot_run_its_cache_layout(tiny_exports):
    """genai reads genai_config.json and our library (copied into the export dir: genai only loads a
    custom-op library from inside the model dir), then allocates past key and value with ONE head
    size: our latent and RoPE-key caches differ in width. If genai learns per-tensor cache widths,
    this fails and the README's statement must change."""
    og = pytest.importorskip("onnxruntime_genai")
    directory = tiny_exports["fused"].output_dir
    with open(f"{directory}/genai_config.json") as f:
        library = json.load(f)["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert library == build.LIBRARY_NAME
    assert os.path.isfile(os.path.join(directory, library))
    model = og.Model(directory)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12)
    generator = og.Generator(model, params)
    with pytest.raises(Exception, match=r"past_key_values.0.key_rope[\s\S]*Got: 20 Expected: 8"):
        generator.append_tokens([[5, 17, 99, 23]])
        while not generator.is_done():
            generator.generate_next_token()


def test_an_all_fp16_export_holds_an_fp16_cache_and_tracks_the_fp32_model(tiny_model, tmp_path, kernel_library):
    """`fp32_residual=False` (`--no-fp32-residual`): fp16 everywhere, the residual stream included."""
    import copy

    report = exporter.export_model(copy.deepcopy(tiny_model).half(), tmp_path / "fp16", dtype="fp16",
                                   fp32_residual=False)
    assert report.cache_bytes_per_token == 2 * 2 * (20 + 8) and not report.fp32_residual
    decoders = {"kernel": runner.OnnxDecoder(report.output_dir, use_kernels=True),
                "body": runner.OnnxDecoder(report.output_dir, use_kernels=False)}
    assert decoders["kernel"].cache.dtype is np.float16
    worst = three_way_logits(tiny_model, decoders, PROMPTS, decode_steps=4)  # against fp32 torch
    scale = float(np.abs(torch_logits(tiny_model, *left_padded(PROMPTS))).max())
    assert max(worst.values()) / scale < 1e-2, (worst, scale)


def test_an_fp16_export_keeps_its_residual_stream_in_fp32_by_default(tiny_model, tmp_path, kernel_library):
    """`fp32_residual` (the default): the residual adds of every block run in fp32 (the graph's fp32 Adds: the
    norms' epsilon adds plus two per layer), onnxruntime computes what the wrapper computes that way, the cache
    stays fp16."""
    import copy

    from mla_zoo.export.wrapper import DecoderWithPast

    def fp32_adds(ir_model) -> int:
        return sum(1 for node in ir_model.graph if node.op_type == "Add" and node.outputs[0].dtype.name == "FLOAT")

    half = copy.deepcopy(tiny_model).half()
    layers = tiny_model.config.num_hidden_layers
    assert fp32_adds(exporter.export_ir(half)) == fp32_adds(exporter.export_ir(half, fp32_residual=False)) + 2 * layers
    report = exporter.export_model(half, tmp_path / "fp16", dtype="fp16")
    assert report.fp32_residual and report.cache_bytes_per_token == 2 * 2 * (20 + 8)
    decoders = {"kernel": runner.OnnxDecoder(report.output_dir, use_kernels=True),
                "body": runner.OnnxDecoder(report.output_dir, use_kernels=False)}
    assert decoders["kernel"].cache.dtype is np.float16
    ids, mask = left_padded(PROMPTS)
    wrapper = DecoderWithPast(half, residual_dtype=torch.float32).eval()
    pos = runner.position_ids_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        want, _ = wrapper(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), wrapper.empty_past(2))
    real = mask.astype(bool)
    for dec in decoders.values():
        got, _ = dec.step(ids, mask, pos, dec.empty_past(2))
        np.testing.assert_allclose(got[real], want.float().numpy()[real], rtol=0, atol=2e-2)
    worst = three_way_logits(tiny_model, decoders, PROMPTS, decode_steps=4)  # against fp32 torch
    scale = float(np.abs(torch_logits(tiny_model, ids, mask)).max())
    assert max(worst.values()) / scale < 1e-2, (worst, scale)


def test_fp32_residual_changes_nothing_in_an_fp32_export(tiny_model):
    """An fp32 model's residual is fp32 already: the same graph, node for node, with or without the setting."""
    def ops(ir_model) -> list[tuple[str, str]]:
        return [(node.op_type, node.outputs[0].dtype.name) for node in ir_model.graph]

    assert ops(exporter.export_ir(tiny_model)) == ops(exporter.export_ir(tiny_model, fp32_residual=False))
