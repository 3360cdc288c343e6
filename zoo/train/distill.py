"""Distillation losses for recovering an MLA conversion from its original model.

Two losses, one per fine-tuning stage:

* `distill_loss` (global stage): KL(teacher || student) on next-token distributions at
  temperature T (scaled by T^2), optionally plus next-token cross-entropy, from the two models'
  final hidden states. Full logits of the whole batch are never held at once. Three ways, one result:
  - `fused` (the KL alone, heads without bias): `FusedLinearKL`, the LM heads fused with the loss:
    chunk by chunk the forward computes the loss AND its gradients with respect to the hidden states
    and the student head, so the backward only scales them: no logits kept, none recomputed.
    On CUDA with Liger-Kernel installed, its `LigerFusedLinearJSD` (beta = 0: forward KL, Triton)
    does the same (`liger`); elsewhere the plain-torch version below.
  - `chunked`: each chunk applies the heads, takes log-softmax in fp32, is reduced to a scalar and
    wrapped in `torch.utils.checkpoint` (its logits are recomputed in backward). Also for the CE term.
  `kl_impl` picks one (`auto`: liger where it runs, else fused when it applies, else chunked);
  tests check each against the unchunked float64 reference.
* `layerwise_loss` (layer-wise stage): every converted attention block against the original block
  on the teacher's own hidden states, all layers at once as independent problems:
  sum_l ||student_l - target_l||^2 / ||target_l||^2 (both as means over positions and dims).
  `teacher_layer_io` records the inputs and attention outputs of the teacher's layers with hooks
  during one ordinary forward, so the targets are exactly what the teacher computes (its own
  causal mask and RoPE included).
"""

from __future__ import annotations

from functools import cache, partial

import torch
import torch.nn.functional as F
from mla_zoo.modeling.common import FinetuneError
from torch import nn
from torch.utils.checkpoint import checkpoint

from .settings import KL_CHUNK


def _chunk_loss(s_h, t_h, targets, student_head, teacher_head, temperature, want_ce):
    """(sum of KL over the chunk's positions, sum of CE over its labelled positions), fp32."""
    s_logits = student_head(s_h).float()  # [n, V]
    with torch.no_grad():
        t_logp = F.log_softmax(teacher_head(t_h).float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    if want_ce:
        ce = F.cross_entropy(s_logits, targets, ignore_index=-100, reduction="sum")
    else:
        ce = s_logits.new_zeros(())
    return kl, ce


def kl_chunk(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, scale: float):
    """One chunk of `FusedLinearKL`: the KL summed over its rows and d loss / d z_s, from both logits.

    z_s, z_t: [c, V] student / teacher logits (the matmuls' dtype). The softmaxes run in fp32 (fp64 for fp64
    logits). Returns (sum over rows of KL(softmax(z_t / T) || softmax(z_s / T)) [], g [c, V] in z_s's dtype)
    with g = scale * (softmax(z_s / T) - softmax(z_t / T)). On CUDA `FusedLinearKL` runs it compiled
    (`compiled_kl_chunk`): inductor's fused kernels instead of ten eager passes over [c, V] (the loss of a
    32 x 1024 step: 92 -> 26 ms on an H100, bench/RESULTS.md).
    """
    acc = torch.promote_types(z_s.dtype, torch.float32)
    t_logp = F.log_softmax(z_t.to(acc) / temperature, dim=-1)  # [c, V]
    s_logp = F.log_softmax(z_s.to(acc) / temperature, dim=-1)  # [c, V]
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - s_logp)).sum()  # []
    g = (s_logp.exp() - t_p) * scale  # [c, V]
    return kl, g.to(z_s.dtype)


@cache
def compiled_kl_chunk():
    """`kl_chunk` under torch.compile (a second chunk length, e.g. a batch's shorter last chunk, compiles it once
    more with dynamic shapes)."""
    return torch.compile(kl_chunk, fullgraph=True)


COMPILE_KL_CHUNK = True  # whether CUDA runs use `compiled_kl_chunk` (bench/train_step_gpu.py times both)


class FusedLinearKL(torch.autograd.Function):
    """mean over rows of KL(softmax(t_h W_t^T / T) || softmax(s_h W_s^T / T)) * T^2, with the LM
    head fused into the loss: the forward computes, chunk by chunk, the loss and its gradients with
    respect to s_h and W_s; the backward scales them by the incoming gradient. fp32 softmax
    (`kl_chunk`); the matmuls in the inputs' dtype, or autocast's (bf16 under the Trainer's bf16).
    s_h: [n, H], s_w: [V, H], t_h: [n, H'], t_w: [V, H'].

    d/dz_s of T^2 * KL at logits z_s = T * (softmax(z_s / T) - softmax(z_t / T)), so with g = that / n:
    grad s_h = g W_s and grad W_s = g^T s_h.
    """

    @staticmethod
    def forward(ctx, s_h, s_w, t_h, t_w, temperature: float, chunk_size: int):
        n = s_h.shape[0]
        acc = torch.promote_types(s_h.dtype, torch.float32)  # loss and grad_w accumulate in fp32 (fp64 for fp64)
        grad_h = torch.empty_like(s_h)
        grad_w = torch.zeros_like(s_w, dtype=acc) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=s_h.device)
        chunk = compiled_kl_chunk() if COMPILE_KL_CHUNK and s_h.is_cuda else kl_chunk
        for start in range(0, n, chunk_size):
            h = s_h[start : start + chunk_size]  # [c, H]
            z_s = h @ s_w.T  # [c, V]
            z_t = t_h[start : start + chunk_size] @ t_w.T  # [c, V]
            kl, g = chunk(z_s, z_t, temperature, temperature / n)  # [], [c, V] d loss / d logits
            total += kl
            grad_h[start : start + chunk_size] = (g @ s_w).to(s_h.dtype)  # [c, H]
            if grad_w is not None:
                grad_w += g.T @ h  # [V, H]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = s_w.dtype
        return total / n * temperature**2

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None, None, None


def liger_available(device: torch.device) -> bool:
    """Whether Liger-Kernel's fused linear JSD can run here (CUDA, triton and liger-kernel installed)."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers.fused_linear_jsd  # noqa: F401
    except ImportError:
        return False
    return True


def fused_kl(s_h, s_w, t_h, t_w, temperature: float, chunk_size: int, impl: str) -> torch.Tensor:
    """The fused KL of `FusedLinearKL` (impl "fused") or Liger-Kernel's (impl "liger")."""
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        # beta = 0: forward KL, sum_v p_t (log p_t - log p_s) / rows, logits / T, no T^2 of its own
        return LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)(s_h, s_w, t_h, t_w, None) * temperature**2
    return FusedLinearKL.apply(s_h, s_w, t_h, t_w, float(temperature), chunk_size)


def pick_kl_impl(impl: str, student_head: nn.Module, teacher_head: nn.Module, ce_weight: float,
                 device: torch.device) -> str:
    """The loss implementation `distill_loss` uses: `auto` takes fused (on an H100 at batch 32 x 1024 its step
    ran 343 ms against liger's 386, bench/RESULTS.md); the CE term and heads with a bias need the chunked path."""
    if impl == "chunked" or ce_weight > 0 or student_head.bias is not None or teacher_head.bias is not None:
        return "chunked"
    if impl == "auto":
        return "fused"
    if impl == "liger" and not liger_available(device):
        raise FinetuneError("`kl_impl` liger needs CUDA and liger-kernel (pip install liger-kernel); use fused")
    return impl


def distill_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    input_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int = KL_CHUNK,
    use_checkpoint: bool = True,
    impl: str = "chunked",
) -> tuple[torch.Tensor, dict]:
    """Chunked KL(teacher || student) * T^2 (+ ce_weight * next-token CE), means over positions.

    student_hidden: [B, S, H] final (post-norm) hidden states of the student, with grad
    teacher_hidden: [B, S, H'] the teacher's (no grad needed)
    student_head, teacher_head: the LM heads (hidden -> vocab); the vocab sizes must match
    input_ids: [B, S] the tokens, needed only for the CE term (position i predicts token i+1)
    mask: [B, S] 1 = real token, 0 = padding (excluded), or None
    impl: auto | fused | liger | chunked (`pick_kl_impl`)
    Returns (loss, {"kl": ..., "ce": ...}) with detached parts.
    """
    b, s, _ = student_hidden.shape
    want_ce = ce_weight > 0
    if want_ce and input_ids is None:
        raise ValueError("the CE term needs input_ids")
    s_flat = student_hidden.reshape(b * s, -1)
    t_flat = teacher_hidden.reshape(b * s, -1)
    if want_ce:
        targets = torch.full_like(input_ids, -100)
        targets[:, :-1] = input_ids[:, 1:]
        if mask is not None:
            targets[:, :-1][mask[:, 1:] == 0] = -100
        targets = targets.reshape(-1)
    else:
        targets = torch.zeros(b * s, dtype=torch.long, device=student_hidden.device)
    if mask is not None:
        keep = mask.reshape(-1).nonzero().squeeze(1)
        s_flat, t_flat, targets = s_flat[keep], t_flat[keep], targets[keep]
    n = s_flat.shape[0]
    if n == 0:
        raise ValueError("no unmasked positions to distill on")
    impl = pick_kl_impl(impl, student_head, teacher_head, ce_weight, s_flat.device)
    if impl != "chunked":
        kl = fused_kl(s_flat, student_head.weight, t_flat.to(teacher_head.weight.dtype), teacher_head.weight,
                      float(temperature), chunk_size, impl)
        return kl, {"kl": kl.detach()}
    fn = partial(_chunk_loss, student_head=student_head, teacher_head=teacher_head,
                 temperature=float(temperature), want_ce=want_ce)
    recompute = use_checkpoint and torch.is_grad_enabled()
    kl_sum = ce_sum = None
    for start in range(0, n, chunk_size):
        part = (s_flat[start : start + chunk_size], t_flat[start : start + chunk_size],
                targets[start : start + chunk_size])
        kl, ce = checkpoint(fn, *part, use_reentrant=False) if recompute else fn(*part)
        kl_sum = kl if kl_sum is None else kl_sum + kl
        ce_sum = ce if ce_sum is None else ce_sum + ce
    kl = kl_sum / n * temperature**2
    loss = kl
    parts = {"kl": kl.detach()}
    if want_ce:
        ce = ce_sum / (targets != -100).sum().clamp(min=1)
        loss = loss + ce_weight * ce
        parts["ce"] = ce.detach()
    return loss, parts


def on_policy_step(share: float, seed: int, step: int) -> bool:
    """Whether global step `step` trains on the student's own rows (a fixed draw per step and seed,
    so that a resumed run makes the same choices)."""
    import random

    return share > 0 and random.Random(seed * 1_000_003 + step).random() < share


@torch.no_grad()
def student_rows(student, ids: torch.Tensor, prefix: int, temperature: float = 1.0) -> torch.Tensor:
    """On-policy rows (GKD, MiniLLM): each row's first `prefix` tokens, continued by the student's own
    samples to the row's length (no early stop: rows are packed streams). ids: [B, S] -> [B, S]."""
    was_training = student.training
    student.eval()
    new = ids.shape[1] - prefix
    out = student.generate(input_ids=ids[:, :prefix], attention_mask=torch.ones_like(ids[:, :prefix]),
                           do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new,
                           min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    student.train(was_training)
    return out[:, : ids.shape[1]]


# ----------------------------------------------------------------------------------------------
# Layer-wise stage
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_layer_io(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Inputs h_l of every decoder layer and the outputs of its attention block, from one forward.

    teacher: a Llama-family *ForCausalLM (transformers' own attention). Returns two lists of
    [B, S, H] tensors (layer inputs before input_layernorm; attention outputs before o-residual).
    """
    layers = teacher.model.layers
    inputs: list = [None] * len(layers)
    targets: list = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):

        def pre(_m, args, kwargs, i=i):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        def post(_m, _args, out, i=i):
            targets[i] = out[0] if isinstance(out, tuple) else out

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(post))
    try:  # eagerly: a hook inside a compiled layer (`compile`) is traced once or not at all, as dynamo's version
        # has it (torch 2.11 on CUDA left `targets` empty; 2.13 on the CPU did not)
        with torch.compiler.set_stance("force_eager"):
            teacher.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return inputs, targets


class LayerwiseStudent(nn.Module):
    """The student's attention blocks (and their input norms) as one module for the layer-wise stage.

    Its forward runs every block on its layer's input and returns the normalised loss against the teacher's
    attention outputs, so under DDP the whole stage is one ordinary wrapped forward. The inputs are the teacher's
    hidden states (`inputs` "teacher") or the student's own (`inputs` "student": what its earlier layers make of the
    embeddings, detached). The submodules are the student's own (shared, not copied): training this trains the
    student.
    """

    def __init__(self, student, inputs: str = "teacher"):
        super().__init__()
        base = student.model
        self.attn = nn.ModuleList(layer.self_attn for layer in base.layers)
        self.norms = nn.ModuleList(layer.input_layernorm for layer in base.layers)
        self.rotary = base.rotary_emb
        # inputs "student": block l reads the student's own hidden state after layers < l (run without grad, so
        # each block still trains alone), as the output refit does (modeling/refit.py). A tuple, not a ModuleList:
        # the MLPs are not the stage's parameters.
        self.trunk = tuple(base.layers) if inputs == "student" else ()

    def forward(self, inputs: list, targets: list, attention_mask: torch.Tensor | None = None):
        b, s = inputs[0].shape[:2]
        position_ids = torch.arange(s, device=inputs[0].device)[None].expand(b, -1)
        cos_sin = self.rotary(inputs[0], position_ids)
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        outputs = []
        h = inputs[0]  # the embeddings: the same for both models (the layer-wise stage does not train them)
        for i, (attn, norm) in enumerate(zip(self.attn, self.norms, strict=True)):
            x = h if self.trunk else inputs[i]  # [B, S, hidden]
            out = attn(norm(x), cos_sin, mask)
            out = out[0] if isinstance(out, tuple) else out  # the remote code v2 returns (output, weights)
            outputs.append(out)
            if self.trunk:
                with torch.no_grad():  # the next block's input, the rest of this decoder layer
                    layer = self.trunk[i]
                    h = x + out
                    h = h + layer.mlp(layer.post_attention_layernorm(h))
        return layerwise_loss(outputs, targets, mask)


def layerwise_loss(outputs: list, targets: list, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """sum over layers of mean((out - target)^2) / mean(target^2), fp32; masked positions excluded."""
    total = None
    per_layer = []
    for out, tgt in zip(outputs, targets, strict=True):
        out, tgt = out.float(), tgt.float()
        if mask is not None:
            keep = mask.bool()
            out, tgt = out[keep], tgt[keep]
        rel = (out - tgt).pow(2).mean() / tgt.pow(2).mean().clamp(min=1e-12)
        per_layer.append(rel.detach())
        total = rel if total is None else total + rel
    return total, {"per_layer": torch.stack(per_layer)}
