"""Plain references the fast paths are checked against (float64 attention, unchunked KL).

`partial_rope_attention` is what MHA2MLA's first step means, written directly on the SOURCE
model's weights with no permutation, no latent and no cache: ordinary GQA attention in which RoPE
rotates only the kept pairs of each head and leaves the other dims as they are.
"""

from __future__ import annotations

import torch


def partial_rope_attention(attn, x: torch.Tensor, positions: torch.Tensor, pairs: list[list[int]],
                           inv_freq: torch.Tensor) -> torch.Tensor:
    """Source attention block with partial RoPE, float64, causal. x: [B, S, hidden] -> [B, S, hidden]."""
    cfg = attn.config
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = attn.head_dim
    half = d // 2
    x = x.double()

    def proj(linear, heads):
        y = x @ linear.weight.double().T
        if linear.bias is not None:
            y = y + linear.bias.double()
        return y.view(*x.shape[:2], heads, d)  # [B, S, heads, d]

    q, k, v = proj(attn.q_proj, n_h), proj(attn.k_proj, n_kv), proj(attn.v_proj, n_kv)
    angles = positions.double()[..., None] * inv_freq.double()  # [B, S, half]
    cos, sin = angles.cos(), angles.sin()

    def rotate(t, head_pairs):  # t: [B, S, d] one head; rotate the kept pairs only
        t = t.clone()
        for i in head_pairs:
            a, b = t[..., i].clone(), t[..., i + half].clone()
            t[..., i] = a * cos[..., i] - b * sin[..., i]
            t[..., i + half] = b * cos[..., i] + a * sin[..., i]
        return t

    group = n_h // n_kv
    out = torch.zeros(*x.shape[:2], n_h, d, dtype=torch.float64)
    s = x.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for h in range(n_h):
        g = h // group
        qh, kh = rotate(q[:, :, h], pairs[g]), rotate(k[:, :, g], pairs[g])
        scores = (qh @ kh.transpose(1, 2)) * d**-0.5  # [B, S, S]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, g]
    y = out.reshape(*x.shape[:2], n_h * d) @ attn.o_proj.weight.double().T
    if attn.o_proj.bias is not None:
        y = y + attn.o_proj.bias.double()
    return y


def reference_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Unchunked KL(teacher || student) * T^2, mean over positions: what the chunked distillation
    loss must equal. logits: [..., vocab]."""
    t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    s = torch.log_softmax(student_logits / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


@torch.no_grad()
def two_pass_energy_latents(w_layers: list[torch.Tensor], moments: list[torch.Tensor] | None, kv_lora_rank: int,
                            step: int) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The converter's energy allocation as it was first written, in two passes: the spectrum of each layer's
    stacked matrix W (whitened: W L) from `svdvals`, the ranks, then each layer factorised again from scratch
    (eigh, SVD). Returns (ranks, [(up, down)] per layer), float64; the single-pass converter must give exactly
    these (torch.equal)."""
    from mla_zoo.modeling import rank_allocation

    def whitening(c):
        damp = 1e-6 * c.diagonal().mean().clamp_min(1e-12)
        evals, q = torch.linalg.eigh(c + damp * torch.eye(c.shape[0], dtype=c.dtype))
        return q, evals.clamp_min(damp).sqrt()

    def whitened(w, c):  # W L, and L's factors (None: not whitened)
        if c is None:
            return w, None
        q, root = whitening(c.double())
        return w @ (q * root), (q, root)

    spectra = [torch.linalg.svdvals(whitened(w, None if moments is None else moments[i])[0])
               for i, w in enumerate(w_layers)]
    ranks = rank_allocation.allocate(spectra, kv_lora_rank, "energy", step=step)
    factors = []
    for i, (w, r) in enumerate(zip(w_layers, ranks, strict=True)):
        wl, qr = whitened(w, None if moments is None else moments[i])
        u, s, vh = torch.linalg.svd(wl, full_matrices=False)
        root = s[:r].sqrt()
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        if qr is not None:
            down = (down / qr[1]) @ qr[0].T
        factors.append((up, down))
    return ranks, factors
