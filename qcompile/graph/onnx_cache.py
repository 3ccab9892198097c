"""The KV-cache rewrite on ONNX: a decoder ``input_ids → logits`` without a cache becomes onnxruntime-genai's step.

The ONNX twin of ``passes/kv_cache.with_kv_cache``, with the same three edits at the attention ops the matcher
found (its docstring states the algebra) and onnxruntime-genai's names::

    (input_ids [B, S], attention_mask [B, P + S], past_key_values.{i}.key/value [B, H_kv, P, D])
        → (logits [B, S, V], present.{i}.key/value [B, H_kv, P + S, D])

1. **K and V operands** of each ``Attention`` (opset 23): ``present = Concat(past, operand[:, ::r], axis 2)``
   (``Slice`` with step r where the operand repeats each kv head r = H / H_kv times, as ``repeat_kv`` does), and
   attention reads ``present`` repeated again (``Unsqueeze → Expand [1, 1, r, 1, 1] → Reshape [B, H, T, D]``:
   head h reads kv head h // r). Whatever a pass inserted on the operand (R3, K/V fake quantization) runs
   before the Concat, on the new tokens only.
2. **Positions.** Every ``Range(0, S, 1)`` (S = ``Shape(input_ids)[1]``) whose values reach ``Cos``/``Sin`` or
   a ``RotaryEmbedding``'s position ids becomes ``Range(0, S, 1) + P``, P = ``Shape(past_key_values.0.key)[2]``.
3. **Mask.** Attention reads ``mask[i, j] = j ≤ P + i`` over the ``P + S`` keys (bool ``[1, 1, S, P + S]``),
   ``is_causal`` off. The model's own mask is dropped only once it is proven to be the plain causal mask: it is
   computed from the sequence length alone, so it is evaluated (onnxruntime) at a length past every integer
   constant its computation reads (a sliding window is one) and compared with ``j ≤ i``.

``attention_mask`` is read by no node: sequences are unpadded (every cached and new position attended), as
for the PyTorch export's step. What cannot be proven is refused by node name (``UnsafeRewriteError``): an
attention op the matcher did not find, one that is not an opset-23 ``Attention`` on [B, heads, S, D] operands,
no RoPE positions from ``Range(S)``, a mask that is not causal (a sliding window, a padded or bidirectional one).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.errors import UnsafeRewriteError
from qcompile.graph.onnx_genai import Signature, cache_names

_ATTENTION_OPS = ("Attention", "GroupQueryAttention", "MultiHeadAttention")
_THROUGH = ("Cast", "CastLike", "Identity", "Squeeze", "Unsqueeze", "Reshape")
_MASK_CHECK_MAX = 8192  # the longest sequence the model's mask is evaluated at (bool S×S in memory)


class _Builder:
    """Adds nodes to an ``OnnxGraph``: each before ``anchor``, or (``after``) each after the one added last,
    starting after ``anchor``; new values are fresh-named from the graph."""

    def __init__(self, graph, anchor: ir.Node, after: bool = False):
        self.g, self.anchor, self.after = graph, anchor, after

    def op(self, op_type: str, inputs, stem: str, **attrs) -> ir.Value:
        a = []
        for k, v in attrs.items():
            a.append(ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v) if isinstance(v, int)
                     else ir.AttrTensor(k, v))
        node = ir.Node("", op_type, inputs, attributes=a, num_outputs=1, name=self.g._name(f"kv_cache::{stem}"))
        node.outputs[0].name = node.name
        if self.after:
            self.g.model.graph.insert_after(self.anchor, node)
            self.anchor = node
        else:
            self.g.model.graph.insert_before(self.anchor, node)
        self.g._changed()
        return node.outputs[0]

    def const(self, values, stem: str, dtype=np.int64) -> ir.Value:
        return self.op("Constant", [], stem, value=ir.tensor(np.array(values, dtype=dtype)))


def _const(v: ir.Value | None):
    """The numpy value of a constant seen through casts (``Range``'s start and delta are ``CastLike(0.)``)."""
    while v is not None:
        t = ir.convenience.get_const_tensor(v)
        if t is not None:
            return t.numpy()
        p = v.producer()
        if p is None or p.op_type not in ("Cast", "CastLike", "Identity"):
            return None
        v = p.inputs[0]
    return None


def _is_seq_len(v: ir.Value, ids: ir.Value) -> bool:
    """Whether v is S, ``input_ids``' dim 1, as exporters read it (``Squeeze(Shape(ids, 1, 2))``, ``Gather``)."""
    while (p := v.producer()) is not None and p.op_type in _THROUGH:
        v = p.inputs[0]
    if p is None:
        return False
    if p.op_type == "Shape" and p.inputs[0] is ids:
        a = p.attributes
        return a.get_int("start", 0) == 1 and a.get_int("end", 2) == 2
    if p.op_type == "Gather" and (s := p.inputs[0].producer()) is not None and s.op_type == "Shape" and \
            s.inputs[0] is ids and s.attributes.get_int("start", 0) == 0:
        idx = _const(p.inputs[1])
        return idx is not None and idx.size == 1 and int(idx.reshape(())) == 1
    return False


def _reaches_rope(v: ir.Value) -> bool:
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        for use in x.uses():
            n = use.node
            if n.op_type in ("Cos", "Sin") or (n.op_type == "RotaryEmbedding" and use.idx == 3):
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(n.outputs)
    return False


def position_ranges(model: ir.Model, ids: ir.Value) -> list[ir.Node]:
    """``Range(0, S, 1)`` nodes whose values reach RoPE (``Cos``/``Sin``, ``RotaryEmbedding``'s position ids)."""
    out = []
    for n in model.graph:
        if n.op_type != "Range" or not _is_seq_len(n.inputs[1], ids):
            continue
        start, delta = _const(n.inputs[0]), _const(n.inputs[2])
        if start is None or delta is None or start.size != 1 or delta.size != 1 or float(start.reshape(())) != 0 \
                or float(delta.reshape(())) != 1:
            continue
        if _reaches_rope(n.outputs[0]):
            out.append(n)
    return out


def _cone(v: ir.Value) -> list[ir.Node]:
    """The nodes that compute v (backwards to graph inputs and initializers)."""
    seen, todo, nodes = set(), [v], []
    while todo:
        p = todo.pop().producer()
        if p is None or p in seen:
            continue
        seen.add(p)
        nodes.append(p)
        todo.extend(i for i in p.inputs if i is not None)
    return nodes


def check_causal_mask(model: ir.Model, mask: ir.Value, ids: ir.Value, where: str, attention: str) -> int:
    """Refuse unless attention ``attention``'s mask operand is the plain causal mask; returns the length it was
    evaluated at. The mask is a function of S alone (its computation reads no graph input but the shape of
    ``input_ids``); evaluated at a length past every integer constant the computation reads (a window size
    would be one), a mask equal to ``j ≤ i`` there is causal for every shorter sequence, and the positions
    past the longest constant it cannot tell apart from shorter ones."""
    import onnxruntime as ort

    cone = _cone(mask)
    inputs = {i for n in cone for i in n.inputs if i is not None and i.producer() is None and not i.is_initializer()
              and i.const_value is None}
    if any(i is not ids for i in inputs) or any(n.op_type in _ATTENTION_OPS or n.op_type == "MatMul" for n in cone):
        raise UnsafeRewriteError(f"kv_cache: the mask of attention {attention} in {where} is computed from data "
                                 "(not the sequence length alone); the cache's causal mask would replace it")
    consts = [0]
    for n in cone:
        for i in n.inputs:
            c = _const(i) if i is not None else None
            if c is not None and c.dtype.kind in "iu" and c.size <= 16:
                consts += [abs(int(x)) for x in c.reshape(-1) if abs(int(x)) < 2**31]
        if n.op_type == "Constant":
            c = _const(n.outputs[0])
            if c is not None and c.dtype.kind in "iu" and c.size <= 16:
                consts += [abs(int(x)) for x in c.reshape(-1) if abs(int(x)) < 2**31]
    length = max(64, max(consts) + 2)
    if length > _MASK_CHECK_MAX:
        raise UnsafeRewriteError(f"kv_cache: the mask of attention {attention} in {where} reads the constant "
                                 f"{length - 2} (a sliding window?); cannot prove it causal that far")
    graph = ir.Graph([ir.Value(name=ids.name, shape=ir.Shape([1, None]), type=ids.type)], [], nodes=[],
                     opset_imports=dict(model.opset_imports), name="mask")
    copies: dict[ir.Value, ir.Value] = {ids: graph.inputs[0]}
    members = set(cone)
    order = [n for n in model.graph if n in members]  # graph order: producers first
    for n in order:
        ins = []
        for i in n.inputs:
            if i is None:
                ins.append(None)
            elif i in copies:
                ins.append(copies[i])
            else:  # an initializer
                c = ir.Value(name=i.name, shape=i.shape, type=i.type, const_value=i.const_value)
                graph.register_initializer(c)
                copies[i] = c
                ins.append(c)
        m = ir.Node(n.domain, n.op_type, ins, attributes=list(n.attributes.values()), num_outputs=len(n.outputs),
                    name=n.name)
        for o, mo in zip(n.outputs, m.outputs):
            mo.name = o.name
            copies[o] = mo
        graph.append(m)
    graph.outputs.append(copies[mask])
    sub = ir.Model(graph, ir_version=model.ir_version)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        s = ort.InferenceSession(ir.to_proto(sub).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        dtype = np.int32 if ids.dtype == ir.DataType.INT32 else np.int64
        got = s.run(None, {ids.name: np.zeros((1, length), dtype=dtype)})[0]
    except Exception as e:  # onnxruntime's own error types
        raise UnsafeRewriteError(f"kv_cache: cannot evaluate the mask of attention {attention} in {where}: "
                                 f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    causal = np.tril(np.ones((length, length), dtype=bool))
    allowed = got if got.dtype == bool else got > -1e30  # an additive mask: 0 attended, −inf (or min) not
    if allowed.shape[-2:] != causal.shape or not (np.broadcast_to(allowed, allowed.shape) == causal).all():
        raise UnsafeRewriteError(f"kv_cache: the mask of attention {attention} in {where} is not the plain causal "
                                 f"mask j ≤ i at {length} tokens (a sliding window, padding or bidirectional "
                                 "attention); the cache would attend differently")
    return length


def with_kv_cache(graph, layout, attention: list[str], report=None):
    """Edit ``graph`` (an ``OnnxGraph`` without a cache) in place into the decoder step for ``layout``, the
    attention ops being the ModelMap's ``attention`` nodes in block order; returns it (``cache`` set)."""
    model, where = graph.model, graph.path
    if graph.cache is not None:
        raise UnsafeRewriteError(f"kv_cache: {where} already has a KV cache")
    graph.opgraph()
    ids = next(v for v in model.graph.inputs if not v.is_initializer())
    roots = []
    for name in attention:
        root = graph.members(name)[0]
        if root.op_type != "Attention" or root.domain not in ("", "ai.onnx"):
            raise UnsafeRewriteError(f"kv_cache: attention {name} in {where} is {root.op_type} (ONNX nodes "
                                     f"{[n.name for n in graph.members(name)][:3]}); the cache rewrite handles "
                                     "the opset-23 Attention op (export at opset 23)")
        roots.append(root)
    matched = set(roots)
    for n in model.graph:
        if n.op_type in _ATTENTION_OPS and n not in matched:
            raise UnsafeRewriteError(f"kv_cache: attention op {n.name} ({n.op_type}) in {where} is not one the "
                                     "matcher found; its keys and values would not be cached")
    if len(roots) != layout.layers:
        raise UnsafeRewriteError(f"kv_cache: {where} has {len(roots)} matched attention ops, the layout "
                                 f"{layout.layers}")
    ranges = position_ranges(model, ids)
    if not ranges:
        raise UnsafeRewriteError(f"kv_cache: no Range(0, S) of {where} reaches RoPE's Cos/Sin (positions are not "
                                 f"RoPE, or computed otherwise: attention {attention[0]}); cannot offset them")
    checked = 0
    for name, root, h, kv in zip(attention, roots, layout.n_heads, layout.n_kv_heads):
        a = root.attributes
        if any(v is not None for v in root.inputs[4:]) or any(o.uses() or o.is_graph_output()
                                                              for o in root.outputs[1:] if o is not None):
            raise UnsafeRewriteError(f"kv_cache: attention {name} ({root.name}) already reads or writes a cache")
        if a.get_float("softcap", 0.0) or a.get_int("qk_matmul_output_mode", 0):
            raise UnsafeRewriteError(f"kv_cache: attention {name} ({root.name}) uses softcap or qk output")
        mask = root.inputs[3] if len(root.inputs) > 3 else None
        if mask is None and not a.get_int("is_causal", 0):
            raise UnsafeRewriteError(f"kv_cache: attention {name} ({root.name}) is neither masked nor causal")
        for pos in (1, 2):
            shape = root.inputs[pos].shape
            if shape is None or len(shape) != 4 or shape[1] not in (h, kv) or shape[3] != layout.head_dim:
                raise UnsafeRewriteError(f"kv_cache: operand {pos} of attention {name} ({root.name}) has shape "
                                         f"{shape}, expected [B, {h} or {kv}, S, {layout.head_dim}]")
        if mask is not None:
            checked = max(checked, check_causal_mask(model, mask, ids, where, name))

    # inputs: input_ids, attention_mask, past K/V
    heads = layout.n_kv_heads
    dtype = roots[0].inputs[1].dtype or ir.DataType.FLOAT
    past = []
    for i, (k, v) in enumerate(cache_names(layout.layers)[0]):
        pair = tuple(ir.Value(name=n, shape=ir.Shape(["batch", heads[i], "past_sequence_length", layout.head_dim]),
                              type=ir.TensorType(dtype)) for n in (k, v))
        past.append(pair)
    mask_in = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "total_sequence_length"]),
                       type=ir.TensorType(ir.DataType.INT64))
    model.graph.inputs.extend([mask_in] + [x for pair in past for x in pair])
    graph._changed()

    # positions: Range(0, S) + P
    first = next(iter(model.graph))
    b = _Builder(graph, first)
    p_len = b.op("Shape", [past[0][0]], "past_length", start=2, end=3)  # [1]
    for r in ranges:
        out = r.outputs[0]
        after = _Builder(graph, r, after=True)
        shifted = after.op("Add", [out, after.op("CastLike", [p_len, out], "past_length")], "positions")
        keep = shifted.producer()
        for user, i in list(out.uses()):
            if user is not keep and user is not keep.inputs[1].producer():
                user.replace_input_with(i, shifted)
        if report is not None:
            report.count("positions offset by P", r.name)

    # K/V through the cache, one causal mask over the cached keys
    causal = None
    present = []
    for i, (name, root, h, kv) in enumerate(zip(attention, roots, layout.n_heads, layout.n_kv_heads)):
        b = _Builder(graph, root)
        for pos in (1, 2):
            op = root.inputs[pos]
            rep = h // kv if op.shape[1] == h else 1
            distinct = op if rep == 1 else b.op("Slice", [op, b.const([0], "s0"), b.const([h], "sh"),
                                                          b.const([1], "ax"), b.const([rep], "st")], "distinct")
            cur = b.op("Concat", [past[i][pos - 1], distinct], "present", axis=2)
            present.append(cur)
            full = cur
            if rep > 1:
                full = b.op("Unsqueeze", [cur, b.const([2], "u2")], "rep")
                full = b.op("Expand", [full, b.const([1, 1, rep, 1, 1], "r")], "rep")
                full = b.op("Reshape", [full, b.const([0, h, -1, layout.head_dim], "hs")], "rep")
            root.replace_input_with(pos, full)
        if causal is None:
            s = b.op("Squeeze", [b.op("Shape", [ids], "seq", start=1, end=2), b.const([0], "a0")], "seq")
            p = b.op("Squeeze", [p_len, b.const([0], "a0")], "past")
            zero, one = b.const(0, "zero"), b.const(1, "one")
            q = b.op("Add", [b.op("Range", [zero, s, one], "q_pos"), p], "q_pos")  # [S]: P + i
            t = b.op("Squeeze", [b.op("Shape", [cur], "keys", start=2, end=3), b.const([0], "a0")], "keys")
            k = b.op("Range", [zero, t, one], "k_pos")  # [T]
            m = b.op("LessOrEqual", [b.op("Unsqueeze", [k, b.const([0], "a0")], "k_row"),
                                     b.op("Unsqueeze", [q, b.const([1], "a1")], "q_col")], "causal")
            causal = b.op("Unsqueeze", [m, b.const([0, 1], "a01")], "causal")  # [1, 1, S, T]
        if len(root.inputs) < 4:
            root.resize_inputs(4)
        root.replace_input_with(3, causal)
        root.attributes["is_causal"] = ir.AttrInt64("is_causal", 0)
        if report is not None:
            report.count("attention with cache", name)

    # outputs: logits, present K/V under genai's names
    logits = model.graph.outputs[0]
    for o in list(model.graph.outputs[1:]):
        model.graph.outputs.remove(o)
    for v, name in zip(present, (n for pair in cache_names(layout.layers)[1] for n in pair)):
        v.name = name
        model.graph.outputs.append(v)
    if ids.name != "input_ids":
        ids.name = "input_ids"
    if logits.name != "logits":
        logits.name = "logits"
    graph._changed()
    graph.eliminate_dead_code()
    graph.cache = Signature("input_ids", "attention_mask", *cache_names(layout.layers),
                            tuple(layout.n_kv_heads), layout.head_dim)
    if report is not None:
        report.notes["cache"] = (f"{layout.layers} layers × (K, V) [B, n_kv_heads, P, {layout.head_dim}]; mask: "
                                 f"causal, no padding (the model's own proven causal up to {checked} tokens)")
    return graph
