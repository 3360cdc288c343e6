"""MHA2MLA: convert a Llama-family checkpoint (MHA or GQA) to Multi-head Latent Attention.

Per attention layer (Ji et al. 2025, arXiv 2502.14837):
1. partial RoPE: each KV head keeps RoPE on R frequency pairs (`partial_rope`); the query heads
   of its group keep the same pairs. Rows of W_q / W_k are permuted per head to
   [rope pairs' first halves | their second halves | NoPE dims], the layout the model file uses.
2. low rank: the NoPE key rows and all value rows, stacked per KV head, are factorised into one
   shared latent (`lowrank`): down-projection -> `kv_a_proj` (cached), up -> `kv_b_proj`.
3. output refit (`refit`, not in the paper): each layer's `o_proj` re-solved by ridge least squares so the
   converted block reproduces the source block's output on the calibration tokens, layer by layer.
Everything else (embeddings, MLPs, norms, LM head) is copied unchanged.

`convert_model` works in memory and returns the model with its `ConversionReport`;
`save_checkpoint` writes the checkpoint (with conversion.json) atomically.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import calibration, lowrank, partial_rope, rank_allocation, refit
from .common import ConversionError, atomic_directory, check_output_dir, progress_bar, read_text
from .convert_schema import DTYPES, CalibrationSource, ConversionReport, ConvertSettings, KVCacheSize
from .remote import REMOTE_CODE_DIR, REMOTE_CODE_FILES
from .remote.configuration_llama_mla import LlamaMLAConfig
from .remote.modeling_llama_mla import LlamaMLAForCausalLM
from .sources import TOKENIZER_FILES, SourceInfo, source_dtype

LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "mlp_bias",
    "head_dim",
)
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the written weights' dtypes


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def resolve_settings(settings: ConvertSettings, config) -> ConvertSettings:
    """Every default filled in from the model's shape, every value checked against the model's range."""
    s = replace(settings)
    d, n_kv = head_dim_of(config), config.num_key_value_heads
    half = d // 2
    s.rope_pairs = max(1, d // 16) if s.rope_pairs is None else s.rope_pairs
    if not 1 <= s.rope_pairs <= half:
        raise ConversionError(f"`rope_pairs` must be in [1, {half}] for head_dim {d}, got {s.rope_pairs}")
    rows_per_head = (d - 2 * s.rope_pairs) + d  # NoPE key dims + value dims
    max_rank = min(n_kv * rows_per_head, config.hidden_size)
    if s.kv_lora_rank is not None and s.kv_rank_per_head is not None:
        if s.kv_lora_rank != s.kv_rank_per_head * n_kv:
            raise ConversionError(f"`kv_lora_rank` {s.kv_lora_rank} != `kv_rank_per_head` {s.kv_rank_per_head} "
                                  f"x {n_kv} KV heads")
    if s.kv_lora_rank is None:
        s.kv_lora_rank = (half if s.kv_rank_per_head is None else s.kv_rank_per_head) * n_kv
    if not 1 <= s.kv_lora_rank <= max_rank:
        raise ConversionError(
            f"`kv_lora_rank` (total latent width) must be in [1, {max_rank}] for this model "
            f"({n_kv} KV heads x {rows_per_head} NoPE-key+value dims, hidden {config.hidden_size}), "
            f"i.e. `kv_rank_per_head` in [1, {max_rank // n_kv}]; got {s.kv_lora_rank}"
        )
    s.kv_rank_per_head = None if s.kv_lora_rank % n_kv else s.kv_lora_rank // n_kv  # None: not per head
    if s.calib_tokens is None:
        s.calib_tokens = 4096 if s.calib_text else 1024
    if s.rank_allocation == "energy" and s.svd == "split":
        raise ConversionError("`rank_allocation` energy reads the spectrum of the joint factorisation: use `svd` "
                              "output-aware, whitened or joint")
    return s


def kv_bytes_per_token(config, dtype_bytes: int) -> dict:
    """KV-cache bytes per token (all layers) of the source model and of its MLA conversion."""
    n_layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    before = 2 * n_kv * head_dim_of(config) * n_layers * dtype_bytes
    if config.model_type == "llama_mla":  # also configs loaded through remote code (another class)
        after = config.kv_cache_values_per_token() * dtype_bytes
        return {"before": before, "after": after, "reduction": 1 - after / before}
    return {"before": before, "after": before, "reduction": 0.0}


def mla_config(source_config, s: ConvertSettings, pairs: list, source_name: str,
               ranks: list[int] | None = None) -> LlamaMLAConfig:
    src = source_config.to_dict()
    fields = {k: src[k] for k in LLAMA_FIELDS if k in src}
    fields["head_dim"] = head_dim_of(source_config)
    qkv_bias = source_config.model_type == "qwen2" or bool(src.get("attention_bias", False))
    o_bias = bool(src.get("attention_bias", False)) and source_config.model_type != "qwen2"
    return LlamaMLAConfig(
        **fields,
        attention_bias=qkv_bias,
        attention_output_bias=o_bias,
        kv_lora_rank=s.kv_lora_rank,
        kv_lora_ranks=ranks,
        rope_pairs=pairs,
        rope_strategy=s.rope_strategy,
        source_model=source_name,
        architectures=["LlamaMLAForCausalLM"],
    )


def head_permutation(pairs: list[int], head_dim: int) -> tuple[list[int], list[int]]:
    """(rope dims, nope dims) of one head: rope = first halves of the kept pairs, then second halves."""
    half = head_dim // 2
    rope = list(pairs) + [p + half for p in pairs]
    kept = set(rope)
    return rope, [i for i in range(head_dim) if i not in kept]


def stacked_kv(wk: torch.Tensor, wv: torch.Tensor, nope_rows: list[list[int]], head_dim: int) -> torch.Tensor:
    """The rows the latent factorises: per KV head its NoPE key rows, then its value rows."""
    d = head_dim
    return torch.cat([torch.cat((wk[rows], wv[kv * d : (kv + 1) * d])) for kv, rows in enumerate(nope_rows)])


def layer_kv_matrix(attn, layer_pairs: list[list[int]], head_dim: int) -> torch.Tensor:
    """`stacked_kv` of a source attention block whose KV heads keep `layer_pairs` (float64)."""
    d = head_dim
    nope = [[kv * d + i for i in head_permutation(p, d)[1]] for kv, p in enumerate(layer_pairs)]
    return stacked_kv(attn.k_proj.weight.double(), attn.v_proj.weight.double(), nope, d)


ACTIVATION_AWARE = ("whitened", "output-aware")  # the SVDs that read the calibration inputs' second moments
KEY_ROW_SCALE = 0.5  # output-aware: the NoPE key rows' weight (a quarter of their energy; below)


def layer_moment(stats, s: ConvertSettings, layer: int) -> torch.Tensor | None:
    """The input second moment the activation-aware SVDs of `layer` need (None for the weight-only SVDs)."""
    return stats.second_moment(layer) if s.svd in ACTIVATION_AWARE else None


def output_weights(attn, layer_pairs: list[list[int]], second_moment: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R^{-1}) [rows, rows] for the output-aware SVD (`lowrank.factorize`), block-diagonal per KV head in
    `stacked_kv`'s row order. A value row's error reaches the residual stream through the output projection
    of the query heads that read it: its block is M^{1/2}, M = sum over the group's heads of W_o,h^T W_o,h,
    scaled to keep the block's whitened energy (so only the directions inside it are reweighted). The NoPE key
    rows are scaled by KEY_ROW_SCALE: at equal energy (the whitened SVD) keys took latent dims that the values
    needed more. (SmolLM2-135M, d_kv=32, fiction calibration, one-shot perplexity: the key block's share chosen
    on code, technical and fiction among 1/30..4; weighting the key block by the queries too traded fiction for
    code; bench/RESULTS.md.)"""
    d, n_kv = head_dim_of(attn.config), attn.config.num_key_value_heads
    g = attn.config.num_attention_heads // n_kv
    c, wv, wo = second_moment.double(), attn.v_proj.weight.double(), attn.o_proj.weight.double()
    blocks, inverses = [], []
    for kv in range(n_kv):
        nope = len(head_permutation(layer_pairs[kv], d)[1])
        blocks.append(torch.eye(nope, dtype=torch.float64) * KEY_ROW_SCALE)
        inverses.append(torch.eye(nope, dtype=torch.float64) / KEY_ROW_SCALE)
        wo_group = wo[:, kv * g * d : (kv + 1) * g * d].view(-1, g, d)  # [hidden, g, d]
        m = torch.einsum("ogi,ogj->ij", wo_group, wo_group)  # sum_h W_o,h^T W_o,h: [d, d]
        root, inverse = lowrank.psd_root(m)
        w_v = wv[kv * d : (kv + 1) * d]  # [d, hidden]
        weighted = root @ w_v  # [d, hidden]
        keep = ((w_v @ c * w_v).sum() / (weighted @ c * weighted).sum()).sqrt()  # whitened energy before / after
        blocks.append(root * keep)
        inverses.append(inverse / keep)
    return torch.block_diag(*blocks), torch.block_diag(*inverses)


def layer_factorization(attn, layer_pairs: list[list[int]], s: ConvertSettings, second_moment
                        ) -> lowrank.Factorization:
    """One layer's joint factorisation by `s.svd` (joint, whitened, output-aware), before truncation."""
    w = layer_kv_matrix(attn, layer_pairs, head_dim_of(attn.config))  # [n_kv * (d - 2R + d), hidden]
    weights = output_weights(attn, layer_pairs, second_moment) if s.svd == "output-aware" else None
    return lowrank.factorize(w, second_moment, weights)


LatentFactors = tuple[torch.Tensor, torch.Tensor, float]  # (up [rows, r], down [r, hidden], retained energy)


def layer_latent(attn, layer_pairs: list[list[int]], s: ConvertSettings, second_moment, rank: int) -> LatentFactors:
    """One layer's latent factors at width `rank` by `s.svd` (`lowrank`)."""
    if s.svd == "split":
        d, n_kv = head_dim_of(attn.config), attn.config.num_key_value_heads
        w = layer_kv_matrix(attn, layer_pairs, d)  # [n_kv * (d - 2R + d), hidden]
        return lowrank.split(w, rank, n_kv, d - 2 * s.rope_pairs, d)
    return layer_factorization(attn, layer_pairs, s, second_moment).truncate(rank)


@torch.no_grad()
def latent_factors(model, s: ConvertSettings, pairs: list, stats, progress: bool = False
                   ) -> tuple[list[LatentFactors], list[int] | None]:
    """Every layer's latent factors and the per-layer widths under `rank_allocation` (None: uniform).

    Each layer's stacked matrix is factorised once (one eigendecomposition for the whitening, one SVD).
    Uniform: truncated at `kv_lora_rank` right away. Energy: every layer's `lowrank.Factorization` is kept
    until all spectra are known, `rank_allocation.allocate` gives dims to the layers whose spectrum loses
    most (same total, multiples of gcd(kv_lora_rank, 8)), then each is truncated at its own width. The
    factorisations are freed before the MLA model is built; held together they take, per layer,
    8 * (hidden^2 + k * (rows + hidden)) bytes (k = min(rows, hidden)): 216 MiB for Llama-3-8B whitened,
    6.8 GiB for its 32 layers.
    """
    attns = [layer.self_attn for layer in model.model.layers]
    bar = progress_bar(range(len(attns)), enabled=progress, desc="factorising layers", unit="layer")
    if s.rank_allocation == "uniform":
        return [layer_latent(attns[i], pairs[i], s, layer_moment(stats, s, i), s.kv_lora_rank) for i in bar], None
    factorizations = [layer_factorization(attns[i], pairs[i], s, layer_moment(stats, s, i)) for i in bar]
    ranks = rank_allocation.allocate([f.s for f in factorizations], s.kv_lora_rank, "energy",
                                     step=math.gcd(s.kv_lora_rank, 8))
    return [f.truncate(r) for f, r in zip(factorizations, ranks, strict=True)], ranks


@torch.no_grad()
def convert_layer(attn, mla_attn, layer_pairs, latent: LatentFactors) -> None:
    """Fill one MLA attention block from a source attention block and its latent factors (`latent_factors`)."""
    cfg = mla_attn.config
    d, n_kv, g = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    wq, wk = attn.q_proj.weight.double(), attn.k_proj.weight.double()
    up, down, _ = latent
    perms = [head_permutation(p, d) for p in layer_pairs]  # per KV head

    q_rows, kr_rows, kn_rows = [], [], []
    for h in range(cfg.num_attention_heads):
        rope, nope = perms[h // g]
        q_rows += [h * d + i for i in rope + nope]
    for kv in range(n_kv):
        rope, nope = perms[kv]
        kr_rows += [kv * d + i for i in rope]
        kn_rows.append([kv * d + i for i in nope])

    mla_attn.q_proj.weight.copy_(wq[q_rows])
    mla_attn.k_rope_proj.weight.copy_(wk[kr_rows])
    mla_attn.kv_a_proj.weight.copy_(down)
    mla_attn.kv_b_proj.weight.copy_(up)
    mla_attn.o_proj.weight.copy_(attn.o_proj.weight)
    if attn.q_proj.bias is not None:
        bq, bk, bv = attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias
        mla_attn.q_proj.bias.copy_(bq[q_rows])
        mla_attn.k_rope_proj.bias.copy_(bk[kr_rows])
        kv_bias = [torch.cat((bk[rows], bv[kv * d : (kv + 1) * d])) for kv, rows in enumerate(kn_rows)]
        mla_attn.kv_b_proj.bias.copy_(torch.cat(kv_bias))
    if mla_attn.o_proj.bias is not None:
        mla_attn.o_proj.bias.copy_(attn.o_proj.bias)


def tokenizer_needed(field: str) -> ConversionError:
    """The error for a text input (`field`) given for a source without a tokenizer."""
    return ConversionError(
        f"`{field}` needs a tokenizer, and the source has none (no {', '.join(TOKENIZER_FILES[:3])}, ...): pass "
        f"`tokenizer` (a directory with the source's tokenizer files), or drop `{field}`"
        + (" to calibrate on the model's own samples (drawn as token ids, no tokenizer needed)"
           if field == "calib_text" else ""))


def calibrate(model, tokenizer, s: ConvertSettings):
    """(calibration rows [n, seq_len], their statistics, where they came from) when the settings need them;
    (None, None, None) when none does. The statistics are None when only the refit reads the rows."""
    need_norms = s.rope_strategy == "2-norm"
    need_moments = s.svd in ACTIVATION_AWARE
    if not (need_norms or need_moments or s.refit != "none"):
        return None, None, None
    if s.calib_text and Path(s.calib_text).is_dir():  # token ids: no tokenizer needed
        rows = calibration.synth_rows(s.calib_text, s.calib_tokens, s.calib_seq_len, model.config.vocab_size)
        kind = "synth-data"
    elif s.calib_text:
        if tokenizer is None:
            raise tokenizer_needed("calib_text")
        text = read_text(s.calib_text, "calib_text")
        rows = calibration.text_batches(tokenizer, text, s.calib_tokens, s.calib_seq_len)
        kind = "text"
    if s.calib_text:
        file, note = str(s.calib_text), None
        if rows.numel() < s.calib_tokens:
            note = f"`calib_text` gives {rows.numel()} tokens in rows of {rows.shape[1]}, fewer than the " \
                   f"{s.calib_tokens} of `calib_tokens`"
    else:
        rows = calibration.self_samples(model, tokenizer, s.calib_tokens, min(s.calib_seq_len, 128), s.seed)
        kind, file, note = "self-samples", None, "data-free: no `calib_text`, the model's own samples were used"
    stats = calibration.collect_stats(model, rows, want_moments=need_moments) if need_norms or need_moments else None
    return rows, stats, CalibrationSource(kind, rows.numel(), file, note)


def convert_model(model, tokenizer, source_info: SourceInfo, settings: ConvertSettings, progress: bool = True):
    """Convert a loaded source model; returns (MLA model, ConversionReport). Nothing is written."""
    started = time.time()
    src_cfg = model.config
    if src_cfg.model_type == "mistral" and getattr(src_cfg, "sliding_window", None):
        sliding = src_cfg.sliding_window
    elif src_cfg.model_type == "qwen2" and getattr(src_cfg, "use_sliding_window", False):
        sliding = src_cfg.sliding_window
    else:
        sliding = None
    s = resolve_settings(settings, src_cfg)
    torch.manual_seed(s.seed)
    rows, stats, calib_source = calibrate(model, tokenizer, s)
    d = head_dim_of(src_cfg)
    pairs = partial_rope.select_pairs(
        s.rope_strategy, src_cfg.num_hidden_layers, src_cfg.num_key_value_heads, d, s.rope_pairs,
        stats.pair_norms() if stats is not None and s.rope_strategy == "2-norm" else None,
    )
    latents, ranks = latent_factors(model, s, pairs, stats, progress)
    config = mla_config(src_cfg, s, pairs, source_info.name, ranks)
    mla = LlamaMLAForCausalLM(config).to(torch.float32).eval()
    # Everything outside attention keeps its name and value.
    own = mla.state_dict()
    copied = {k: v for k, v in model.state_dict().items() if k in own and ".self_attn." not in k}
    mla.load_state_dict(copied, strict=False)
    if config.tie_word_embeddings:
        mla.tie_weights()
    layers = zip(model.model.layers, mla.model.layers, latents, strict=True)
    for i, (src_layer, dst_layer, latent) in enumerate(layers):
        convert_layer(src_layer.self_attn, dst_layer.self_attn, pairs[i], latent)
    refits, refit_note = None, None
    if s.refit == "output" and (need := refit.enough_tokens(mla, rows.numel())) is not None:
        refit_note = (f"the output refit was skipped: {rows.numel()} calibration tokens, fewer than the {need} it "
                      f"needs (fewer made the model worse): raise `calib_tokens`")
    elif s.refit == "output":
        refits = refit.refit_outputs(model, mla, rows, progress=progress)
    energies = [energy for _, _, energy in latents]
    out_dtype = TORCH_DTYPES[s.dtype if s.dtype != "auto" else source_info.dtype or source_dtype(src_cfg)]
    mla = mla.to(out_dtype)
    s.dtype = str(out_dtype).replace("torch.", "")
    kv = kv_bytes_per_token(config, torch.finfo(out_dtype).bits // 8)
    report = ConversionReport(
        settings=s,
        kv_cache=KVCacheSize(
            bytes_per_token_before=kv["before"],
            bytes_per_token_after=kv["after"],
            reduction=kv["reduction"],
            values_per_token_per_layer_before=2 * src_cfg.num_key_value_heads * d,
            values_per_token_per_layer_after=s.kv_lora_rank + src_cfg.num_key_value_heads * 2 * s.rope_pairs,
        ),
        svd_retained_energy=energies,
        kv_lora_ranks=ranks,
        output_refit=refits,
        rope_pairs=pairs,
        calibration=calib_source,
        source=source_info,
        source_sliding_window=sliding,
        seconds=round(time.time() - started, 2),
    )
    if sliding:
        report.warnings.append(f"the source uses a {sliding}-token sliding window; the MLA model attends to the "
                               "whole context (identical up to that length)")
    if refit_note:
        report.warnings.append(refit_note)
    if calib_source is not None and calib_source.kind == "text" and calib_source.note:
        report.warnings.append(calib_source.note)
    if tokenizer is None:
        report.warnings.append("the source has no tokenizer, so neither has this checkpoint: copy the source's "
                               "tokenizer files into it")
    return mla, report


def save_checkpoint(model, tokenizer, report: ConversionReport, out: str | Path, overwrite: bool = False) -> Path:
    """Write weights, config, remote code, tokenizer and conversion.json; all or nothing
    (an interrupted run leaves no partial checkpoint, and an existing one stays until replaced).
    Only an empty directory or a checkpoint (conversion.json) is replaced (`common.check_output_dir`)."""
    out = check_output_dir(out, marker=ConversionReport.FILE, overwrite=overwrite)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        for name in REMOTE_CODE_FILES:  # verbatim: a checkpoint loads without mla-zoo installed
            shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.write(tmp)
    return out
