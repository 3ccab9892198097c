"""Cached attention as one op, for onnxruntime's fused ``com.microsoft::GroupQueryAttention``.

The ``kv_cache`` pass leaves each attention as ``cat(past, new)`` → repeat the kv heads → causal mask →
``scaled_dot_product_attention``: a dozen ONNX nodes per layer, copies of the whole cache per token (the
repeat, the transposes). ``attention_as_gqa`` folds that pattern, found where the pass built it, into

    qcompile::cached_attention(q [B, H, S, D], k, v [B, H_kv, S, D], past_k, past_v [B, H_kv, P, D], scale)
        → (out [B, H, S, D], present_k, present_v [B, H_kv, P + S, D])

whose reference is exactly the pass's algebra (``present = cat(past, new)``; head ``h`` reads kv head
``h // (H / H_kv)``; query ``i`` sees keys ``j ≤ P + i``), and whose ONNX translation is one
``GroupQueryAttention`` (rotary off: RoPE, R3 and K/V quantization already ran on q and k in the graph).
Export-only: the saved graphs keep the plain form.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor, fx

from qcompile.errors import ShapeError

aten = torch.ops.aten
_lib = torch.library.Library("qcompile", "FRAGMENT")  # noqa: TOR901 - same registration style as kernels/ops
_lib.define("cached_attention(Tensor q, Tensor k, Tensor v, Tensor past_k, Tensor past_v, float scale) "
            "-> (Tensor, Tensor, Tensor)")


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, scale: float):
    present_k, present_v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    rep = q.shape[1] // k.shape[1]
    s, t = q.shape[2], present_k.shape[2]
    mask = torch.arange(t, device=q.device)[None, :] <= (torch.arange(s, device=q.device) + (t - s))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, present_k.repeat_interleave(rep, 1), present_v.repeat_interleave(rep, 1), attn_mask=mask, scale=scale)
    return out, present_k, present_v


def _cached_attention_fake(q, k, v, past_k, past_v, scale):
    total = past_k.shape[2] + k.shape[2]
    shape = (k.shape[0], k.shape[1], total, k.shape[3])
    return torch.empty_like(q), past_k.new_empty(shape), past_v.new_empty(shape)


_lib.impl("cached_attention", _cached_attention, "CompositeExplicitAutograd")
torch.library.register_fake("qcompile::cached_attention", _cached_attention_fake, lib=_lib)
cached_attention = torch.ops.qcompile.cached_attention.default


def _through_repeat(node) -> fx.Node | None:
    """The ``cat(past, new)`` behind an SDPA K/V operand: the operand itself, or the pass's
    ``flatten(expand(unsqueeze(present, 2)), 1, 2)`` repeat of it."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.flatten.using_ints:
        exp = node.args[0]
        uns = exp.args[0] if exp.target == aten.expand.default else None
        node = uns.args[0] if uns is not None and uns.target == aten.unsqueeze.default else None
    if node is None or node.target != aten.cat.default or len(node.args[0]) != 2:
        return None
    return node


def attention_as_gqa(gm: fx.GraphModule) -> int:
    """Replace every cached attention of a ``kv_cache`` decoder step by ``cached_attention`` (in place);
    returns how many. An attention not in the pass's form (dropout, a mask other than its causal one
    feeding only attention) is left as it is."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        q, k_op, v_op, mask, dropout, causal = args[:6]
        scale = node.kwargs.get("scale", args[6])
        cat_k, cat_v = _through_repeat(k_op), _through_repeat(v_op)
        if cat_k is None or cat_v is None or dropout not in (None, 0.0) or causal or node.kwargs.get("is_causal"):
            continue
        head_dim = q.meta["val"].shape[-1]
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        (past_k, k), (past_v, v) = cat_k.args[0], cat_v.args[0]
        with graph.inserting_before(node):
            fused = graph.call_function(cached_attention, (q, k, v, past_k, past_v, scale))
            outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
        node.replace_all_uses_with(outs[0])
        graph.erase_node(node)
        for cat, present in ((cat_k, outs[1]), (cat_v, outs[2])):  # the graph's present outputs; the mask's
            cat.replace_all_uses_with(present, delete_user_cb=lambda u: u.op == "output")  # length reads stay
        count += 1
    graph.eliminate_dead_code()
    gm.recompile()
    return count


# ------------------------------------------------------------------------------------------------
# ONNX


def _gqa_schema():
    """onnxruntime's ``com.microsoft::GroupQueryAttention`` inputs/outputs/attributes the translation uses."""
    from onnx.defs import OpSchema

    p, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attrs = [OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("num_heads", "kv_num_heads")]
    attrs.append(OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False))
    ins = [p("query", "T"), p("key", "T", "", param_option=opt), p("value", "T", "", param_option=opt),
           p("past_key", "T", "", param_option=opt), p("past_value", "T", "", param_option=opt),
           p("seqlens_k", "M"), p("total_sequence_length", "M")]
    outs = [p("output", "T"), p("present_key", "T"), p("present_value", "T")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=ins, outputs=outs,
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=attrs)


def cached_attention_onnx(q, k, v, past_k, past_v, scale: float):
    """``GroupQueryAttention`` on ``[B, S, heads·D]`` views; lengths from the shapes (no padding):
    ``total_sequence_length = P + S``, ``seqlens_k = total − 1`` per sequence."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.values import Op

    from qcompile.kernels.ort import MSFT

    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    if not all(isinstance(d, int) for d in (heads, kv_heads, head_dim)):
        raise ShapeError(f"ONNX export of cached attention: heads and head size must be static, got "
                         f"{q.shape} and {k.shape}")

    def const(a):
        return op.Constant(value=ir.tensor(np.asarray(a)))

    def bshd(x, h):
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), const(np.array([0, 0, h * head_dim], np.int64)))

    i32 = ir.DataType.INT32
    total = op.Add(op.Shape(past_k, start=2, end=3), op.Shape(q, start=2, end=3))  # [1] int64
    seqlens = op.Cast(op.Expand(op.Sub(total, const(np.array([1], np.int64))), op.Shape(q, start=0, end=1)), to=i32)
    total = op.Cast(op.Squeeze(total, const(np.array([0], np.int64))), to=i32)
    gqa = Op(MSFT, "GroupQueryAttention", _gqa_schema())
    out, present_k, present_v = gqa(bshd(q, heads), bshd(k, kv_heads), bshd(v, kv_heads), past_k, past_v, seqlens,
                                    total, num_heads=heads, kv_num_heads=kv_heads, scale=scale)
    out = op.Transpose(op.Reshape(out, const(np.array([0, 0, heads, head_dim], np.int64))), perm=[0, 2, 1, 3])
    return out, present_k, present_v
