"""The output refit: each converted attention block's output projection, re-solved in closed form.

After the low-rank step every MLA block sees different attention scores (partial RoPE, compressed NoPE keys) and
reads compressed values, so its output drifts from the original block's, and the drift grows down the stack
(SmolLM2-135M at d_kv=32: in the middle layers the error is as large as the output itself). The output projection
W_o is linear in what it reads, so the best W_o for given head outputs is a least-squares problem. Layer by layer,
with the converted model's OWN inputs (the earlier layers already refit, as in GPTQ's sequential mode):

    x_i = the concatenated head outputs of the MLA block at calibration token i         [heads * d_v]
    y_i = the original block's attention output at token i, on the original's inputs    [hidden]
    W_o = argmin_W sum_i ||W x_i - y_i||^2 + lam ||W - W_o,source||_F^2,   lam = RIDGE * mean(diag(X^T X))
        = (Y^T X + lam W_o,source) (X^T X + lam I)^{-1}

The target is the original's trajectory, so a layer also makes up for what the earlier layers left. The ridge
pulls W_o toward the source's, whose output projection serves every domain: a weak one fits the calibration
sample's domains at the others' expense (code, one-shot: 250 -> 181 at lam 0.01 x mean diag, -> 138 at 0.3;
bench/RESULTS.md). The latent, the cache and the model
code are unchanged; only `o_proj` is written.

Both models run one decoder layer at a time, called with exactly the arguments each model's own forward gives its
first layer (caught as GPTQ / AWQ do), so the source's masks and RoPE are its own on every transformers version.
"""

from __future__ import annotations

import torch

from .common import progress_bar
from .convert_schema import LayerRefit

RIDGE = 0.3  # lam / mean(diag(X^T X)); SmolLM2-135M, d_kv=32: chosen on code, technical, fiction (bench/RESULTS.md)
# the least calibration tokens per o_proj input: SmolLM2 (576 inputs) with 512 fiction tokens came out worse than no
# refit (prose perplexity 284 -> 348, code 673 -> 1,073); with 2,048 and more it is better (tests/test_real_model.py)
MIN_TOKENS_PER_INPUT = 2


def enough_tokens(mla, tokens: int) -> int | None:
    """None when `tokens` calibration tokens are enough to refit `mla`'s output projections, else how many are."""
    need = MIN_TOKENS_PER_INPUT * max(layer.self_attn.o_proj.in_features for layer in mla.model.layers)
    return None if tokens >= need else need


class _Caught(Exception):
    """Raised by the hook that catches a model's first decoder-layer call (its arguments are kept)."""


def first_layer_calls(model, rows: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """Per batch of calibration rows, the (args, kwargs) the model's forward passes its first decoder layer
    (the embeddings, masks, RoPE tables, ...); the rest of the forward is skipped."""
    calls = []

    def catch(_module, args, kwargs):
        calls.append((args, kwargs))
        raise _Caught

    hook = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, rows.shape[0], batch_size):
            try:
                model.model(input_ids=rows[start : start + batch_size].to(model.device), use_cache=False)
            except _Caught:
                pass
    finally:
        hook.remove()
    return calls


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_layer(layer, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)


def _capture(module, pre: bool):
    """A hook on `module` keeping its input (pre) or output in `box[0]`; returns (handle, box)."""
    box: list = [None]
    if pre:
        handle = module.register_forward_pre_hook(lambda _m, args: box.__setitem__(0, args[0]))
    else:
        handle = module.register_forward_hook(
            lambda _m, _a, out: box.__setitem__(0, out[0] if isinstance(out, tuple) else out))
    return handle, box


def ridge_solve(xtx: torch.Tensor, ytx: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """(Y^T X + lam W0)(X^T X + lam I)^{-1}, lam = ridge * mean(diag(X^T X)); float64 [out, in]."""
    lam = ridge * float(xtx.diagonal().mean())
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(xtx + lam * eye, (ytx + lam * w0).T).T  # X^T X + lam I is symmetric


def relative_error(w: torch.Tensor, xtx: torch.Tensor, ytx: torch.Tensor, yty: float) -> float:
    """||W X - Y||^2 / ||Y||^2 from the sums X^T X [in, in], Y^T X [out, in], ||Y||^2."""
    return float(yty - 2 * (w * ytx).sum() + (w @ xtx * w).sum()) / max(yty, 1e-300)


@torch.no_grad()
def refit_outputs(source, mla, rows: torch.Tensor, ridge: float = RIDGE, batch_size: int = 4,
                  progress: bool = False) -> list[LayerRefit]:
    """Re-solve every MLA block's `o_proj` (in place) to reproduce the source's attention outputs (module doc).

    source: the original *ForCausalLM; mla: its conversion (float32 or float64); rows: calibration token ids
    [n, seq_len]. Holds two sets of hidden states (n * seq_len * hidden each) and one layer's sums.
    """
    src_calls = first_layer_calls(source, rows, batch_size)
    mla_calls = first_layer_calls(mla, rows, batch_size)
    src_h = [_hidden(*c) for c in src_calls]  # [b, S, hidden] per batch
    mla_h = [_hidden(*c).to(next(mla.parameters()).dtype) for c in mla_calls]
    refits = []
    pairs = zip(source.model.layers, mla.model.layers, strict=True)
    for src_layer, mla_layer in progress_bar(pairs, enabled=progress, total=len(mla.model.layers),
                                              desc="refitting output projections", unit="layer"):
        o_proj = mla_layer.self_attn.o_proj
        xtx = torch.zeros(o_proj.in_features, o_proj.in_features, dtype=torch.float64)
        ytx = torch.zeros(o_proj.out_features, o_proj.in_features, dtype=torch.float64)
        yty = 0.0
        src_hook, target = _capture(src_layer.self_attn, pre=False)
        mla_hook, heads = _capture(o_proj, pre=True)
        try:
            for b, (src_call, mla_call) in enumerate(zip(src_calls, mla_calls, strict=True)):
                src_h[b] = _run_layer(src_layer, _with_hidden(src_call, src_h[b]))  # and its attention output
                _run_layer(mla_layer, _with_hidden(mla_call, mla_h[b]))  # for the heads' outputs alone
                y = target[0].reshape(-1, o_proj.out_features).double().cpu()  # [tokens, hidden]
                x = heads[0].reshape(-1, o_proj.in_features).double().cpu()  # [tokens, heads * d_v]
                if o_proj.bias is not None:
                    y = y - o_proj.bias.double().cpu()
                xtx += x.T @ x
                ytx += y.T @ x
                yty += float((y * y).sum())
        finally:
            src_hook.remove()
            mla_hook.remove()
        w0 = o_proj.weight.double().cpu()
        w = ridge_solve(xtx, ytx, w0, ridge)
        refits.append(LayerRefit(relative_error(w0, xtx, ytx, yty), relative_error(w, xtx, ytx, yty)))
        o_proj.weight.copy_(w.to(o_proj.weight))
        for b, mla_call in enumerate(mla_calls):  # the next layer's inputs, through the refit projection
            mla_h[b] = _run_layer(mla_layer, _with_hidden(mla_call, mla_h[b]))
    return refits
