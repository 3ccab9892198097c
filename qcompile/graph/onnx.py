"""The ONNX side: read an ONNX model with ``onnx_ir`` and view it as an OpGraph.

The view is the one ``graph/fx.py`` gives of a torch.export capture, so that ``analysis.match`` finds the
same structure in both IRs. ONNX spells a few things differently; the adapter normalizes them here rather
than teaching the matcher a second dialect:

- **Weights.** A linear is a ``MatMul``/``Gemm`` whose weight operand is an initializer, seen through
  Transpose/Cast. Exporters often pre-transpose it into a generated initializer (``val_102``, [in, out]),
  so ``in_axis``/``out_axis`` are the axes of *that initializer*: its name is the weight's identity.
  An ``Add`` of a 1-D initializer right after is the linear's bias. Per-token expert weights
  (``Gather(W[E, out, in], expert)`` feeding a batched ``MatMul``, then ``Squeeze``) are one linear with
  ``experts=E``, as transformers' grouped_mm is on the fx side.
- **Static values.** Values computed from shapes and constants only (Shape, Range, causal masks, position
  ids) carry no data flow; like the sym-int nodes of an fx graph they are not nodes of the view. A static
  scalar operand of an elementwise op is its ``scalar`` attr (and, for + and ·, the data operand moves to
  position 0, as in ``aten.add(x, 1e-6)``); a static tensor operand is one opaque ``other`` node (op
  ``static``).
- **Decompositions.** ``x·Sigmoid(x)`` is silu and the tanh/erf formulas of opsets < 20 are gelu;
  ``Reciprocal(Sqrt(y))`` and ``1/Sqrt(y)`` are rsqrt and ``x/Sqrt(y)`` is ``x·rsqrt(y)`` (the RMSNorm
  the matcher reads); torchlib's scaled-dot-product attention for opsets without ``Attention``
  (``MatMul(q·s, kᵀ·s) [+ mask] → Softmax → MatMul(·, v)``) is one ``attention`` node (q, k, v, mask).
- **onnxruntime's fused attention.** ``GroupQueryAttention`` (onnxruntime-genai's builds; ``graph/onnx_genai``
  unfuses their skip norms before this view) is one ``attention`` node reading q, k, v as ``[B, heads, S, D]``
  views of slices of its packed q|k|v input, through a ``rope`` node each for q and k when RoPE is inside the op
  (attr ``rope_inside``); its present K/V outputs read k and v. A table gathered through its transpose (the
  builder's tie to a [K, N] lm_head) is an embedding.
- **Operand positions** follow the fx convention the matcher reads: norms take their weight at 2 and
  bias at 3; view ops have their data at 0 (shape and axes operands are not edges).

An op of another domain, or one these tables do not cover, keeps kind ``other`` with its op type, so that
a refusal names it. Nodes are named by the ONNX value they produce (synthetic ones add ``::``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, ShapeInferencePass

from qcompile.errors import CaptureError
from qcompile.graph.opgraph import OpGraph

# op type (default ONNX domain) -> kind. Ops marked * are resolved by a ``_Reader._op_<type>`` method (constant
# operands or attributes decide) and fall back to ``other`` when the condition in brackets fails. Patterns that
# span several nodes (linear + bias, expert linears, silu, gelu, rsqrt, decomposed attention) are ``_Reader``
# rules and take precedence.
_KIND = {
    "Identity": "view",
    "Cast": "view",
    "CastLike": "view",
    "Reshape": "view",
    "Transpose": "view",
    "Unsqueeze": "view",
    "Squeeze": "view",
    "Expand": "view",
    "Flatten": "view",
    "Dropout": "view",  # inference: identity
    "Add": "add",  # * scalar attr
    "Sub": "sub",  # * [not c - x]
    "Mul": "mul",  # * scalar attr
    "Div": "div",  # * [not c / x]; 1 / x = reciprocal
    "Pow": "pow",  # * [not c ** x]
    "Neg": "neg",
    "Sqrt": "sqrt",
    "Reciprocal": "reciprocal",
    "Softmax": "softmax",
    "Concat": "cat",
    "ReduceMean": "mean",  # * [over the last axis]
    "ReduceSum": "sum",
    "Relu": "activation",
    "Gelu": "activation",
    "Tanh": "activation",
    "Sigmoid": "activation",
    "MatMul": "linear",  # * [B an initializer (through Transpose/Cast)]
    "Gemm": "linear",  # * [B an initializer, transA=0, alpha=beta=1, C absent or a 1-D initializer]
    "Gather": "embedding",  # * [axis 0 of an initializer]; axis 0 of an activation = index
    "Slice": "slice",  # * [constant starts/ends/axes, steps 1, one sliced axis]
    "Split": "split",  # outputs are slices
    "SplitToSequence": "split",  # SequenceAt of it is a slice
    "SequenceAt": "slice",  # * [constant position]
    "LayerNormalization": "layernorm",  # * [axis -1]
    "RMSNormalization": "rmsnorm",  # * [axis -1] (opset 23)
    "SimplifiedLayerNormalization": "rmsnorm",  # * [axis -1] (onnxruntime)
    "Attention": "attention",  # * [4-D q, k, v] (opset 23)
    "RotaryEmbedding": "rope",  # opset 23
}
_MS_DOMAIN = "com.microsoft"
_MS_KIND = {"GroupQueryAttention": "attention"}  # * [packed q|k|v or separate q, k, v] (onnxruntime contrib ops)
_ACTIVATION_FN = {"Relu": "relu", "Gelu": "gelu", "Tanh": "tanh", "Sigmoid": "sigmoid"}
_STANDARD_DOMAINS = ("", "ai.onnx")
_WEIGHT_VIEWS = ("Transpose", "Cast", "CastLike", "Identity")  # may stand between an initializer and its use
_SHAPE_OPS = ("Shape", "Size")  # read a tensor's shape, not its values
_RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")
# ops whose operands after the first are shapes, axes, split sizes or a dtype example, not data
_DATA_FIRST_ONLY = {k for k, v in _KIND.items() if v == "view"} | {
    "Slice", "Split", "SplitToSequence", "SequenceAt", "ReduceMean", "ReduceSum"}
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Tanh", "Erf")  # what a decomposed gelu is made of
_BIG = 2**62  # a Slice end at least this large means "to the end"
QCOMPILE_DOMAIN = "qcompile"  # calls of the online ops a pass inserted (``graph/onnx_edit``): op type -> kind
_QCOMPILE_KINDS = {"hadamard": "hadamard", "fake_quant": "quant", "duquant": "transform"}


@dataclass
class _Op:
    """One OpGraph node to emit; operands are ONNX values or names of nodes emitted before it."""

    name: str
    kind: str
    op: str
    shape: tuple | None
    operands: list = field(default_factory=list)  # (pos, ir.Value | str)
    attrs: dict = field(default_factory=dict)


@dataclass
class _Fused:
    """A pattern rooted at one ONNX node: the OpGraph nodes it becomes and the ONNX nodes it replaces.

    ``interior`` nodes must be private to the pattern (no reader outside it); ``optional`` ones (views of a
    weight) are absorbed only when they are.
    """

    ops: list[_Op]
    interior: list[ir.Node]
    optional: list[ir.Node] = field(default_factory=list)


def _data_operands(node: ir.Node) -> list[tuple[int, ir.Value]]:
    """(position, value) of the operands that carry data (a view's shape or axes operand does not)."""
    first_only = node.domain in _STANDARD_DOMAINS and node.op_type in _DATA_FIRST_ONLY
    return [(i, v) for i, v in enumerate(node.inputs) if v is not None and (i == 0 or not first_only)]


def _shape(v: ir.Value | None):
    if v is None or v.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in v.shape)


def _rank(v: ir.Value | None) -> int | None:
    s = _shape(v)
    return None if s is None else len(s)


def _producer(v: ir.Value | None) -> ir.Node | None:
    return None if v is None else v.producer()


def _is(v: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The producer of v when it is one of op_types (in the standard domain)."""
    p = _producer(v)
    return p if p is not None and p.domain in _STANDARD_DOMAINS and p.op_type in op_types else None


class _Reader:
    """One pass over an ONNX graph: find the static values, claim multi-node patterns, emit the OpGraph."""

    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.og = OpGraph(source="onnx")
        self.static: set[ir.Value] = set()
        for node in self.graph:  # topological order
            ins = [v for _, v in _data_operands(node)]
            if node.op_type in _SHAPE_OPS or (node.op_type not in _RANDOM and all(self._is_static(v) for v in ins)):
                self.static.update(node.outputs)
        self.fused: dict[ir.Node, _Fused] = {}
        self.absorbed: set[ir.Node] = set()
        self.splits: dict[ir.Value, tuple[int, list[int] | None]] = {}  # SplitToSequence output -> (dim, sizes)
        self.members: dict[str, list[ir.Node]] = {}  # OpGraph node -> the ONNX nodes it stands for (root first)

    # --- values --------------------------------------------------------------------------------------------
    def _is_param(self, v: ir.Value) -> bool:
        """A weight: a floating-point initializer that is not a scalar (scalars and int tensors are constants)."""
        if not v.is_initializer() or v.dtype is None or not v.dtype.is_floating_point():
            return False
        s = _shape(v)
        return s is not None and (len(s) > 0 and not all(d == 1 for d in s))

    def _is_static(self, v: ir.Value) -> bool:
        return v in self.static or (v.is_initializer() and not self._is_param(v))

    def _const(self, v: ir.Value | None):
        """The numpy value of a constant (initializer, Constant, or a cast/reshape of a one-element one)."""
        if v is None or not self._is_static(v):
            return None
        t = ir.convenience.get_const_tensor(v)
        if t is not None:
            return t.numpy()
        p = _is(v, "Cast", "CastLike", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Expand")
        if p is not None:
            c = self._const(p.inputs[0])
            if c is not None and c.size == 1:
                return c
        return None

    def _scalar(self, v: ir.Value | None):
        c = self._const(v)
        if c is None or c.size != 1:
            return None
        x = c.reshape(()).item()
        return x if not isinstance(x, bool) else None

    def _ints(self, v: ir.Value | None) -> list[int] | None:
        c = self._const(v)
        return None if c is None else [int(x) for x in c.reshape(-1)]

    def _weight(self, v: ir.Value):
        """(initializer, perm, views) when v is an initializer seen through Transpose/Cast: axis i of v is
        axis perm[i] of the initializer."""
        views, perm = [], None
        while not self._is_param(v):
            p = _is(v, *_WEIGHT_VIEWS)
            if p is None:
                return None
            if p.op_type == "Transpose":
                r = _rank(p.inputs[0])
                t = list(p.attributes.get_ints("perm", list(reversed(range(r or 0)))))
                perm = t if perm is None else [t[i] for i in perm]
            views.append(p)
            v = p.inputs[0]
        return v, perm or list(range(len(v.shape))), views

    def _private(self, nodes: list[ir.Node], root: ir.Node) -> bool:
        """Whether every reader of the nodes' outputs is among them, the root, or a shape computation."""
        inside = set(nodes) | {root}
        for n in nodes:
            for out in n.outputs:
                if out.is_graph_output():
                    return False
                for use in out.uses():
                    if use.node not in inside and not all(o in self.static for o in use.node.outputs):
                        return False
        return True

    # --- patterns ------------------------------------------------------------------------------------------
    def _fuse(self) -> None:
        """Claim patterns from the outputs back, so that an outer pattern claims its inner nodes first."""
        rules = (self._attention_decomposed, self._linear_bias, self._expert_linear, self._linear, self._gelu,
                 self._silu, self._rsqrt)
        for node in reversed(list(self.graph)):
            if node in self.absorbed or node.domain not in _STANDARD_DOMAINS or self._static_node(node):
                continue
            for rule in rules:
                f = rule(node)
                claimed = f is not None and any(n in self.absorbed or n in self.fused for n in f.interior)
                if f is not None and not claimed and self._private(f.interior, node):
                    self.fused[node] = f
                    self.absorbed.update(f.interior)
                    self.absorbed.update(n for n in f.optional if self._private([n], node) and n not in self.fused)
                    break

    def _linear(self, node: ir.Node) -> _Fused | None:
        """MatMul(x, W) or Gemm(x, W[, b]) with W an initializer (through Transpose/Cast)."""
        if node.op_type == "MatMul":
            x, w = node.inputs
            trans_b, bias = False, None
        elif node.op_type == "Gemm":
            a = node.attributes
            if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
                return None
            x, w = node.inputs[:2]
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            trans_b = bool(a.get_int("transB", 0))
        else:
            return None
        found = self._weight(w)
        if found is None or len(found[0].shape) != 2:
            return None
        init, perm, views = found
        if trans_b:
            perm = perm[::-1]
        in_axis, out_axis = perm[0] - 2, perm[1] - 2
        operands = [(0, x), (1, init)]
        attrs = {"weight": init.name, "bias": None, "in_axis": in_axis, "out_axis": out_axis, "experts": None}
        if bias is not None:
            b = self._bias(bias, init.shape[out_axis])
            if b is None:
                return None
            attrs["bias"] = b[0].name
            operands.append((2, b[0]))
            views += b[2]
        return _Fused([_Op(node.outputs[0].name, "linear", node.op_type, _shape(node.outputs[0]), operands, attrs)],
                      [], views)

    def _bias(self, v: ir.Value, out_features: int):
        b = self._weight(v)
        return b if b is not None and tuple(b[0].shape) == (out_features,) else None

    def _linear_bias(self, node: ir.Node) -> _Fused | None:
        """Add(MatMul(x, W), b) with b a 1-D initializer of the output width: one linear with a bias."""
        if node.op_type != "Add":
            return None
        for y, b in (node.inputs, node.inputs[::-1]):
            mm = _is(y, "MatMul", "Gemm")
            inner = self._linear(mm) if mm is not None else None
            if inner is None or inner.ops[0].attrs["bias"] is not None:
                continue
            lin = inner.ops[0]
            found = self._bias(b, dict(lin.operands)[1].shape[lin.attrs["out_axis"]])
            if found is None:
                continue
            lin.name, lin.shape = node.outputs[0].name, _shape(node.outputs[0])
            lin.attrs["bias"] = found[0].name
            lin.operands.append((2, found[0]))
            return _Fused([lin], [mm], inner.optional + found[2])
        return None

    def _expert_linear(self, node: ir.Node) -> _Fused | None:
        """Squeeze(MatMul(Gather(W[E, ., .], e), Unsqueeze(x))): y[t] = W[e_t]·x[t], a linear over E experts.

        This is transformers' ``batched_mm`` experts implementation; either operand may be the gathered
        weight. The trailing Squeeze of the unit axis is part of the linear, so its output is [tokens, out].
        """
        squeeze = node if node.op_type == "Squeeze" else None
        mm = _is(node.inputs[0], "MatMul") if squeeze else (node if node.op_type == "MatMul" else None)
        if mm is None:
            return None
        for left in (True, False):
            sel, x = mm.inputs if left else mm.inputs[::-1]
            found = self._gathered(sel)
            if found is not None:
                break
        else:
            return None
        init, axes, interior, views, ids = found
        in_axis, out_axis = (axes[1], axes[0]) if left else axes
        if squeeze is not None:
            r = _rank(mm.outputs[0])
            sq = self._ints(squeeze.inputs[1]) if len(squeeze.inputs) > 1 else None
            if r is None or sq is None or [a % r for a in sq] != [r - 1 if left else r - 2]:
                return None
            interior = interior + [mm]
        attrs = {"weight": init.name, "bias": None, "in_axis": in_axis, "out_axis": out_axis,
                 "experts": init.shape[0]}
        out = node.outputs[0]
        lin = _Op(out.name, "linear", "MatMul(Gather)", _shape(out), [(0, x), (1, init), (2, ids)], attrs)
        return _Fused([lin], interior, views)

    def _gathered(self, v: ir.Value):
        """(W, the axes of W behind v's last two, interior, views of W, expert ids) when v = W[e] for a 3-D
        initializer W gathered along its first axis by per-token ids e."""
        interior, perm = [], [0, 1, 2]
        while (p := _is(v, *_WEIGHT_VIEWS)) is not None:
            t = list(p.attributes.get_ints("perm", [2, 1, 0])) if p.op_type == "Transpose" else [0, 1, 2]
            if len(t) != 3:
                return None
            perm = [t[i] for i in perm]
            interior.append(p)
            v = p.inputs[0]
        g = _is(v, "Gather", "GatherND")
        if g is None or perm[0] != 0:
            return None
        if g.op_type == "Gather" and g.attributes.get_int("axis", 0) != 0:
            return None
        ids = g.inputs[1]
        if g.op_type == "GatherND" and (g.attributes.get_int("batch_dims", 0) != 0 or _shape(ids) is None
                                        or _shape(ids)[-1] != 1):
            return None
        found = self._weight(g.inputs[0])
        if found is None or len(found[0].shape) != 3 or found[1][0] != 0:
            return None
        init, p0, views = found
        axes = tuple(p0[perm[i]] - 3 for i in (1, 2))
        return init, axes, interior + [g], views, ids

    def _silu(self, node: ir.Node) -> _Fused | None:
        if node.op_type != "Mul":
            return None
        for x, s in (node.inputs, node.inputs[::-1]):
            sig = _is(s, "Sigmoid")
            if sig is not None and sig.inputs[0] is x:
                out = node.outputs[0]
                return _Fused([_Op(out.name, "activation", "Mul(Sigmoid)", _shape(out), [(0, x)], {"fn": "silu"})],
                              [sig])
        return None

    def _gelu(self, node: ir.Node) -> _Fused | None:
        """gelu as opsets < 20 spell it: x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³))) or x·½·(1 + erf(x/√2)).

        Read as: a Mul computed from one value x alone, through elementwise ops with scalar constants, with
        exactly one Tanh (beside the cube of x) or one Erf on the way.
        """
        if node.op_type != "Mul":
            return None
        xs = [v for v in node.inputs if not self._is_static(v)]
        xs += [u for v in xs if (m := _is(v, "Mul")) is not None for u in m.inputs if not self._is_static(u)]
        for x in xs:
            nodes = self._closure(node, x)
            if nodes is None:
                continue
            ops = [n.op_type for n in nodes]
            cube = any(n.op_type == "Pow" and n.inputs[0] is x and self._scalar(n.inputs[1]) == 3 for n in nodes)
            if ops.count("Tanh") + ops.count("Erf") == 1 and ("Erf" in ops or cube):
                out = node.outputs[0]
                gelu = _Op(out.name, "activation", "gelu(decomposed)", _shape(out), [(0, x)], {"fn": "gelu"})
                return _Fused([gelu], [n for n in nodes if n is not node])
        return None

    def _closure(self, root: ir.Node, x: ir.Value) -> list[ir.Node] | None:
        """The nodes that compute root from x alone by elementwise ops and scalar constants, or None."""
        nodes, stack = [], [root]
        while stack:
            n = stack.pop()
            if n in nodes:
                continue
            if n.domain not in _STANDARD_DOMAINS or n.op_type not in _ELEMENTWISE:
                return None
            nodes.append(n)
            for v in n.inputs:
                if v is x or (self._is_static(v) and self._scalar(v) is not None):
                    continue
                if self._is_static(v) or _producer(v) is None:
                    return None
                stack.append(v.producer())
        return nodes

    def _rsqrt(self, node: ir.Node) -> _Fused | None:
        """Reciprocal(Sqrt(y)) and 1/Sqrt(y) are rsqrt(y); x/Sqrt(y) is x·rsqrt(y)."""
        if node.op_type == "Reciprocal":
            num, den = None, node.inputs[0]
        elif node.op_type == "Div":
            num, den = node.inputs
        else:
            return None
        sq = _is(den, "Sqrt")
        if sq is None:
            return None
        out = node.outputs[0]
        if num is None or self._scalar(num) == 1:
            return _Fused([_Op(out.name, "rsqrt", f"{node.op_type}(Sqrt)", _shape(out), [(0, sq.inputs[0])])], [sq])
        if self._is_static(num):
            return None
        r = _Op(f"{out.name}::rsqrt", "rsqrt", "Div(Sqrt)", _shape(den), [(0, sq.inputs[0])])
        m = _Op(out.name, "mul", "Div(Sqrt)", _shape(out), [(0, num), (1, r.name)], {"scalar": None})
        return _Fused([r, m], [sq])

    def _attention_decomposed(self, node: ir.Node) -> _Fused | None:
        """MatMul(Softmax(MatMul(q·s, kᵀ·s) [+ mask]), v): torchlib's SDPA below opset 23.

        Also read: the scale applied to the scores instead of q and k, a NaN guard ``Where(IsNaN(p), 0, p)``
        and casts on the probabilities. k is the value before the transposition of its last two axes
        (torchlib transposes a [-1, S, D] reshape of it).
        """
        if node.op_type != "MatMul":
            return None
        p, v = node.inputs
        chain = []
        while (sm := _is(p, "Softmax")) is None:
            guard = _is(p, "Where")
            isnan = _is(guard.inputs[0], "IsNaN") if guard is not None else None
            if isnan is not None and isnan.inputs[0] is guard.inputs[2]:
                chain += [guard, isnan]
                p = guard.inputs[2]
            elif (c := _is(p, "Cast", "Identity", "Dropout")) is not None:
                chain.append(c)
                p = c.inputs[0]
            else:
                return None
        r = _rank(sm.inputs[0])
        if r is None or sm.attributes.get_int("axis", -1) % r != r - 1:
            return None
        chain.append(sm)
        s, mask = sm.inputs[0], None
        add = _is(s, "Add")
        if add is not None:
            for scores, m in (add.inputs, add.inputs[::-1]):
                if _is(self._unscale(scores)[0], "MatMul"):
                    chain.append(add)
                    s, mask = scores, m
                    break
        s, scale_ops = self._unscale(s)
        mm = _is(s, "MatMul")
        if mm is None:
            return None
        q, q_ops = self._unscale(mm.inputs[0])
        found = self._untranspose(mm.inputs[1], _rank(q))
        if found is None:
            return None
        k, k_ops = found
        chain += scale_ops + [mm] + q_ops + k_ops
        operands = [(0, q), (1, k), (2, v)] + ([(3, mask)] if mask is not None else [])
        out = node.outputs[0]
        return _Fused([_Op(out.name, "attention", "MatMul/Softmax/MatMul", _shape(out), operands)], chain)

    def _unscale(self, v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
        """v without multiplications (divisions) by static scalars, and those nodes."""
        nodes = []
        while (p := _is(v, "Mul", "Div")) is not None:
            a, b = p.inputs
            if self._is_static(b) and not self._is_static(a):
                v = a
            elif p.op_type == "Mul" and self._is_static(a) and not self._is_static(b):
                v = b
            else:
                break
            nodes.append(p)
        return v, nodes

    def _untranspose(self, kt: ir.Value, rank: int | None):
        """(k, nodes) for kᵀ built from k by scalar scales, reshapes and one swap of the last two axes."""
        if rank is None:
            return None
        v, nodes, swapped = kt, [], False
        while not (swapped and _rank(v) == rank):
            p = _producer(v)
            if p is None or p.domain not in _STANDARD_DOMAINS:
                return None
            if p.op_type in ("Mul", "Div"):
                u, scale = self._unscale(v)
                if not scale:
                    return None
                nodes += scale
                v = u
                continue
            if p.op_type == "Transpose":
                perm = list(p.attributes.get_ints("perm", []))
                n = len(perm)
                if swapped or n < 2 or perm != list(range(n - 2)) + [n - 1, n - 2]:
                    return None
                swapped = True
            elif p.op_type not in ("Reshape", "Identity", "Cast"):
                return None
            nodes.append(p)
            v = p.inputs[0]
        return v, nodes

    # --- single nodes --------------------------------------------------------------------------------------
    def _static_node(self, node: ir.Node) -> bool:
        return bool(node.outputs) and all(o in self.static for o in node.outputs)

    def _translate(self, node: ir.Node) -> list[_Op]:
        """The OpGraph node(s) of one ONNX node that no pattern claimed."""
        op = node.op_type
        if node.domain == QCOMPILE_DOMAIN and op.split("_n")[0] in _QCOMPILE_KINDS:
            out = node.outputs[0]
            attrs = {k: a.value for k, a in node.attributes.items()}
            return [_Op(out.name, _QCOMPILE_KINDS[op.split("_n")[0]], f"qcompile.{op}", _shape(out),
                        [(0, node.inputs[0])], attrs)]
        kind = _KIND.get(op, "other") if node.domain in _STANDARD_DOMAINS else \
            _MS_KIND.get(op, "other") if node.domain == _MS_DOMAIN else "other"
        handler = getattr(self, f"_op_{op}", None) if kind != "other" else None
        out = node.outputs[0]
        result = handler(node) if handler else None
        if result is None:
            if handler:
                kind = "other"  # the condition of the table did not hold
            attrs = {"fn": _ACTIVATION_FN[op]} if kind == "activation" else {}
            result = _Op(out.name, kind, op, _shape(out), _data_operands(node), attrs)
        ops = result if isinstance(result, list) else [result]
        # extra outputs of an op the view does not model (TopK indices, ...): opaque nodes reading the first
        named = {o.name for o in ops}
        for i, extra in enumerate(node.outputs[1:], 1):
            if extra.name not in named and extra.uses() and extra not in self.static:
                ops.append(_Op(extra.name, "other", f"{op}:{i}", _shape(extra), [(0, out.name)]))
        return ops

    def _elementwise(self, node: ir.Node, kind: str):
        a, b = node.inputs[:2]
        out = node.outputs[0]
        sa, sb = self._scalar(a), self._scalar(b)
        if sb is not None:
            return _Op(out.name, kind, node.op_type, _shape(out), [(0, a)], {"scalar": sb})
        if sa is not None:
            if kind in ("add", "mul"):
                return _Op(out.name, kind, node.op_type, _shape(out), [(0, b)], {"scalar": sa})
            if kind == "div" and sa == 1:
                return _Op(out.name, "reciprocal", node.op_type, _shape(out), [(0, b)])
            return _Op(out.name, "other", node.op_type, _shape(out), [(1, b)])  # c - x, c / x, c ** x
        return _Op(out.name, kind, node.op_type, _shape(out), [(0, a), (1, b)], {"scalar": None})

    def _op_Add(self, node):
        return self._elementwise(node, "add")

    def _op_Sub(self, node):
        return self._elementwise(node, "sub")

    def _op_Mul(self, node):
        return self._elementwise(node, "mul")

    def _op_Div(self, node):
        return self._elementwise(node, "div")

    def _op_Pow(self, node):
        return self._elementwise(node, "pow")

    def _op_MatMul(self, node):
        return None  # only as a linear or inside attention (patterns); a product of two activations is other

    _op_Gemm = _op_MatMul

    def _op_Gather(self, node):
        data, ids = node.inputs
        if node.attributes.get_int("axis", 0) != 0:
            return None
        found = self._weight(data)
        # a table read as stored, or a 2-D one stored transposed: onnxruntime-genai ties the embedding to a
        # [K, N] lm_head by gathering rows of Transpose(lm_head)
        kind = "embedding" if found is not None and (found[1] == sorted(found[1]) or found[1] == [1, 0]) else "index"
        out = node.outputs[0]
        return _Op(out.name, kind, "Gather", _shape(out), [(0, data), (1, ids)])

    def _op_Slice(self, node):
        x = node.inputs[0]
        shape = _shape(x)
        if len(node.inputs) > 1:
            starts, ends = self._ints(node.inputs[1]), self._ints(node.inputs[2])
            axes = self._ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            steps = self._ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        else:  # opset < 10: attributes
            a = node.attributes
            starts, ends, axes, steps = (a.get_ints(k, None) for k in ("starts", "ends", "axes", "steps"))
        if shape is None or starts is None or ends is None:
            return None
        rank = len(shape)
        axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
        if steps is not None and any(s != 1 for s in steps):
            return None
        cut = []
        for ax, start, end in zip(axes, starts, ends):
            n = shape[ax]
            if n is not None:
                start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
            if not (start == 0 and (end >= _BIG or (n is not None and end >= n))):
                cut.append((ax, start, None if end >= _BIG or (n is not None and end >= n) else end))
        if len(cut) > 1:
            return None
        ax, start, stop = cut[0] if cut else (axes[0], 0, None)
        out = node.outputs[0]
        return _Op(out.name, "slice", "Slice", _shape(out), [(0, x)], {"dim": ax - rank, "start": start, "stop": stop})

    def _op_Split(self, node):
        x = node.inputs[0]
        rank = _rank(x)
        if rank is None:
            return None
        dim = node.attributes.get_int("axis", 0) % rank
        sizes = [(_shape(o) or [None] * rank)[dim] for o in node.outputs]
        if None in sizes:
            sizes = (self._ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None
                     else node.attributes.get_ints("split", None))
        if sizes is None:
            return None
        split = _Op(f"{node.outputs[0].name}::split", "split", "Split", _shape(x), [(0, x)])
        ops, start = [split], 0
        for out, size in zip(node.outputs, sizes):
            ops.append(_Op(out.name, "slice", "Split", _shape(out), [(0, split.name)],
                           {"dim": dim - rank, "start": start, "stop": start + size}))
            start += size
        return ops

    def _op_SplitToSequence(self, node):
        x = node.inputs[0]
        rank = _rank(x)
        if rank is None or not node.attributes.get_int("keepdims", 1):
            return None
        dim = node.attributes.get_int("axis", 0) % rank
        n = _shape(x)[dim]
        split = self._const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if split is None:  # pieces of one element, or a split not known
            sizes = [1] * n if n is not None and len(node.inputs) < 2 else None
        elif split.ndim == 0:  # pieces of one size, the last one shorter
            sizes = [min(int(split), n - i) for i in range(0, n, int(split))] if n is not None else None
        else:
            sizes = [int(s) for s in split]
        self.splits[node.outputs[0]] = (dim - rank, sizes)
        out = node.outputs[0]
        return _Op(out.name, "split", "SplitToSequence", _shape(x), [(0, x)])

    def _op_SequenceAt(self, node):
        seq, pos = node.inputs
        dim, sizes = self.splits.get(seq, (None, None))
        i = self._scalar(pos)
        if sizes is None or i is None or not -len(sizes) <= i < len(sizes):
            return None
        i %= len(sizes)
        start = sum(sizes[:i])
        out = node.outputs[0]
        return _Op(out.name, "slice", "SequenceAt", _shape(out), [(0, seq)],
                   {"dim": dim, "start": start, "stop": start + sizes[i]})

    def _op_ReduceMean(self, node):
        x = node.inputs[0]
        rank = _rank(x)
        axes = self._ints(node.inputs[1]) if len(node.inputs) > 1 else node.attributes.get_ints("axes", None)
        if rank is None or axes is None or [a % rank for a in axes] != [rank - 1]:
            return None
        out = node.outputs[0]
        return _Op(out.name, "mean", "ReduceMean", _shape(out), [(0, x)])

    def _norm(self, node, kind):
        x = node.inputs[0]
        rank = _rank(x)
        if rank is None or node.attributes.get_int("axis", -1) % rank != rank - 1:
            return None
        out = node.outputs[0]
        operands = [(0, x), (2, node.inputs[1])] + ([(3, node.inputs[2])] if len(node.inputs) > 2 else [])
        return _Op(out.name, kind, node.op_type, _shape(out), operands,
                   {"eps": node.attributes.get_float("epsilon", 1e-5)})

    def _op_LayerNormalization(self, node):
        return self._norm(node, "layernorm")

    def _op_RMSNormalization(self, node):
        return self._norm(node, "rmsnorm")

    _op_SimplifiedLayerNormalization = _op_RMSNormalization

    def _op_Attention(self, node):
        """Opset 23 Attention with 4-D [batch, heads, seq, head_dim] q, k, v (the matcher reads heads there)."""
        if any(_rank(v) != 4 for v in node.inputs[:3]):
            return None
        out = node.outputs[0]
        operands = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
        return _Op(out.name, "attention", "Attention", _shape(out), operands)

    def _op_GroupQueryAttention(self, node):
        """onnxruntime's ``GroupQueryAttention(q|k|v packed [B, S, (H + 2·H_kv)·D], or q, k, v; past K/V, seqlens,
        total length, cos, sin)``: one ``attention`` node reading q, k, v as [B, heads, S, D] views (of slices of
        the packed input, through a ``rope`` node each for q and k with ``do_rotary``), as the matcher reads
        heads; the present K/V outputs read k and v. Rotary inside the op is attr ``rope_inside``: no value
        lies between RoPE and the scores (the sequence lengths and the cache are not data edges of the view)."""
        a = node.attributes
        h, kv = a.get_int("num_heads", 0), a.get_int("kv_num_heads", 0)
        x = node.inputs[0]
        packed = len(node.inputs) < 3 or node.inputs[1] is None or node.inputs[2] is None
        width = (_shape(x) or [None])[-1]
        if not h or not kv or not isinstance(width, int):
            return None
        d = width // (h + 2 * kv) if packed else width // h
        out, rotary = node.outputs[0], bool(a.get_int("do_rotary", 0))
        ops, heads = [], []
        for role, n, start, src in (("q", h, 0, x), ("k", kv, h * d, node.inputs[1]), ("v", kv, (h + kv) * d,
                                                                                     node.inputs[2])):
            ref = src
            if packed:
                ref = f"{out.name}::{role}"
                ops.append(_Op(ref, "slice", "GroupQueryAttention", (None, None, n * d), [(0, x)],
                               {"dim": -1, "start": start, "stop": start + n * d}))
            if rotary and role != "v":
                ops.append(_Op(f"{out.name}::{role}_rope", "rope", "GroupQueryAttention(do_rotary)",
                               (None, None, n * d), [(0, ref)]))
                ref = ops[-1].name
            ops.append(_Op(f"{out.name}::{role}_heads", "view", "GroupQueryAttention", (None, n, None, d), [(0, ref)]))
            heads.append(ops[-1].name)
        ops.append(_Op(out.name, "attention", "GroupQueryAttention", _shape(out), list(enumerate(heads)),
                       {"rope_inside": rotary}))
        for present, src in zip(node.outputs[1:3], heads[1:]):
            if present is not None and present.name:
                ops.append(_Op(present.name, "other", "GroupQueryAttention:present", _shape(present), [(0, src)]))
        return ops

    # --- emission ------------------------------------------------------------------------------------------
    def _ref(self, v: ir.Value) -> str:
        """The OpGraph node standing for value v, adding param/static nodes on first use."""
        g = self.og.graph
        if v.name not in g:
            if self._is_param(v):
                self.og.add(v.name, "param", "initializer", _shape(v), param=v.name)
            elif self._is_static(v):
                self.og.add(v.name, "other", "static", _shape(v))
            else:
                raise CaptureError(f"ONNX value {v.name!r} is read before it is produced; is the graph sorted?")
        return v.name

    def _emit(self, op: _Op) -> None:
        self.og.add(op.name, op.kind, op.op, op.shape, **op.attrs)
        for pos, v in op.operands:
            if v is None:
                continue
            if isinstance(v, ir.Value) and self._is_static(v) and self._scalar(v) is not None:
                continue  # a scalar operand the op did not take as its ``scalar``: a constant, not data
            self.og.connect(v if isinstance(v, str) else self._ref(v), op.name, pos)

    def run(self) -> OpGraph:
        for v in self.graph.inputs:
            if not v.is_initializer():
                self.og.add(v.name, "input", "input", _shape(v))
        self._fuse()
        for node in self.graph:
            if node in self.absorbed or self._static_node(node):
                continue
            nodes = [node, *self.fused[node].interior] if node in self.fused else [node]
            for op in self.fused[node].ops if node in self.fused else self._translate(node):
                self._emit(op)
                self.members[op.name] = nodes
        out = "output"
        while out in self.og.graph:
            out += "_"
        self.og.add(out, "output", "output")
        for i, v in enumerate(self.graph.outputs):
            self.og.connect(self._ref(v), out, i)
        return self.og


def _load(model_or_path) -> ir.Model:
    if isinstance(model_or_path, ir.Model):
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):  # an onnx.ModelProto
        return ir.from_proto(model_or_path)
    path = Path(model_or_path)
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf and os errors of many types: name the file and the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"cannot read ONNX model {path}: {type(e).__name__}: {reason}") from e
    if not len(model.graph) or not model.graph.outputs:  # protobuf parses an empty file as an empty model
        raise CaptureError(f"cannot read ONNX model {path}: it holds no graph (empty, or not an ONNX file)")
    return model


def prepare(model: ir.Model, where) -> ir.Model:
    """Inline the model-local functions (but qcompile's own online ops) and infer shapes, in place: the
    matcher reads head counts and widths from value shapes, which exporters leave partly unannotated."""
    try:
        if any(f.domain != QCOMPILE_DOMAIN for f in model.functions.values()):
            model = InlinePass()(model).model
        return ShapeInferencePass(strict_mode=False)(model).model
    except Exception as e:
        raise CaptureError(f"cannot prepare ONNX model {where}: {type(e).__name__}: {e}") from e


def onnx_view(model: ir.Model) -> tuple[OpGraph, dict[str, list[ir.Node]]]:
    """The OpGraph of a prepared model and, per OpGraph node, the ONNX nodes it stands for (root first)."""
    reader = _Reader(model)
    return reader.run(), reader.members


def onnx_to_opgraph(model_or_path) -> OpGraph:
    """The OpGraph view of an ONNX model (a path, an ``onnx_ir.Model`` or an ``onnx.ModelProto``), prepared
    first (``prepare``: in place on an ``onnx_ir.Model``)."""
    return onnx_view(prepare(_load(model_or_path), model_or_path))[0]


def export_tiny_onnx(model, path, *, opset: int = 23, optimize: bool = False, example_ids=None) -> Path:
    """Export a causal LM (input_ids → logits, no KV cache) with ``torch.onnx.export(dynamo=True)``.

    Batch and sequence length are dynamic. ``optimize=False`` keeps the graph a direct translation of the
    torch.export capture (decomposed RMSNorm and RoPE, Gemma's ``1 + γ`` kept as an Add); ``optimize=True``
    runs onnxscript's optimizer as a default export does (fused RMSNormalization / RotaryEmbedding at opset
    23, pre-transposed ``val_*`` weights, ``1 + γ`` folded into a new initializer).

    MoE experts run as transformers' ``batched_mm`` during the export: torch.onnx has no translation of
    the ``transformers::grouped_mm_fallback`` op that the default ``grouped_mm`` calls, and ``batched_mm``
    computes the same with Gather and MatMul. The model's setting is restored afterwards.
    """
    import torch

    from qcompile.graph.fx import export_error, export_inputs

    example_ids, dims = export_inputs(model, example_ids)
    config = getattr(model, "config", None)
    experts = getattr(config, "_experts_implementation", None)
    switch = experts not in (None, "eager", "batched_mm") and model._can_set_experts_implementation()
    try:
        if switch:
            model.set_experts_implementation("batched_mm")
        with torch.no_grad():
            program = torch.onnx.export(
                model, (example_ids,), dynamo=True, opset_version=opset, optimize=optimize, verbose=False,
                input_names=["input_ids"], output_names=["logits"], dynamic_shapes=(dims,),
            )
    except Exception as e:
        raise export_error("torch.onnx.export", model, e) from e
    finally:
        if switch:
            model.set_experts_implementation(experts)
    path = Path(path)
    program.save(path)
    return path
