"""Low-rank factorisation of the NoPE-key and value projections into one shared latent.

All functions take W [rows, hidden] (the stacked projections; rows ordered per KV head as
[k_nope_g; v_g]) and return (up [rows, r], down [r, hidden], retained energy), with up @ down ~ W:
down is the new `kv_a_proj` (hidden -> latent, what gets cached) and up the new `kv_b_proj`.

Where the singular values go: W = U S V^T is split symmetrically, up = U_r sqrt(S_r) and
down = sqrt(S_r) V_r^T. The product is the same wherever S goes; the balanced split keeps both
factors on the same scale, which fine-tuning (and bf16) likes. (The official MHA2MLA code puts
all of S into up, down = V^T.)

* joint: one SVD of [K_nope; V] (MHA2MLA's best): keys and values share every latent dim.
* split: separate SVDs of K_nope and V, half of the latent each (the paper's ablation).
* whitened: activation-aware joint SVD. With C = E[x x^T] = L L^T over calibration inputs,
  ||(W - W')X||_F^2 = ||(W - W')L||_F^2, so the best rank-r W' factorises W L instead:
  W L = U S V^T, W' = U_r S_r V_r^T L^{-1}; up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T L^{-1}.
  It keeps the directions the inputs actually use rather than those of largest weight norm.
* output-aware: whitened, and each row block weighted by what reads it: R = blockdiag(R_b), the
  best rank-r W' under ||R (W - W') L||_F factorises R W L; up = R^{-1} U_r sqrt(S_r). The converter
  (`convert.output_weights`) weights a KV head's value rows by the output projection that reads them.

joint and whitened are `factorize(W[, C]).truncate(rank)`: the converter keeps a layer's `Factorization`
when the rank is not known yet (per-layer rank allocation reads its spectrum first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factorization:
    """The thin SVD of one stacked projection, W = U S V^T (whitened: of W L), before truncation.

    Rank allocation reads the spectrum `s` of every layer, then each layer is truncated at its own rank:
    one eigendecomposition and one SVD per layer, whatever the rank.
    """

    u: torch.Tensor  # [rows, k], k = min(rows, hidden)
    s: torch.Tensor  # [k], descending
    vh: torch.Tensor  # [k, hidden]
    whitening: tuple[torch.Tensor, torch.Tensor] | None = None  # (Q [hidden, hidden], root [hidden]): L = Q diag(root)
    unweight: torch.Tensor | None = None  # R^{-1} [rows, rows] of a row-weighted factorisation (output-aware)

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(up [rows, rank], down [rank, hidden], retained energy): the best rank-`rank` up @ down ~ W."""
        root = self.s[:rank].sqrt()
        energy = float((self.s[:rank] ** 2).sum() / (self.s**2).sum().clamp_min(1e-300))
        up, down = self.u[:, :rank] * root, root[:, None] * self.vh[:rank]
        if self.whitening is not None:  # down @ L^{-1} = down diag(1/root) Q^T
            q, l_root = self.whitening
            down = (down / l_root) @ q.T
        if self.unweight is not None:  # R^{-1} up: the factors of W itself
            up = self.unweight @ up
        return up, down, energy


def _whitening(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, root) with C + damp I = L L^T, L = Q diag(root).

    The square root of C is taken by eigendecomposition, C = Q diag(l) Q^T, L = Q diag(sqrt(l)), which
    (unlike a Cholesky factor) exists also when fewer calibration tokens than hidden dims make C
    singular; the damping keeps unseen directions from being divided by zero.
    """
    c = second_moment.double()
    damp = 1e-6 * c.diagonal().mean().clamp_min(1e-12)
    evals, q = torch.linalg.eigh(c + damp * torch.eye(c.shape[0], dtype=c.dtype))
    return q, evals.clamp_min(damp).sqrt()


@torch.no_grad()
def factorize(w: torch.Tensor, second_moment: torch.Tensor | None = None,
              row_weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> Factorization:
    """The SVD of W [rows, hidden] (float64); with `second_moment` (E[x x^T] of the block's input,
    [hidden, hidden]) the activation-aware one, of W L; with `row_weights` (R, R^{-1}) [rows, rows], of R W L."""
    w = w.double()
    if row_weights is not None:
        w = row_weights[0].double() @ w
    if second_moment is None:
        f = Factorization(*torch.linalg.svd(w, full_matrices=False))
    else:
        q, root = _whitening(second_moment)
        u, s, vh = torch.linalg.svd(w @ (q * root), full_matrices=False)  # (R) W L = U S V^T
        f = Factorization(u, s, vh, (q, root))
    f.unweight = None if row_weights is None else row_weights[1].double()
    return f


def psd_root(m: torch.Tensor, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{1/2}, M^{-1/2}) of a symmetric PSD matrix by eigendecomposition; eigenvalues below `floor` x the
    largest are raised to it (a direction nothing reads keeps a small weight, and stays invertible)."""
    e, q = torch.linalg.eigh(m.double())
    e = e.clamp_min(floor * e.max().clamp_min(1e-300))
    return (q * e.sqrt()) @ q.T, (q / e.sqrt()) @ q.T


def joint(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    return factorize(w).truncate(rank)


def whitened(w: torch.Tensor, rank: int, second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Activation-aware joint SVD; `second_moment` is E[x x^T] of the block's input, [hidden, hidden]."""
    return factorize(w, second_moment).truncate(rank)


def split(
    w: torch.Tensor, rank: int, num_kv_heads: int, nope_dim: int, v_dim: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Separate SVDs of the key and value rows, each with half of the latent (values get the rest)."""
    rows = w.view(num_kv_heads, nope_dim + v_dim, -1)
    k, v = rows[:, :nope_dim].reshape(-1, w.shape[1]), rows[:, nope_dim:].reshape(-1, w.shape[1])
    k_max, v_max = min(k.shape) if nope_dim else 0, min(v.shape)
    rank_v = min(rank - min(rank // 2, k_max), v_max)  # half each; a side that cannot use its half
    rank_k = rank - rank_v  # gives the rest to the other
    if rank_k > k_max:
        raise ValueError(f"rank {rank} exceeds what split SVD can use ({k_max + v_max})")
    up = torch.zeros(num_kv_heads, nope_dim + v_dim, rank, dtype=torch.float64)
    downs, kept, total = [], 0.0, 0.0
    for part, r, sl, cols in ((k, rank_k, slice(0, nope_dim), slice(0, rank_k)),
                              (v, rank_v, slice(nope_dim, None), slice(rank_k, rank))):
        if r == 0:
            continue
        u_p, d_p, e_p = factorize(part).truncate(r)
        up[:, sl, cols] = u_p.view(num_kv_heads, -1, r)
        downs.append(d_p)
        norm2 = float(part.double().pow(2).sum())
        kept, total = kept + e_p * norm2, total + norm2
    return up.view(-1, rank), torch.cat(downs), kept / max(total, 1e-300)
