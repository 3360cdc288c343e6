"""The MultiHeadLatentAttention op in its three forms (contract: export/op_spec.md).

* `reference`: plain torch, the ground truth the other two are tested against;
* `multi_head_latent_attention`: a `torch.library` custom op (eager = `reference`) that the export
  wrapper calls, so `torch.export` keeps each attention block as one node;
* `translate` (custom translation for `torch.onnx.export`) writes that node as ONE
  `mla_zoo.MultiHeadLatentAttention` ONNX node, and `function_proto()` is the portable body of the
  node in standard ONNX ops, attached to the model after export (export/exporter.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnxscript
import torch
from onnxscript import FLOAT, script
from onnxscript.values import Op, Opset
from torch import Tensor

from .contract import DOMAIN, IR_VERSION, ONNX_OPSET, OP_NAME, OP_VERSION, SHARED_CACHE_VERSION
from .contract import OP_INPUTS as INPUTS
from .contract import OP_OUTPUTS as OUTPUTS

__all__ = ["DOMAIN", "INPUTS", "ONNX_OPSET", "OP_NAME", "OP_VERSION", "OUTPUTS", "SHARED_CACHE_VERSION"]


# ----------------------------------------------------------------------------------------------
# The reference (torch)
# ----------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(query: Tensor, latent: Tensor, key_rope: Tensor, past_latent: Tensor, past_key_rope: Tensor,
              attention_mask: Tensor, cos: Tensor, sin: Tensor, w_uk: Tensor, w_uv: Tensor, num_heads: int,
              num_kv_heads: int, rope_pairs: Sequence[int], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The op's semantics in plain torch (float32 math, outputs in the input dtype). Shapes: op_spec.md."""
    dtype = query.dtype
    b, s, _ = query.shape
    n_kv, g = num_kv_heads, num_heads // num_kv_heads
    rope = key_rope.shape[-1] // n_kv  # 2R
    pairs = torch.as_tensor(list(rope_pairs), dtype=torch.long, device=query.device).view(n_kv, rope // 2)
    cos = cos.float()[..., pairs]  # [B, S, n_kv, R]
    sin = sin.float()[..., pairs]
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)  # [B, S, n_kv, 2R]

    q = query.float().view(b, s, n_kv, g, -1)  # [B, S, n_kv, G, hd]
    q_rope = q[..., :rope] * cos[:, :, :, None] + _rotate_half(q[..., :rope]) * sin[:, :, :, None]
    q_nope = q[..., rope:]  # [B, S, n_kv, G, d_nope]
    k_new = key_rope.float().view(b, s, n_kv, rope)
    k_new = (k_new * cos + _rotate_half(k_new) * sin).to(dtype)  # [B, S, n_kv, 2R]

    present_latent = torch.cat((past_latent, latent[:, None]), dim=2)  # [B, 1, T, r]
    present_key_rope = torch.cat((past_key_rope, k_new.reshape(b, 1, s, -1)), dim=2)  # [B, 1, T, n_kv*2R]
    c = present_latent[:, 0].float()  # [B, T, r]
    k_rope = present_key_rope[:, 0].float().unflatten(-1, (n_kv, rope))  # [B, T, n_kv, 2R]
    t = c.shape[1]

    q_lat = torch.einsum("bsgqd,gdr->bsgqr", q_nope, w_uk.float())  # [B, S, n_kv, G, r]
    scores = torch.einsum("bsgqr,btr->bgqst", q_lat, c) + torch.einsum("bsgqe,btge->bgqst", q_rope, k_rope)
    q_pos = torch.arange(t - s, t, device=query.device)[:, None]  # [S, 1]
    k_pos = torch.arange(t, device=query.device)[None]  # [1, T]
    allowed = ((k_pos <= q_pos) & attention_mask.bool()[:, None, :]) | (k_pos == q_pos)  # [B, S, T]
    scores = (scores * scale).masked_fill(~allowed[:, None, None], float("-inf"))  # [B, n_kv, G, S, T]
    o_lat = torch.einsum("bgqst,btr->bsgqr", scores.softmax(-1), c)  # [B, S, n_kv, G, r]
    out = torch.einsum("bsgqr,gdr->bsgqd", o_lat, w_uv.float())  # [B, S, n_kv, G, d_v]
    return out.reshape(b, s, -1).to(dtype), present_latent, present_key_rope


# ----------------------------------------------------------------------------------------------
# The torch.library op (what the export wrapper calls)
# ----------------------------------------------------------------------------------------------


def reference_shared_cache(query: Tensor, latent: Tensor, key_rope: Tensor, past_latent: Tensor,
                           past_key_rope: Tensor, attention_mask: Tensor, cos: Tensor, sin: Tensor, w_uk: Tensor,
                           w_uv: Tensor, num_heads: int, num_kv_heads: int, rope_pairs: Sequence[int], scale: float,
                           past_length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Version 2 (op_spec.md) by version 1's reference: the past is the first `past_length` rows of the
    [B, 1, C, w] buffers and the mask's first P+S columns; the presents are the buffers with the new rows written."""
    p, s = int(past_length.reshape(-1)[0]), query.shape[1]
    out, lat, kr = reference(query, latent, key_rope, past_latent[:, :, :p], past_key_rope[:, :, :p],
                             attention_mask[:, : p + s], cos, sin, w_uk, w_uv, num_heads, num_kv_heads, rope_pairs,
                             scale)
    present_latent, present_key_rope = past_latent.clone(), past_key_rope.clone()
    present_latent[:, :, p : p + s] = lat[:, :, p:]  # [B, 1, C, r]
    present_key_rope[:, :, p : p + s] = kr[:, :, p:]  # [B, 1, C, n_kv*2R]
    return out, present_latent, present_key_rope


@torch.library.custom_op("mla_zoo::multi_head_latent_attention", mutates_args=())
def multi_head_latent_attention(query: Tensor, latent: Tensor, key_rope: Tensor, past_latent: Tensor,
                                past_key_rope: Tensor, attention_mask: Tensor, cos: Tensor, sin: Tensor,
                                w_uk: Tensor, w_uv: Tensor, num_heads: int, num_kv_heads: int,
                                rope_pairs: list[int], scale: float,
                                past_length: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    args = (query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv, num_heads,
            num_kv_heads, rope_pairs, scale)
    if past_length is not None:  # version 2: one buffer (fresh tensors here: a custom op may not alias)
        return reference_shared_cache(*args, past_length)
    return reference(*args)  # every output is a fresh tensor (torch.cat), as a custom op must return


@multi_head_latent_attention.register_fake
def _(query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv,
      num_heads, num_kv_heads, rope_pairs, scale, past_length=None):
    b, s, _ = query.shape
    t = past_latent.shape[2] + (0 if past_length is not None else s)  # version 2: the buffer's rows
    out = query.new_empty(b, s, num_heads * w_uv.shape[1])
    return (out, past_latent.new_empty(b, 1, t, latent.shape[-1]),
            past_key_rope.new_empty(b, 1, t, key_rope.shape[-1]))


# ----------------------------------------------------------------------------------------------
# The ONNX schema and the custom translation (one node)
# ----------------------------------------------------------------------------------------------


def op_schema() -> onnx.defs.OpSchema:
    """The node's OpSchema; registered once per process so the exporter and onnx.checker know it."""
    formal = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    kinds = onnx.defs.OpSchema.AttrType
    float_t = ("T", ["tensor(float)", "tensor(float16)"], "float32 or float16 activations and weights")
    mask_t = ("M", ["tensor(int64)"], "the 2D attention mask, and version 2's past_length")
    return onnx.defs.OpSchema(
        OP_NAME, DOMAIN, OP_VERSION,
        doc="Absorbed multi-head latent attention over a latent KV cache (see mla_zoo export/op_spec.md).",
        inputs=[formal(name, "M" if name == "attention_mask" else "T") for name in INPUTS]
        + [formal("past_length", "M", "op version 2: the past's rows in a buffer shared with the present",
                  param_option=onnx.defs.OpSchema.FormalParameterOption.Optional)],
        outputs=[formal(name, "T") for name in OUTPUTS],
        type_constraints=[float_t, mask_t],
        attributes=[
            attr("num_heads", kinds.INT, "query heads H"),
            attr("num_kv_heads", kinds.INT, "KV heads n_kv (query head h belongs to group h // (H // n_kv))"),
            attr("rope_pairs", kinds.INTS, "per KV head, the R kept RoPE pair indices, row-major [n_kv, R]"),
            attr("scale", kinds.FLOAT, "softmax scale, head_dim ** -0.5"),
        ],
    )


def register_schema() -> None:
    """Registers the OpSchema in this process (idempotent)."""
    if not onnx.defs.has(OP_NAME, DOMAIN):
        onnx.defs.register_schema(op_schema())


register_schema()
_node_op = Op(Opset(DOMAIN, OP_VERSION), OP_NAME, op_schema())


def translate(query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv,
              num_heads: int, num_kv_heads: int, rope_pairs: Sequence[int], scale: float, past_length=None):
    """custom_translation_table entry: the torch op -> one MultiHeadLatentAttention node (version 2's with
    past_length; the exporter then sets its overload, `mark_shared_cache`)."""
    extra = () if past_length is None else (past_length,)
    return _node_op(
        query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv, *extra,
        num_heads=num_heads, num_kv_heads=num_kv_heads, rope_pairs=list(rope_pairs), scale=scale, _num_outputs=3,
    )


# ----------------------------------------------------------------------------------------------
# The portable body (standard ONNX ops), attached as a model-local function after export
# ----------------------------------------------------------------------------------------------

_op = onnxscript.values.Opset("", ONNX_OPSET)
_body_domain = Opset(DOMAIN, OP_VERSION)


@script(_body_domain, default_opset=_op)
def _rotate_half_body(x, half):
    """rotate_half over the last dim (2R wide; half = [R])."""
    start = _op.Constant(value_ints=[0])
    end = _op.Constant(value_ints=[9223372036854775807])
    last = _op.Constant(value_ints=[-1])
    x1 = _op.Slice(x, start, half, last)
    x2 = _op.Slice(x, half, end, last)
    return _op.Concat(_op.Neg(x2), x1, axis=-1)


@script(_body_domain, default_opset=_op)
def _rope_tables(cos, sin, kv, rope_pairs: Sequence[int]):
    """cos / sin of each KV head's pairs, doubled for rotate_half over its 2R dims: [B, S, n_kv, 2R] each."""
    zero2, minus1 = _op.Constant(value_ints=[0, 0]), _op.Constant(value_ints=[-1])
    pairs = _op.Constant(value_ints=rope_pairs)
    cos_k = _op.Reshape(_op.Gather(cos, pairs, axis=2), _op.Concat(zero2, kv, minus1, axis=0))
    sin_k = _op.Reshape(_op.Gather(sin, pairs, axis=2), _op.Concat(zero2, kv, minus1, axis=0))
    return _op.Concat(cos_k, cos_k, axis=-1), _op.Concat(sin_k, sin_k, axis=-1)


@script(_body_domain, default_opset=_op)
def _dims_and_tables(query, key_rope, cos, sin, num_heads: int, num_kv_heads: int, rope_pairs: Sequence[int]):
    """Both bodies' preamble: n_kv, G, 2R, R as [1] tensors, and the RoPE tables in the query's dtype."""
    minus1, two = _op.Constant(value_ints=[-1]), _op.Constant(value_ints=[2])
    kv = _op.Reshape(_op.Constant(value_int=num_kv_heads), minus1)
    groups = _op.Div(_op.Reshape(_op.Constant(value_int=num_heads), minus1), kv)
    rope = _op.Div(_op.Shape(key_rope, start=2), kv)  # [2R]
    half = _op.Div(rope, two)  # [R]
    cos2, sin2 = _rope_tables(_op.CastLike(cos, query), _op.CastLike(sin, query), kv, rope_pairs=rope_pairs)
    return kv, groups, rope, half, cos2, sin2


@script(_body_domain, default_opset=_op)
def _rotated_key_rope(key_rope, kv, half, cos2, sin2):
    """The new RoPE keys rotated, as cache rows: [B, S, n_kv*2R] -> [B, 1, S, n_kv*2R]."""
    zero2, minus1 = _op.Constant(value_ints=[0, 0]), _op.Constant(value_ints=[-1])
    k_new = _op.Reshape(key_rope, _op.Concat(zero2, kv, minus1, axis=0))  # [B, S, n_kv, 2R]
    k_new = _op.Add(_op.Mul(k_new, cos2), _op.Mul(_rotate_half_body(k_new, half), sin2))
    return _op.Unsqueeze(_op.Reshape(k_new, [0, 0, -1]), [1])


@script(_body_domain, default_opset=_op)
def _attend(query, present_latent, present_key_rope, attention_mask, past, cos2, sin2, w_uk, w_uv, kv, groups, rope,
            half, scale: float):
    """The S queries (cache slots past .. past+S-1) against the presents' T rows, causal and masked
    (attention_mask [B, T]): [B, S, H*d_v]."""
    zero, minus1 = _op.Constant(value_ints=[0]), _op.Constant(value_ints=[-1])
    zero2, end = _op.Constant(value_ints=[0, 0]), _op.Constant(value_ints=[9223372036854775807])

    # queries: [B, S, n_kv, G, hd] -> rotated RoPE part and absorbed NoPE part, heads first
    q = _op.Reshape(query, _op.Concat(zero2, kv, groups, minus1, axis=0))
    axis4 = _op.Constant(value_ints=[4])
    q_rope = _op.Slice(q, zero, rope, axis4)
    q_rope = _op.Add(_op.Mul(q_rope, _op.Unsqueeze(cos2, [3])),
                     _op.Mul(_rotate_half_body(q_rope, half), _op.Unsqueeze(sin2, [3])))
    q_rope = _op.Transpose(q_rope, perm=[0, 2, 3, 1, 4])  # [B, n_kv, G, S, 2R]
    q_nope = _op.Slice(q, rope, end, axis4)  # [B, S, n_kv, G, d_nope]
    q_lat = _op.Transpose(_op.MatMul(q_nope, w_uk), perm=[0, 2, 3, 1, 4])  # [B, n_kv, G, S, r]

    # scores over the latent and over each group's RoPE keys: [B, n_kv, G, S, T]
    c = _op.Unsqueeze(present_latent, [1])  # [B, 1, 1, T, r]
    k_all = _op.Reshape(present_key_rope, _op.Concat(zero2, zero, kv, minus1, axis=0))  # [B, 1, T, n_kv, 2R]
    k_all = _op.Transpose(k_all, perm=[0, 3, 1, 4, 2])  # [B, n_kv, 1, 2R, T]
    scores = _op.Add(_op.MatMul(q_lat, _op.Transpose(c, perm=[0, 1, 2, 4, 3])), _op.MatMul(q_rope, k_all))
    scores = _op.Mul(_op.Cast(scores, to=FLOAT.dtype), _op.Constant(value_float=scale))

    # causal + padding mask; every query always sees its own slot (no all-masked rows)
    one = _op.Constant(value_int=1)
    total = _op.Shape(present_latent, start=2, end=3)  # [T]
    first = _op.Squeeze(past)
    q_pos = _op.Unsqueeze(_op.Range(first, _op.Add(first, _op.Squeeze(_op.Shape(query, start=1, end=2))), one), [1])
    k_pos = _op.Range(_op.Constant(value_int=0), _op.Squeeze(total), one)  # [T]
    keep = _op.Unsqueeze(_op.Cast(attention_mask, to=onnx.TensorProto.BOOL), [1, 2, 3])  # [B, 1, 1, 1, T]
    allowed = _op.Or(_op.And(_op.LessOrEqual(k_pos, q_pos), keep), _op.Equal(k_pos, q_pos))  # [B, 1, 1, S, T]
    scores = _op.Where(allowed, scores, _op.Constant(value_float=float("-inf")))
    probs = _op.CastLike(_op.Softmax(scores, axis=-1), query)

    # weighted latent, then W_uv: [B, n_kv, G, S, d_v] -> [B, S, H*d_v]
    o_lat = _op.MatMul(probs, c)  # [B, n_kv, G, S, r]
    out = _op.MatMul(o_lat, _op.Unsqueeze(_op.Transpose(w_uv, perm=[0, 2, 1]), [1]))
    return _op.Reshape(_op.Transpose(out, perm=[0, 3, 1, 2, 4]), [0, 0, -1])


@script(_body_domain, default_opset=_op)
def MultiHeadLatentAttention(  # noqa: N802 - the ONNX op's name
    query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv,
    num_heads: int, num_kv_heads: int, rope_pairs: Sequence[int], scale: float,
):
    """Version 1: present = concat(past, new)."""
    kv, groups, rope, half, cos2, sin2 = _dims_and_tables(query, key_rope, cos, sin, num_heads=num_heads,
                                                          num_kv_heads=num_kv_heads, rope_pairs=rope_pairs)
    present_key_rope = _op.Concat(past_key_rope, _rotated_key_rope(key_rope, kv, half, cos2, sin2), axis=2)
    present_latent = _op.Concat(past_latent, _op.Unsqueeze(latent, [1]), axis=2)  # [B, 1, P+S, r]
    past = _op.Shape(past_latent, start=2, end=3)  # [P]
    output = _attend(query, present_latent, present_key_rope, attention_mask, past, cos2, sin2, w_uk, w_uv, kv,
                     groups, rope, half, scale=scale)
    return output, present_latent, present_key_rope


@script(_body_domain, default_opset=_op)
def MultiHeadLatentAttentionSharedCache(  # the FunctionProto is renamed to the op's name, overload "shared_cache"
    query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv, past_length,
    num_heads: int, num_kv_heads: int, rope_pairs: Sequence[int], scale: float,
):
    """Version 2 (op_spec.md): the new rows written into the buffer at past_length (ScatterND: a copy here; the
    kernel writes in place), then the queries against all of its rows (causality hides those past the new ones)."""
    kv, groups, rope, half, cos2, sin2 = _dims_and_tables(query, key_rope, cos, sin, num_heads=num_heads,
                                                          num_kv_heads=num_kv_heads, rope_pairs=rope_pairs)

    # indices [B, S, 3] of the new rows: (b, 0, past_length + s)
    one = _op.Constant(value_int=1)
    zero_i = _op.Constant(value_int=0)
    batch = _op.Squeeze(_op.Shape(query, start=0, end=1))
    new = _op.Squeeze(_op.Shape(query, start=1, end=2))
    first = _op.Squeeze(past_length)
    b_idx = _op.Unsqueeze(_op.Range(zero_i, batch, one), [1])  # [B, 1]
    s_idx = _op.Unsqueeze(_op.Range(first, _op.Add(first, new), one), [0])  # [1, S]
    b_idx, s_idx = _op.Add(b_idx, _op.Mul(s_idx, zero_i)), _op.Add(s_idx, _op.Mul(b_idx, zero_i))  # [B, S] each
    idx = _op.Concat(_op.Unsqueeze(b_idx, [2]), _op.Unsqueeze(_op.Mul(b_idx, zero_i), [2]), _op.Unsqueeze(s_idx, [2]),
                     axis=2)  # [B, S, 3]
    k_new = _op.Squeeze(_rotated_key_rope(key_rope, kv, half, cos2, sin2), [1])  # [B, S, n_kv*2R]
    present_key_rope = _op.ScatterND(past_key_rope, idx, k_new)  # [B, 1, C, n_kv*2R]
    present_latent = _op.ScatterND(past_latent, idx, latent)  # [B, 1, C, r]
    output = _attend(query, present_latent, present_key_rope, attention_mask, past_length, cos2, sin2, w_uk, w_uv,
                     kv, groups, rope, half, scale=scale)
    return output, present_latent, present_key_rope


SHARED_CACHE_OVERLOAD = "shared_cache"  # the version-2 node's `overload` (IR 10): picks its function body


def function_protos() -> list[onnx.FunctionProto]:
    """The bodies (version 1, and version 2 as the overload SHARED_CACHE_OVERLOAD) and their helpers, as
    FunctionProtos of the DOMAIN (attach them all to the model)."""
    shared = MultiHeadLatentAttentionSharedCache.to_function_proto()
    shared.name, shared.overload = OP_NAME, SHARED_CACHE_OVERLOAD
    helpers = (_rotate_half_body, _rope_tables, _dims_and_tables, _rotated_key_rope, _attend)
    return [MultiHeadLatentAttention.to_function_proto(), shared, *(h.to_function_proto() for h in helpers)]


RANKS = dict(query=3, latent=3, key_rope=3, past_latent=4, past_key_rope=4, attention_mask=2, cos=3, sin=3,
             w_uk=3, w_uv=3, output=3, present_latent=4, present_key_rope=4)  # every input's and output's rank


def node_model(attributes: dict, elem_type: int = onnx.TensorProto.FLOAT, with_body: bool = True,
               shared_cache: bool = False) -> onnx.ModelProto:
    """A model of ONE MultiHeadLatentAttention node over the op's inputs and outputs (every dim dynamic),
    with the function body attached unless with_body=False: the kernel tests' and benchmarks' model.
    shared_cache: op version 2's form (op_spec.md): input `past_length` added, the node's overload set."""
    helper = onnx.helper
    ranks = dict(RANKS, past_length=1)
    inputs = [*INPUTS, "past_length"] if shared_cache else list(INPUTS)

    def info(name):
        elem = onnx.TensorProto.INT64 if name in ("attention_mask", "past_length") else elem_type
        return helper.make_tensor_value_info(name, elem, [None] * ranks[name])

    node = helper.make_node(OP_NAME, inputs, list(OUTPUTS), domain=DOMAIN, **attributes)
    if shared_cache:
        node.overload = SHARED_CACHE_OVERLOAD
    graph = helper.make_graph([node], "mla", [info(n) for n in inputs], [info(n) for n in OUTPUTS])
    version = SHARED_CACHE_VERSION if shared_cache else OP_VERSION
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, version)]
    model = helper.make_model(graph, functions=function_protos() if with_body else [], opset_imports=opsets,
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model
