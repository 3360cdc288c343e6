"""MHA2MLA conversion against references: the source model's logits, a float64 partial-RoPE
attention written on the source weights, and the optimality of each low-rank factorisation."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, convert_tiny, tiny_source
from mla_zoo.modeling import calibration, lowrank, partial_rope
from mla_zoo.modeling.common import ConversionError, SettingsError
from mla_zoo.modeling.convert import head_dim_of, resolve_settings
from mla_zoo.modeling.convert_schema import ConvertSettings
from reference import partial_rope_attention


def full_rank(model) -> int:
    cfg = model.config
    return min(cfg.num_key_value_heads * head_dim_of(cfg), cfg.hidden_size)  # all pairs kept: only V rows


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lossless_settings_reproduce_source_logits(family):
    model = tiny_source(family)
    half = head_dim_of(model.config) // 2
    mla, report = convert_tiny(model, rope_pairs=half, kv_lora_rank=full_rank(model), svd="joint")
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (model(ids).logits - mla(ids).logits).abs().max().item()
    assert diff < 1e-4
    assert min(report.svd_retained_energy) > 1 - 1e-9


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("strategy", ["high", "low", "uniform"])
def test_partial_rope_block_equals_float64_reference(family, strategy):
    """Full-rank latent, R < head_dim/2: the MLA block equals partial-RoPE attention on the source weights."""
    model = tiny_source(family).double()
    cfg = model.config
    r = 3
    rows = cfg.num_key_value_heads * (2 * head_dim_of(cfg) - 2 * r)
    mla, report = convert_tiny(model, rope_pairs=r, kv_lora_rank=min(rows, cfg.hidden_size), rope_strategy=strategy)
    assert rows <= cfg.hidden_size and min(report.svd_retained_energy) > 1 - 1e-12  # full rank: exact
    mla = mla.double()
    x = torch.randn(2, 12, cfg.hidden_size, dtype=torch.float64)
    positions = torch.arange(12)[None].expand(2, -1)
    pairs = report.rope_pairs[1]
    want = partial_rope_attention(model.model.layers[1].self_attn, x, positions, pairs, model.model.rotary_emb.inv_freq)
    cos_sin = mla.model.rotary_emb(x, positions)
    got = mla.model.layers[1].self_attn(x, cos_sin, None)
    got = got[0] if isinstance(got, tuple) else got  # (output, attention weights) in the remote code v2
    assert (got - want).abs().max().item() < 1e-6  # cos/sin come in float32


def test_fixed_strategies_pick_documented_pairs():
    assert partial_rope.fixed_pairs("high", 64, 4) == [0, 1, 2, 3]
    assert partial_rope.fixed_pairs("low", 64, 4) == [28, 29, 30, 31]
    assert partial_rope.fixed_pairs("uniform", 64, 4) == [0, 8, 16, 24]


def test_two_norm_picks_the_pairs_that_dominate_scores(tokenizer):
    """Blow up pairs 2 and 5 of KV head 0's keys (and their queries): 2-norm must keep exactly them."""
    model = tiny_source("llama-gqa")
    cfg = model.config
    d = head_dim_of(cfg)
    half = d // 2
    with torch.no_grad():
        for layer in model.model.layers:
            for pair in (2, 5):
                for dim in (pair, pair + half):
                    layer.self_attn.k_proj.weight[dim] *= 40  # KV head 0 only
                    for h in range(cfg.num_attention_heads // cfg.num_key_value_heads):  # its query heads
                        layer.self_attn.q_proj.weight[h * d + dim] *= 40
    rows = calibration.text_batches(tokenizer, "It is a truth universally acknowledged. " * 40, 256, 64)
    stats = calibration.collect_stats(model, rows, want_moments=False)
    pairs = partial_rope.select_pairs("2-norm", 2, 2, d, 2, stats.pair_norms())
    assert all(layer[0] == [2, 5] for layer in pairs)
    assert all(layer[1] != [2, 5] for layer in pairs)


def _stacked(rank_dims=(6, 8), rows=40, hidden=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, hidden, generator=g, dtype=torch.float64)


def test_joint_svd_is_the_best_rank_r_approximation():
    w = _stacked()
    up, down, energy = lowrank.joint(w, 10)
    s = torch.linalg.svdvals(w)
    assert torch.allclose((w - up @ down).norm(), s[10:].norm(), rtol=1e-9)
    assert energy == pytest.approx(float((s[:10] ** 2).sum() / (s**2).sum()))
    # where the singular values go: split evenly, so both factors carry sqrt(S)
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-9)


def test_whitened_svd_minimises_output_error_on_the_calibration_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 32, generator=g, dtype=torch.float64)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 32, dtype=torch.float64)
    moment = x.T @ x / len(x)
    up_w, down_w, _ = lowrank.whitened(w, 8, moment)
    up_j, down_j, _ = lowrank.joint(w, 8)
    err = lambda up, down: ((w - up @ down) @ x.T).norm()  # noqa: E731
    assert err(up_w, down_w) < 0.5 * err(up_j, down_j)
    # and it is optimal: equal to the tail singular values of W L
    chol = torch.linalg.cholesky(moment + 1e-6 * moment.diagonal().mean() * torch.eye(32, dtype=torch.float64))
    tail = torch.linalg.svdvals(w @ chol)[8:].norm()
    assert ((w - up_w @ down_w) @ chol).norm() == pytest.approx(float(tail), rel=1e-6)


def test_row_weighted_svd_minimises_the_weighted_error_and_returns_factors_of_w():
    """output-aware's factorisation: the best rank-r W' under ||R (W - W') L|| (the tail singular values of
    R W L), better there than the whitened SVD's, and up @ down approximates W itself (R undone)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 32, generator=g, dtype=torch.float64)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)
    moment = x.T @ x / len(x)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)
    r, r_inv = lowrank.psd_root(a @ a.T + 1e-3 * torch.eye(40, dtype=torch.float64))
    assert torch.allclose(r @ r_inv, torch.eye(40, dtype=torch.float64), atol=1e-8)
    up, down, _ = lowrank.factorize(w, moment, (r, r_inv)).truncate(8)
    up_w, down_w, _ = lowrank.whitened(w, 8, moment)
    chol = torch.linalg.cholesky(moment + 1e-6 * moment.diagonal().mean() * torch.eye(32, dtype=torch.float64))
    err = lambda up, down: (r @ (w - up @ down) @ chol).norm()  # noqa: E731
    assert float(err(up, down)) == pytest.approx(float(torch.linalg.svdvals(r @ w @ chol)[8:].norm()), rel=1e-6)
    assert err(up, down) < 0.8 * err(up_w, down_w)
    full_up, full_down, energy = lowrank.factorize(w, moment, (r, r_inv)).truncate(32)  # full rank: W exactly
    assert torch.allclose(full_up @ full_down, w, atol=1e-8) and energy == pytest.approx(1.0)


@torch.no_grad()
def test_output_weights_scale_key_rows_and_weigh_value_rows_by_the_output_projection():
    from mla_zoo.modeling.convert import KEY_ROW_SCALE, layer_kv_matrix, output_weights

    src = tiny_source("llama-gqa")  # head_dim 16, 4 query heads on 2 KV heads, hidden 64
    attn, d, nope = src.model.layers[0].self_attn, 16, 12
    pairs = [[0, 1], [2, 3]]  # R = 2 pairs per KV head
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    moment = x.T @ x / len(x)
    r, r_inv = output_weights(attn, pairs, moment)
    rows = 2 * (nope + d)
    assert r.shape == (rows, rows) and torch.allclose(r @ r_inv, torch.eye(rows, dtype=torch.float64), atol=1e-8)
    w = layer_kv_matrix(attn, pairs, d)
    wo = attn.o_proj.weight.double()
    for kv in range(2):
        k0, v0 = kv * (nope + d), kv * (nope + d) + nope
        assert torch.allclose(r[k0:v0, k0:v0], KEY_ROW_SCALE * torch.eye(nope, dtype=torch.float64))
        r_v = r[v0 : v0 + d, v0 : v0 + d]
        m = sum(wo[:, h * d : (h + 1) * d].T @ wo[:, h * d : (h + 1) * d] for h in (2 * kv, 2 * kv + 1))
        ratio = (r_v.T @ r_v) / m  # R_v^T R_v = c M: the group's output projection, up to one scale
        assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-6)
        w_v = w[v0 : v0 + d]
        assert float((r_v @ w_v @ moment * (r_v @ w_v)).sum()) == pytest.approx(float((w_v @ moment * w_v).sum()))
    assert r[: nope + d, nope + d :].abs().max() == 0  # one block per KV head


def test_split_svd_keeps_keys_and_values_on_separate_latents():
    n_kv, nope, v = 2, 6, 8
    w = _stacked(rows=n_kv * (nope + v))
    up, down, _ = lowrank.split(w, 12, n_kv, nope, v)
    per_head = up.view(n_kv, nope + v, 12)
    assert per_head[:, :nope, 6:].abs().max() == 0  # keys read only the first half of the latent
    assert per_head[:, nope:, :6].abs().max() == 0  # values only the second
    up, down, energy = lowrank.split(w, n_kv * (nope + v), n_kv, nope, v)  # full rank: exact
    assert torch.allclose(up @ down, w, atol=1e-10) and energy == pytest.approx(1.0)


def test_settings_out_of_range_name_the_valid_range():
    cfg = tiny_source("llama-gqa").config  # head_dim 16, 2 KV heads, hidden 64
    with pytest.raises(ConversionError, match=r"\[1, 8\]"):
        resolve_settings(ConvertSettings(rope_pairs=9), cfg)
    with pytest.raises(ConversionError, match=r"\[1, 56\]"):  # 2 KV heads x (12 NoPE + 16 value dims)
        resolve_settings(ConvertSettings(rope_pairs=2, kv_lora_rank=57), cfg)
    with pytest.raises(ConversionError, match="`kv_lora_rank` 8 != `kv_rank_per_head` 5 x 2 KV heads"):
        resolve_settings(ConvertSettings(kv_lora_rank=8, kv_rank_per_head=5), cfg)
    s = resolve_settings(ConvertSettings(kv_rank_per_head=4), cfg)
    assert (s.kv_lora_rank, s.kv_rank_per_head, s.rope_pairs) == (8, 4, 1)
    assert resolve_settings(ConvertSettings(kv_lora_rank=7), cfg).kv_rank_per_head is None  # not a per-head width
    with pytest.raises(SettingsError, match=r"`rope_strategy` must be one of high, low, uniform, 2-norm \(got 'mid'\)"):
        ConvertSettings(rope_strategy="mid")
    with pytest.raises(SettingsError, match=r"`calib_tokens` must be an int >= 1 \(got 0\)"):
        ConvertSettings(calib_tokens=0)


def test_whitened_svd_survives_fewer_calibration_tokens_than_hidden_dims():
    """A singular second moment (rank 10 < 32 dims) with an outlier direction still factorises."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 32, generator=g, dtype=torch.float64)
    x = torch.randn(10, 32, generator=g, dtype=torch.float64)
    x[:, 0] *= 300  # an outlier dim, as LLM hidden states have
    up, down, _ = lowrank.whitened(w, 8, x.T @ x / len(x))
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    err = lambda u, d: ((w - u @ d) @ x.T).norm()  # noqa: E731
    assert err(up, down) < err(*lowrank.joint(w, 8)[:2])


def test_reports_of_the_first_format_still_load():
    """conversion.json as the first version wrote it (no schema_version, the rank as kv_rank and kv_lora_rank)."""
    from conftest import REPO
    from mla_zoo.modeling.convert_schema import ConversionReport

    old = REPO / "bench" / "results" / "recovery" / "convert32.json"
    assert "schema_version" not in old.read_text()
    report = ConversionReport.read(old)
    assert (report.settings.kv_lora_rank, report.settings.kv_rank_per_head) == (96, 32)
    assert report.kv_cache.reduction == 0.6875 and report.calibration.tokens == 15360
    assert ConversionReport.from_json(report.to_json()) == report  # and the current format round-trips
    assert '"kv_rank"' not in report.to_json()



# ----------------------------------------------------------------------------------------------
# Sources as a new user has them
# ----------------------------------------------------------------------------------------------


def test_a_source_without_a_tokenizer_converts_on_its_own_samples(tmp_path):
    """No tokenizer files: 2-norm and whitened SVD calibrate on samples drawn as token ids, exactly the
    asked number of tokens, and the report says the checkpoint has no tokenizer either."""
    import json

    from mla_zoo.zoo.cli import main

    src = tmp_path / "weights-only"
    tiny_source("llama-gqa").save_pretrained(src)
    out = tmp_path / "mla"
    assert main(["convert", str(src), "-o", str(out), "--calib-tokens", "2048", "--rope-pairs", "2", "--json"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["calibration"] == {"kind": "self-samples", "tokens": 2048, "file": None,
                                     "note": "data-free: no `calib_text`, the model's own samples were used"}
    assert any("no tokenizer" in w for w in report["warnings"])
    assert not list(out.glob("tokenizer*"))


def test_checkpoints_keep_the_source_dtype(tmp_path, smollm2):
    """`--dtype auto` writes the source's dtype: a bf16 checkpoint stays bf16, and the bundled GGUF counts as
    the bf16 model it was made from (it is dequantised to float32 only for the conversion)."""
    from mla_zoo.zoo.cli import main
    from safetensors import safe_open

    src = tmp_path / "bf16"
    tiny_source("llama-gqa").to(torch.bfloat16).save_pretrained(src)
    out = tmp_path / "mla"
    assert main(["convert", str(src), "-o", str(out), "--rope-strategy", "high", "--svd", "joint"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, _, info = smollm2
    assert info.dtype == "bfloat16" and next(model.parameters()).dtype == torch.float32


def _synth_dir(path, ids: torch.Tensor, mask: torch.Tensor):
    """A directory as `mla-zoo synth-data` writes it (one shard of input_ids / attention_mask)."""
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"input_ids": ids, "attention_mask": mask}, str(path / "shard-00000.safetensors"))
    return path


def test_synth_data_calibrates_without_a_tokenizer(tmp_path):
    """`calib_text` may name a synth-data directory: its token ids, padding dropped, are the calibration
    rows (no tokenizer needed), and the report names the kind and the exact number of tokens."""
    import json

    from mla_zoo.zoo.cli import main

    model = tiny_source("llama-gqa")
    ids = torch.randint(3, model.config.vocab_size, (4, 40))  # [rows, len]
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # a row that stopped early: its last 10 slots are padding
    data = _synth_dir(tmp_path / "synth", ids, mask)
    rows = calibration.synth_rows(data, 100, 20, model.config.vocab_size)
    want = torch.cat([ids[0], ids[1, :30], ids[2], ids[3]])[:100].view(5, 20)
    assert torch.equal(rows, want)

    src = tmp_path / "weights-only"
    model.save_pretrained(src)
    out = tmp_path / "mla"
    assert main(["convert", str(src), "-o", str(out), "--calib-text", str(data), "--calib-tokens", "100",
                 "--calib-seq-len", "20", "--rope-pairs", "2", "--json"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["calibration"] == {"kind": "synth-data", "tokens": 100, "file": str(data), "note": None}


def test_synth_data_of_another_model_is_refused(tmp_path):
    model = tiny_source("llama-gqa")
    vocab = model.config.vocab_size
    data = _synth_dir(tmp_path / "synth", torch.full((2, 16), vocab + 5), torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(ConversionError, match="beyond this model's vocabulary"):
        calibration.synth_rows(data, 32, 8, vocab)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="without `mla-zoo synth-data` shards"):
        calibration.synth_rows(tmp_path / "empty", 32, 8, vocab)
