"""Cached attention as one op, for onnxruntime's fused ``com.microsoft::GroupQueryAttention``.

The ``kv_cache`` pass leaves each attention as ``cat(past, new)`` → repeat the kv heads → causal mask →
``scaled_dot_product_attention``: a dozen ONNX nodes per layer, copies of the whole cache per token (the
repeat, the transposes). ``attention_as_gqa`` folds that pattern, found where the pass built it, into

    qcompile::cached_attention(q [B, H, S, D], k, v [B, H_kv, S, D], past_k, past_v [B, H_kv, P, D], scale,
                               cos_cache?, sin_cache? [T, D/2])
        → (out [B, H, S, D], present_k, present_v [B, H_kv, P + S, D])

whose reference is exactly the pass's algebra (``present = cat(past, new)``; head ``h`` reads kv head
``h // (H / H_kv)``; query ``i`` sees keys ``j ≤ P + i``; with the tables, rotate-half RoPE of q and k at positions
P … P + S − 1 first). ``simplify_attention`` then cleans what feeds it: K/V straight from the kv heads, R3
dropped where it cancels (K not quantized), and RoPE moved into the op (GroupQueryAttention's rotary) where q and
k reach it through RoPE alone — with a quantized K cache, RoPE, R3 and the K/V quantization stay in the graph
before it. Last, ``to_token_major`` turns it into ``token_attention``, the same attention on [B, S, heads·D]
tensors (q|k|v packed when they are one projection's split), whose ONNX translation is one
``GroupQueryAttention`` with no layout change around it; ``lengths_from_mask`` has every layer read the
sequence lengths from one ``attention_mask`` input, as onnxruntime-genai's in-place cache needs. SmolLM2 W4A8:
1,093 → 465 nodes per step.
Export-only: the saved graphs keep the plain form.
"""

from __future__ import annotations

import math
import operator

import numpy as np

import torch
from torch import Tensor, fx

from qcompile.errors import ShapeError
from qcompile.graph.fx_edit import FxGraph

aten = torch.ops.aten
_lib = torch.library.Library("qcompile", "FRAGMENT")  # noqa: TOR901 - same registration style as kernels/ops
_lib.define("cached_attention(Tensor q, Tensor k, Tensor v, Tensor past_k, Tensor past_v, float scale, "
            "Tensor? cos_cache=None, Tensor? sin_cache=None) -> (Tensor, Tensor, Tensor)")
_lib.define("token_attention(Tensor query, Tensor? key, Tensor? value, Tensor past_k, Tensor past_v, float scale, "
            "int num_heads, Tensor? cos_cache=None, Tensor? sin_cache=None) -> (Tensor, Tensor, Tensor)")


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE with half-width tables: x·cat(c, c) + cat(−x₂, x₁)·cat(s, s) = [x₁c − x₂s, x₂c + x₁s]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, scale: float,
                      cos_cache: Tensor | None = None, sin_cache: Tensor | None = None):
    if cos_cache is not None:  # positions P … P + S − 1
        p, s = past_k.shape[2], q.shape[2]
        cos, sin = cos_cache[p:p + s], sin_cache[p:p + s]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    present_k, present_v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    rep = q.shape[1] // k.shape[1]
    s, t = q.shape[2], present_k.shape[2]
    mask = torch.arange(t, device=q.device)[None, :] <= (torch.arange(s, device=q.device) + (t - s))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, present_k.repeat_interleave(rep, 1), present_v.repeat_interleave(rep, 1), attn_mask=mask, scale=scale)
    return out, present_k, present_v


def _cached_attention_fake(q, k, v, past_k, past_v, scale, cos_cache=None, sin_cache=None):
    total = past_k.shape[2] + k.shape[2]
    shape = (k.shape[0], k.shape[1], total, k.shape[3])
    return torch.empty_like(q), past_k.new_empty(shape), past_v.new_empty(shape)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, heads·D] → [B, heads, S, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _token_attention(query: Tensor, key: Tensor | None, value: Tensor | None, past_k: Tensor, past_v: Tensor,
                     scale: float, num_heads: int, cos_cache: Tensor | None = None, sin_cache: Tensor | None = None):
    """``cached_attention`` on token-major tensors ([B, S, heads·D]; with key = value = None, ``query`` is
    q|k|v packed along the last dim), output [B, S, H·D]: GroupQueryAttention's own signature."""
    kv_heads, d = past_k.shape[1], past_k.shape[3]
    if key is None:
        query, key, value = query.split([num_heads * d, kv_heads * d, kv_heads * d], -1)
    out, present_k, present_v = _cached_attention(_split_heads(query, num_heads), _split_heads(key, kv_heads),
                                                  _split_heads(value, kv_heads), past_k, past_v, scale,
                                                  cos_cache, sin_cache)
    return out.transpose(1, 2).flatten(2), present_k, present_v


def _token_attention_fake(query, key, value, past_k, past_v, scale, num_heads, cos_cache=None, sin_cache=None):
    total = past_k.shape[2] + query.shape[1]
    shape = (past_k.shape[0], past_k.shape[1], total, past_k.shape[3])
    out = query.new_empty((*query.shape[:2], num_heads * past_k.shape[3]))
    return out, past_k.new_empty(shape), past_v.new_empty(shape)


_lib.impl("cached_attention", _cached_attention, "CompositeExplicitAutograd")
torch.library.register_fake("qcompile::cached_attention", _cached_attention_fake, lib=_lib)
_lib.impl("token_attention", _token_attention, "CompositeExplicitAutograd")
torch.library.register_fake("qcompile::token_attention", _token_attention_fake, lib=_lib)
cached_attention = torch.ops.qcompile.cached_attention.default
token_attention = torch.ops.qcompile.token_attention.default


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


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _per_head_ops():
    q = torch.ops.qcompile
    return (q.hadamard.default, q.fake_quant.default)  # both act on the last dim, row by row


def _unrepeated(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, per-head ops) when ``node = slice(ops(repeat_kv(x)), 1, 0, H, rep)``: the kv_cache pass's pick of the
    new tokens' kv heads out of the repeated ones. Ops that act on each head row alone (online Hadamard, per-row
    fake quantization) commute with picking heads, so this is ``ops(x)``."""
    if not _is(node, aten.slice.Tensor) or len(node.args) != 5 or node.args[1] != 1 or node.args[2] != 0:
        return None
    rep, chain, cur = node.args[4], [], node.args[0]
    while any(_is(cur, op) for op in _per_head_ops()) and len(cur.users) == 1:
        chain.append(cur)
        cur = cur.args[0]
    if not (_is(cur, aten.reshape.default) and _is(exp := cur.args[0], aten.expand.default)
            and _is(uns := exp.args[0], aten.unsqueeze.default) and uns.args[1] == 2 and exp.args[1][2] == rep):
        return None
    return uns.args[0], chain[::-1]


def unrepeat_kv(graph: fx.Graph, attention: fx.Node) -> int:
    """Feed the attention's new K/V from the kv heads themselves, not a pick out of their repetition."""
    done = 0
    for pos in (1, 2):
        found = _unrepeated(attention.args[pos])
        if found is None:
            continue
        x, chain = found
        with graph.inserting_before(attention):
            for op in chain:
                x = graph.call_function(op.target, (x, *op.args[1:]), op.kwargs)
        attention.update_arg(pos, x)
        done += 1
    return done


def drop_cancelling_r3(attention: fx.Node) -> bool:
    """q ↦ qH and k ↦ kH with nothing between them and the attention (K not quantized): (qH)(kH)ᵀ = q·kᵀ, and
    the cache, which only this graph writes and reads, holds K in either basis. Drop both."""
    q, k = attention.args[0], attention.args[1]
    had = torch.ops.qcompile.hadamard.default
    if not (_is(q, had) and _is(k, had) and q.args[1:] == k.args[1:] and len(q.users) == len(k.users) == 1):
        return False
    attention.update_arg(0, q.args[0])
    attention.update_arg(1, k.args[0])
    return True


def _rotate_half_of(rot, x) -> bool:
    """``rot = cat([−x[..., h:], x[..., :h]], −1)`` with h = D / 2."""
    d = x.meta["val"].shape[-1]
    if not (_is(rot, aten.cat.default) and len(rot.args[0]) == 2 and (rot.args[1:] or (0,))[0] in (-1, 3)):
        return False
    neg, low = rot.args[0]

    def half(n, start, end):
        return (_is(n, aten.slice.Tensor) and n.args[0] is x and n.args[1] in (-1, 3) and n.args[2] == start
                and n.args[3] >= end and (n.args[4:] or (1,))[0] == 1)

    return _is(neg, aten.neg.default) and half(neg.args[0], d // 2, d) and half(low, 0, d // 2)


def _rope_parts(node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(x, cos, sin) when ``node = x·cos + rotate_half(x)·sin`` (the rotate-half RoPE over the whole head)."""
    if not _is(node, aten.add.Tensor):
        return None
    for a, b in (node.args[:2], node.args[1::-1]):
        if not (_is(a, aten.mul.Tensor) and _is(b, aten.mul.Tensor)):
            continue
        for x, cos in (a.args, a.args[::-1]):
            for rot, sin in (b.args, b.args[::-1]):
                if isinstance(x, fx.Node) and _rotate_half_of(rot, x):
                    return x, cos, sin
    return None


def _evaluate(gm: fx.GraphModule, targets: list[fx.Node], inputs: tuple) -> list[Tensor]:
    """The values of ``targets`` for ``inputs`` (gm's placeholders in order), running only their ancestors."""
    needed, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack += n.all_input_nodes
    sub, env = fx.Graph(), {}
    feeds = []
    for n, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), inputs):
        if n in needed:
            feeds.append(value)
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[t] for t in targets))
    with torch.no_grad():
        return list(fx.GraphModule(gm, sub)(*feeds))


def rope_into_attention(gm: fx.GraphModule, attentions: list[fx.Node], example, max_positions: int) -> int:
    """Move each attention's RoPE on q and k into ``cached_attention`` (GroupQueryAttention's rotary), with
    half-width cos/sin tables read off the graph's own cos/sin at positions 0 … max_positions − 1 (``example(P,
    S)`` gives the step's inputs). Proved before use: the graph's tables must have equal halves (rotate-half
    over the whole head) and must equal the tables' rows P … P + S − 1 at a probe with a past (P = 3, S = 5)."""
    sites = []
    for att in attentions:
        q, k = _rope_parts(att.args[0]), _rope_parts(att.args[1])
        if q is None or k is None or q[1:] != k[1:] or len(att.args) > 6:
            continue
        sites.append((att, q[0], k[0], q[1], q[2]))
    if not sites:
        return 0
    tables, values = {}, {}
    for cos, sin in dict.fromkeys((c, s) for *_, c, s in sites):
        full = [t.reshape(-1, t.shape[-1]) for t in _evaluate(gm, [cos, sin], example(0, max_positions))]
        probe = [t.reshape(-1, t.shape[-1]) for t in _evaluate(gm, [cos, sin], example(3, 5))]
        h = full[0].shape[-1] // 2
        if len(full[0]) != max_positions or any(not torch.equal(t[:, :h], t[:, h:]) for t in full) \
                or any(not torch.equal(p, t[3:8]) for p, t in zip(probe, full)):
            continue
        halves = [t[:, :h].contiguous() for t in full]
        same = next((nodes for key, nodes in tables.items() if all(torch.equal(a, b) for a, b in zip(
            halves, values[key]))), None)  # every layer's own copy of one table: one initializer
        values[(cos, sin)] = halves
        tables[(cos, sin)] = same or [FxGraph(gm).add_weight(f"rope_{name}_cache_{len(tables)}", t)
                                      for name, t in zip(("cos", "sin"), halves)]
    done = 0
    for att, q0, k0, cos, sin in sites:
        if (cos, sin) not in tables:
            continue
        att.args = (q0, k0, *att.args[2:6], *tables[(cos, sin)])
        done += 1
    return done


def simplify_attention(gm: fx.GraphModule, example, max_positions: int) -> dict:
    """After ``attention_as_gqa``: K/V from the kv heads themselves, R3 dropped where it cancels, RoPE into the
    attention op where it fits (see each function). Returns what it did, counted."""
    graph = gm.graph
    attentions = [n for n in graph.nodes if _is(n, cached_attention)]
    counts = {"kv un-repeated": sum(unrepeat_kv(graph, a) for a in attentions),
              "R3 pairs dropped (K not quantized)": sum(drop_cancelling_r3(a) for a in attentions)}
    counts["RoPE into the attention"] = rope_into_attention(gm, attentions, example, max_positions)
    graph.eliminate_dead_code()
    gm.recompile()
    return {k: v for k, v in counts.items() if v}


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(str(d) for d in val.shape) if isinstance(val, Tensor) else None


def _head_split_of(node) -> fx.Node | None:
    """x when ``node = view(x, [B, S, h, D]).transpose(1, 2)`` with x of shape [B, S, h·D]: the heads of x."""
    if not (_is(node, aten.transpose.int) and {d % 4 for d in node.args[1:3]} == {1, 2}):
        return None
    view = node.args[0]
    if not (_is(view, aten.view.default) or _is(view, aten.reshape.default)):
        return None
    x, xs, vs = view.args[0], _shape(view.args[0]), _shape(view)
    if xs is None or vs is None or len(xs) != 3 or len(vs) != 4 or xs[:2] != vs[:2] \
            or not (xs[2].isdigit() and vs[2].isdigit() and vs[3].isdigit()) or int(xs[2]) != int(vs[2]) * int(vs[3]):
        return None
    return x


def _packed_source(parts: list[fx.Node], sizes: list[int]) -> fx.Node | None:
    """X when ``parts`` are the three outputs, in order, of ``split_with_sizes(X, sizes, -1)`` and nothing else
    reads that split."""
    items = [p if _is(p, operator.getitem) else None for p in parts]
    if any(i is None for i in items) or [i.args[1] for i in items] != [0, 1, 2]:
        return None
    split = items[0].args[0]
    if not (_is(split, aten.split_with_sizes.default) and all(i.args[0] is split for i in items)
            and list(split.args[1]) == sizes and (split.args[2:] or (0,))[0] in (-1, 2) and len(split.users) == 3):
        return None
    return split.args[0]


def _merged_heads_after(out: fx.Node, merged_shape: tuple) -> fx.Node | None:
    """The node that computes ``out.transpose(1, 2).reshape(merged_shape)`` from the attention output ``out``
    [B, H, S, D] through shape-keeping reshapes and copies only; None if the users do something else."""
    cur, transposed = out, False
    while len(cur.users) == 1:
        (user,) = cur.users
        reshape = _is(user, aten.reshape.default) or _is(user, aten.view.default)
        if _is(user, aten.transpose.int) and not transposed and {d % 4 for d in user.args[1:3]} == {1, 2}:
            transposed = True
        elif reshape and transposed and _shape(user) == merged_shape:
            return user
        elif not (_is(user, aten.contiguous.default) or _is(user, aten.clone.default)
                  or (reshape and _shape(user) == _shape(cur))):
            return None
        cur = user
    return None


def to_token_major(gm: fx.GraphModule) -> dict:
    """Each ``cached_attention`` as ``token_attention`` on [B, S, heads·D] tensors, GroupQueryAttention's layout.
    Where q/k/v are head splits of token-major tensors (``x.view(B, S, h, D).transpose(1, 2)``) the op reads x
    itself, and q|k|v split out of one fused projection are read packed; the output's merge back
    (``transpose(1, 2).reshape(B, S, H·D)``) is the op's own output. Elsewhere the layout change is kept as an
    op around it. Both are exact (the same elements, moved)."""
    graph, counts = gm.graph, {"head splits read token-major": 0, "q|k|v read packed": 0}
    for att in [n for n in graph.nodes if _is(n, cached_attention)]:
        q, k, v, past_k, past_v, scale = att.args[:6]
        _, kv_heads, _, head_dim = past_k.meta["val"].shape
        heads = q.meta["val"].shape[1]
        with graph.inserting_before(att):
            sources = []
            for x, h in ((q, heads), (k, kv_heads), (v, kv_heads)):
                src = _head_split_of(x)
                counts["head splits read token-major"] += src is not None
                sources.append(src if src is not None else graph.call_function(
                    aten.flatten.using_ints, (graph.call_function(aten.transpose.int, (x, 1, 2)), 2)))
            packed = _packed_source(sources, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            if packed is not None:
                sources = [packed, None, None]
                counts["q|k|v read packed"] += 1
            fused = graph.call_function(token_attention, (*sources, past_k, past_v, scale, heads, *att.args[6:]))
            outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
        for user in list(att.users):
            i = user.args[1]
            if i == 0:
                shape = _shape(q)
                merged = _merged_heads_after(user, (shape[0], shape[2], str(heads * head_dim)))
                if merged is not None:
                    merged.replace_all_uses_with(outs[0])
                    continue
                with graph.inserting_before(user):
                    heads_major = graph.call_function(aten.transpose.int, (graph.call_function(
                        aten.unflatten.int, (outs[0], -1, [heads, head_dim])), 1, 2))
                user.replace_all_uses_with(heads_major)
            else:
                user.replace_all_uses_with(outs[i])
    graph.eliminate_dead_code()
    gm.recompile()
    return {k: v for k, v in counts.items() if v}


# ------------------------------------------------------------------------------------------------
# ONNX


def _gqa_schema():
    """onnxruntime's ``com.microsoft::GroupQueryAttention`` inputs/outputs/attributes the translation uses."""
    from onnx.defs import OpSchema

    p, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attrs = [OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("num_heads", "kv_num_heads")]
    attrs += [OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=False) for a in ("do_rotary",
                                                                                         "rotary_interleaved")]
    attrs.append(OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False))
    ins = [p("query", "T"), p("key", "T", "", param_option=opt), p("value", "T", "", param_option=opt),
           p("past_key", "T", "", param_option=opt), p("past_value", "T", "", param_option=opt),
           p("seqlens_k", "M"), p("total_sequence_length", "M"), p("cos_cache", "T", "", param_option=opt),
           p("sin_cache", "T", "", param_option=opt)]
    outs = [p("output", "T"), p("present_key", "T"), p("present_value", "T")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=ins, outputs=outs,
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=attrs)


def token_attention_onnx(query, key, value, past_k, past_v, scale: float, num_heads: int, cos_cache=None,
                         sin_cache=None):
    """One ``GroupQueryAttention``, inputs as they come (token-major; packed q|k|v when key and value are None).
    Lengths from the shapes (no padding): ``total_sequence_length = P + S``, ``seqlens_k = total − 1`` per
    sequence, so its rotary (with the tables, rotate-half) places the new tokens at P … P + S − 1 as the reference
    does. ``lengths_from_mask`` then has every layer read them from the attention mask instead."""
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.values import Op

    from qcompile.kernels.ort import MSFT

    kv_heads = past_k.shape[1] if past_k.shape is not None else None
    if not isinstance(kv_heads, int):
        raise ShapeError(f"ONNX export of cached attention: the kv heads must be static, got {past_k.shape}")

    def const(a):
        return op.Constant(value=ir.tensor(np.asarray(a)))

    i32 = ir.DataType.INT32
    total = op.Add(op.Shape(past_k, start=2, end=3), op.Shape(query, start=1, end=2))  # [1] int64
    seqlens = op.Cast(op.Expand(op.Sub(total, const(np.array([1], np.int64))), op.Shape(query, start=0, end=1)),
                      to=i32)
    total = op.Cast(op.Squeeze(total, const(np.array([0], np.int64))), to=i32)
    gqa = Op(MSFT, "GroupQueryAttention", _gqa_schema())
    rotary = {} if cos_cache is None else {"do_rotary": 1, "rotary_interleaved": 0}
    tables = () if cos_cache is None else (cos_cache, sin_cache)
    return gqa(query, key, value, past_k, past_v, seqlens, total, *tables, num_heads=num_heads,
               kv_num_heads=kv_heads, scale=scale, **rotary)


def lengths_from_mask(model) -> int:
    """Every ``GroupQueryAttention`` reads its lengths from a new graph input ``attention_mask`` [B, P + S]:
    ``seqlens_k = Σ_j mask[b, j] − 1`` and ``total_sequence_length = P + S`` (the mask's length), computed once
    for all layers. With the mask of ones that every caller feeds (no padding) these are the translation's
    ``P + S − 1`` and ``P + S``; what changes is where they come from: onnxruntime-genai then keeps one cache
    buffer of the context length per layer (``past_present_share_buffer``), whose dim 2 no longer says P, and
    each step writes the new token in place instead of copying the whole cache into a longer one. Returns how
    many attentions read them."""
    import onnx_ir as ir

    graph = model.graph
    nodes = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if not nodes:
        return 0
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64),
                    shape=ir.Shape([ids.shape[0], "total_sequence_length"]))
    graph.inputs.insert(list(graph.inputs).index(ids) + 1, mask)

    def const(name, array):
        return ir.node("Constant", [], {"value": ir.tensor(array, name=name)}, outputs=[ir.Value(name=name)])

    one, axis = const("mask_one", np.array(1, np.int64)), const("mask_axis", np.array([1], np.int64))
    zero_axis = const("mask_axis0", np.array([0], np.int64))
    summed = ir.node("ReduceSum", [mask, axis.outputs[0]], {"keepdims": 0})
    last = ir.node("Sub", [summed.outputs[0], one.outputs[0]])
    seqlens = ir.node("Cast", [last.outputs[0]], {"to": ir.DataType.INT32}, outputs=[ir.Value(name="seqlens_k")])
    length = ir.node("Shape", [mask], {"start": 1, "end": 2})
    scalar = ir.node("Squeeze", [length.outputs[0], zero_axis.outputs[0]])
    total = ir.node("Cast", [scalar.outputs[0]], {"to": ir.DataType.INT32},
                    outputs=[ir.Value(name="total_sequence_length")])
    graph.insert_before(nodes[0], [one, axis, zero_axis, summed, last, seqlens, length, scalar, total])
    for n in nodes:
        n.replace_input_with(5, seqlens.outputs[0])
        n.replace_input_with(6, total.outputs[0])
    return len(nodes)
