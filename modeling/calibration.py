"""Calibration data and the statistics the converter gathers from it.

Two statistics are read off the SOURCE model while it runs over calibration tokens:
* per-pair norms of queries and keys before RoPE (for the 2-norm partial-RoPE strategy);
* the second moment X X^T of each attention block's input (for activation-aware SVD).
The calibration data is a text, or the token ids that `mla-zoo synth-data` sampled from the teacher (data-free,
and the conversion then loses less far from any one text's domain: bench/RESULTS.md). Without either, a few of
the model's own samples are drawn here, and the report says so; sampling needs token ids only, so a source
without a tokenizer calibrates that way too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import ConversionError, progress_bar, synth_shards

CHAT_PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "What are some tips for learning a new language?",
    "Write a paragraph about the history of the printing press.",
    "Describe your ideal weekend.",
    "How does a computer store information?",
    "Why is the sky blue?",
    "Give me a recipe for a simple vegetable soup.",
]


def text_batches(tokenizer, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """Tokenise `text` and cut the first n_tokens into rows of seq_len: [rows, seq_len]."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 2:
        raise ConversionError("`calib_text` gives fewer than 2 tokens")
    return _cut_rows(ids[:n_tokens], seq_len)


def _cut_rows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Token ids [n] -> whole rows of seq_len (at most n long): [rows, seq_len]."""
    seq_len = min(seq_len, ids.numel())
    rows = ids.numel() // seq_len
    return ids[: rows * seq_len].view(rows, seq_len)


def synth_rows(directory: str | Path, n_tokens: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The first n_tokens of a `mla-zoo synth-data` directory (its `shard-*.safetensors`: input_ids and, where
    rows stopped early, attention_mask), padding dropped, cut into rows of seq_len: [rows, seq_len]."""
    from safetensors.torch import load_file

    files = synth_shards(directory)
    if not files:
        raise ConversionError(f"`calib_text` names a directory without `mla-zoo synth-data` shards "
                              f"(shard-*.safetensors): {directory}")
    pieces, have = [], 0
    for f in files:
        shard = load_file(f)
        if "input_ids" not in shard:
            raise ConversionError(f"`calib_text`: {f} is not a synth-data shard (no input_ids tensor)")
        ids, mask = shard["input_ids"], shard.get("attention_mask")  # [rows, len]
        for i in range(ids.shape[0]):
            row = ids[i] if mask is None else ids[i][mask[i].bool()]
            pieces.append(row)
            have += row.numel()
        if have >= n_tokens:
            break
    ids = torch.cat(pieces)[:n_tokens]  # [n]
    if ids.numel() < 2:
        raise ConversionError(f"`calib_text` gives fewer than 2 tokens: {directory}")
    if int(ids.max()) >= vocab_size:
        raise ConversionError(f"`calib_text` {directory} holds token id {int(ids.max())}, beyond this model's "
                              f"vocabulary of {vocab_size}: it was sampled from another model")
    return _cut_rows(ids.long(), seq_len)


def _sampling_prompts(model, tokenizer, batch: int) -> dict:
    """The prompts of one sampling batch: the chat prompts in the model's chat format if it has one,
    else BOS; without a tokenizer, the BOS token id (a random token id when the model has none)."""
    if tokenizer is None:
        bos = model.config.bos_token_id
        bos = bos[0] if isinstance(bos, list) else bos
        ids = (torch.randint(0, model.config.vocab_size, (batch, 1)) if bos is None
               else torch.full((batch, 1), int(bos)))  # [batch, 1]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(tokenizer, "chat_template", None):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in CHAT_PROMPTS[:batch]
        ]
    else:
        prompts = [tokenizer.bos_token or ""] * batch
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))


def _pad_id(model, tokenizer) -> int:
    if tokenizer is not None:
        return tokenizer.pad_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    return (pad[0] if isinstance(pad, list) else pad) or 0


@torch.no_grad()
def self_samples(model, tokenizer, n_tokens: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Data-free calibration: ceil(n_tokens / seq_len) rows sampled from the model itself, in batches
    of at most len(CHAT_PROMPTS) rows (`tokenizer` may be None: see `_sampling_prompts`)."""
    torch.manual_seed(seed)
    wanted = max(1, -(-n_tokens // seq_len))
    rows: list[torch.Tensor] = []
    done = 0
    while done < wanted:
        batch = min(len(CHAT_PROMPTS), wanted - done)
        enc = _sampling_prompts(model, tokenizer, batch)
        out = model.generate(
            **enc, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=seq_len,
            min_new_tokens=seq_len, pad_token_id=_pad_id(model, tokenizer),
        )
        rows.append(out[:, -seq_len:])  # [batch, seq_len] of generated tokens
        done += batch
    return torch.cat(rows)  # [rows, seq_len]


@dataclass
class AttentionStats:
    """Running sums per layer: q/k pair norms and the attention input's second moment."""

    q_norm_sum: list = field(default_factory=list)  # [n_heads, half] per layer
    k_norm_sum: list = field(default_factory=list)  # [n_kv, half] per layer
    xxt: list = field(default_factory=list)  # [hidden, hidden] float64 per layer
    tokens: int = 0

    def pair_norms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(q / self.tokens, k / self.tokens) for q, k in zip(self.q_norm_sum, self.k_norm_sum, strict=True)]

    def second_moment(self, layer: int) -> torch.Tensor:
        """E[x x^T] of one layer's attention input, [hidden, hidden] float64 (one layer at a time: at 8B
        scale each is 128 MiB)."""
        return self.xxt[layer] / self.tokens


def _pair_norm(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum over tokens of ||(x_i, x_{i+half})|| per head and pair: [heads, half]."""
    x = x.reshape(-1, heads, 2, x.shape[-1] // heads // 2).float()  # [N, heads, 2, half]
    return x.pow(2).sum(dim=2).sqrt().sum(dim=0)


@torch.no_grad()
def collect_stats(model, batches: torch.Tensor, want_moments: bool, batch_size: int = 4) -> AttentionStats:
    """Run the source model over calibration rows and accumulate `AttentionStats` via hooks."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = model.model.layers
    stats = AttentionStats(
        q_norm_sum=[torch.zeros(cfg.num_attention_heads, head_dim // 2) for _ in layers],
        k_norm_sum=[torch.zeros(cfg.num_key_value_heads, head_dim // 2) for _ in layers],
        xxt=[torch.zeros(cfg.hidden_size, cfg.hidden_size, dtype=torch.float64) for _ in layers]
        if want_moments else [],
    )
    hooks = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn

        def q_hook(_m, _inp, out, i=i):
            stats.q_norm_sum[i] += _pair_norm(out, cfg.num_attention_heads)

        def k_hook(_m, _inp, out, i=i):
            stats.k_norm_sum[i] += _pair_norm(out, cfg.num_key_value_heads)

        hooks += [attn.q_proj.register_forward_hook(q_hook), attn.k_proj.register_forward_hook(k_hook)]
        if want_moments:
            def x_hook(_m, inp, i=i):
                # fp64: hidden states have outlier dims (eigenvalues 1e4x the mean), and fp32 rounding
                # of X^T X then leaves the small directions negative, breaking the whitening
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()  # [N, hidden]
                stats.xxt[i] += x.T @ x

            hooks.append(attn.q_proj.register_forward_pre_hook(x_hook))
    try:
        for start in progress_bar(range(0, len(batches), batch_size), desc="calibration", unit="batch", leave=False):
            rows = batches[start : start + batch_size].to(model.device)
            model(input_ids=rows, use_cache=False)
            stats.tokens += rows.numel()
    finally:
        for h in hooks:
            h.remove()
    return stats
