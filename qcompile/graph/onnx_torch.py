"""The ONNX graph evaluated with torch ops: a differentiable forward of an ONNX Program.

SpinQuant learns R1/R2 by gradients of the loss through the model (``passes/spinquant``); onnxruntime
computes no gradients, so on an ONNX Program the forward is this interpreter: every node of the graph
(in order) computed by the torch op of the same definition, the weights read from the Program unless
``params`` replaces them (as ``torch.func.functional_call`` does for a torch.fx module), so gradients flow
from the logits into any tensor passed there. It evaluates *the* graph — whatever a pass inserted is in it —
and so needs no model rebuilt beside it: the ``qcompile`` online ops are ``torch.ops.qcompile.hadamard`` /
``fake_quant`` (straight-through gradients, as in the fx training forward), ONNX ``Attention`` is
``scaled_dot_product_attention``. Values agree with onnxruntime to float32 rounding (a test checks the logits).

Only the standard ops a ``torch.onnx.export`` decoder uses are known; another op is refused by name at
construction, before any work.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from qcompile.errors import QCompileError
from qcompile.graph.onnx import QCOMPILE_DOMAIN

_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.DOUBLE: torch.float64,
    ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
    ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8, ir.DataType.BOOL: torch.bool,
}


def _dtype(code: int) -> torch.dtype:
    d = ir.DataType(code)
    if d not in _DTYPES:
        raise QCompileError(f"onnx_torch: no torch dtype for {d.name}")
    return _DTYPES[d]


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axes(node, x: torch.Tensor | None, pos: int, attr: str = "axes") -> list[int] | None:
    """Axes from input ``pos`` (newer opsets) or attribute ``attr``."""
    if pos < len(x) and x[pos] is not None:
        return _ints(x[pos])
    a = node.attributes.get(attr)
    return list(a.as_ints()) if a is not None else None


def _reshape(x, shape, allowzero):
    shape = _ints(shape)
    if not allowzero:
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _slice(node, x):
    data, starts, ends = x[0], _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise QCompileError(f"onnx_torch: Slice {node.name} has step {st}; only positive steps are evaluated")
        index[a % data.dim()] = slice(s, e, st)
    return data[tuple(index)]


def _gather(node, x):
    data, idx = x
    axis = node.attributes.get_int("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return data[(slice(None),) * axis + (idx,)]


def _gather_nd(node, x):
    data, idx = x
    if node.attributes.get_int("batch_dims", 0) != 0:
        raise QCompileError(f"onnx_torch: GatherND {node.name} with batch_dims is not evaluated")
    return data[tuple(idx[..., i] for i in range(idx.shape[-1]))]


def _reduce(f):
    """ReduceMean/ReduceSum: axes from input 1 (opset 18+) or the attribute; none: every axis (or a no-op)."""
    def run(node, x):
        axes = _axes(node, x, 1)
        keep = bool(node.attributes.get_int("keepdims", 1))
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        return f(x[0], dim=tuple(axes), keepdim=keep)
    return run


def _topk(node, x):
    values, indices = torch.topk(x[0], int(x[1]), dim=node.attributes.get_int("axis", -1),
                                 largest=bool(node.attributes.get_int("largest", 1)),
                                 sorted=bool(node.attributes.get_int("sorted", 1)))
    return values, indices


def _unsqueeze(node, x):
    y = x[0]
    for a in sorted(a % (x[0].dim() + len(_axes(node, x, 1))) for a in _axes(node, x, 1)):
        y = y.unsqueeze(a)
    return y


def _squeeze(node, x):
    axes = _axes(node, x, 1)
    if axes is None:
        return x[0].squeeze()
    return x[0].squeeze(tuple(a % x[0].dim() for a in axes))


def _attention(node, x):
    """ONNX ``Attention`` (opset 23) on 4-D [B, H, S, D] q/k/v: softmax(q·kᵀ·scale + mask)·v."""
    if len(x) > 4 and any(v is not None for v in x[4:]):
        raise QCompileError(f"onnx_torch: Attention {node.name} with a past cache is not evaluated")
    q, k, v = x[:3]
    mask = x[3] if len(x) > 3 else None
    if q.dim() != 4:
        raise QCompileError(f"onnx_torch: Attention {node.name} on {q.dim()}-D inputs is not evaluated")
    for a in ("softcap",):
        if node.attributes.get_float(a, 0.0) != 0.0:
            raise QCompileError(f"onnx_torch: Attention {node.name} with {a} is not evaluated")
    scale = node.attributes.get_float("scale", 1.0 / math.sqrt(q.shape[-1]))
    causal = bool(node.attributes.get_int("is_causal", 0))
    if causal and mask is not None:
        causal_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
        mask = mask & causal_mask if mask.dtype == torch.bool else mask.masked_fill(~causal_mask, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _rms(node, x):
    axis = node.attributes.get_int("axis", -1) % x[0].dim()
    eps = node.attributes.get_float("epsilon", 1e-5)
    dims = tuple(range(axis, x[0].dim()))
    xf = x[0].float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)).to(x[0].dtype)
    return y * x[1] if len(x) > 1 and x[1] is not None else y


def _layer_norm(node, x):
    axis = node.attributes.get_int("axis", -1) % x[0].dim()
    eps = node.attributes.get_float("epsilon", 1e-5)
    w = x[1] if len(x) > 1 else None
    b = x[2] if len(x) > 2 else None
    return F.layer_norm(x[0], x[0].shape[axis:], w, b, eps)


def _expand(node, x):
    return x[0].expand(torch.broadcast_shapes(x[0].shape, tuple(_ints(x[1]))))


def _shape(node, x):
    s = list(x[0].shape)
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(s))
    return torch.tensor(s[start:end], dtype=torch.int64)


def _constant(node, x):
    attr = next(iter(node.attributes.values()))
    if attr.name == "value":
        return torch.from_numpy(np.array(attr.as_tensor().numpy()))
    if attr.name in ("value_int", "value_ints"):
        return torch.tensor(attr.value, dtype=torch.int64)
    if attr.name in ("value_float", "value_floats"):
        return torch.tensor(attr.value, dtype=torch.float32)
    raise QCompileError(f"onnx_torch: Constant {node.name} with {attr.name} is not evaluated")


def _split(node, x):
    axis = node.attributes.get_int("axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else None
    if sizes is None:
        n = len(node.outputs)
        sizes = [math.ceil(x[0].shape[axis] / n)] * n
    return tuple(torch.split(x[0], sizes, dim=axis))


def _softmax(node, x):
    return torch.softmax(x[0], dim=node.attributes.get_int("axis", -1))


def _concat(node, x):
    return torch.cat(x, dim=node.attributes.get_int("axis", 0))


def _trilu(node, x):
    k = int(x[1]) if len(x) > 1 and x[1] is not None else 0
    return x[0].triu(k) if node.attributes.get_int("upper", 1) else x[0].tril(k)


def _cumsum(node, x):
    if node.attributes.get_int("reverse", 0) or node.attributes.get_int("exclusive", 0):
        raise QCompileError(f"onnx_torch: CumSum {node.name} reverse/exclusive is not evaluated")
    return torch.cumsum(x[0], dim=int(x[1]))


def _transpose(node, x):
    perm = node.attributes.get_ints("perm", None)
    return x[0].permute(list(perm) if perm is not None else list(range(x[0].dim()))[::-1])


def _gelu(node, x):
    approx = node.attributes.get_string("approximate", "none")
    return F.gelu(x[0], approximate=approx)


def _gemm(node, x):
    a, b = x[0], x[1]
    if node.attributes.get_int("transA", 0):
        a = a.T
    if node.attributes.get_int("transB", 0):
        b = b.T
    y = node.attributes.get_float("alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        y = y + node.attributes.get_float("beta", 1.0) * x[2]
    return y


def _split_to_sequence(node, x):
    axis = node.attributes.get_int("axis", 0)
    if len(x) < 2 or x[1] is None:
        parts = list(torch.split(x[0], 1, dim=axis))
        return [p.squeeze(axis) for p in parts] if node.attributes.get_int("keepdims", 1) == 0 else parts
    sizes = _ints(x[1])
    return list(torch.split(x[0], sizes if len(sizes) > 1 else sizes[0], dim=axis))


def _variadic(f):
    def run(node, x):
        y = x[0]
        for t in x[1:]:
            y = f(y, t)
        return y
    return run


def _unary(f):
    return lambda node, x: f(x[0])


def _binary(f):
    return lambda node, x: f(x[0], x[1])


_OPS = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(torch.div),
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum), "Equal": _binary(torch.eq), "LessOrEqual": _binary(torch.le),
    "Less": _binary(torch.lt), "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Neg": _unary(torch.neg), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Sigmoid": _unary(torch.sigmoid), "Cos": _unary(torch.cos), "Sin": _unary(torch.sin), "Not": _unary(torch.logical_not),
    "Tanh": _unary(torch.tanh), "Exp": _unary(torch.exp), "Erf": _unary(torch.erf), "Relu": _unary(torch.relu),
    "Abs": _unary(torch.abs), "IsNaN": _unary(torch.isnan), "IsInf": _unary(torch.isinf), "Identity": _unary(lambda t: t), "Softplus": _unary(F.softplus),
    "Where": lambda node, x: torch.where(x[0], x[1], x[2]),
    "Cast": lambda node, x: x[0].to(_dtype(node.attributes.get_int("to"))),
    "CastLike": lambda node, x: x[0].to(x[1].dtype),
    "Constant": _constant, "Shape": _shape, "Reshape": lambda node, x: _reshape(x[0], x[1], node.attributes.get_int("allowzero", 0)),
    "Transpose": _transpose,
    "Range": lambda node, x: torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype),
    "Slice": _slice, "Gather": _gather, "GatherND": _gather_nd, "ReduceMean": _reduce(torch.mean), "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Expand": _expand, "Concat": _concat, "Split": _split, "Softmax": _softmax,
    "ReduceSum": _reduce(torch.sum), "TopK": _topk, "Gemm": _gemm, "SplitToSequence": _split_to_sequence, "SequenceAt": lambda node, x: x[0][int(x[1])],
    "Attention": _attention, "RMSNormalization": _rms, "SimplifiedLayerNormalization": _rms,
    "LayerNormalization": _layer_norm, "Trilu": _trilu, "CumSum": _cumsum, "Gelu": _gelu,
}


def _online(node):
    """The torch op of a ``qcompile`` online function call (``graph.onnx_edit``), or None."""
    from qcompile.graph.edit import FakeQuant, Hadamard
    from qcompile.graph.onnx_edit import online_op

    import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)

    op = online_op(node.op_type)
    if isinstance(op, Hadamard):
        return lambda x: torch.ops.qcompile.hadamard(x[0], op.block)
    if isinstance(op, FakeQuant):
        return lambda x: torch.ops.qcompile.fake_quant(x[0], op.bits, op.symmetric, op.clip)
    return None


class TorchForward:
    """``forward(input_ids, params) → logits`` of an ``OnnxGraph`` as it is now (see the module docstring).

    Built once per graph state: the constants are converted to tensors here, the weights are read from
    the graph at every call (so ``set_weight`` between calls is seen) unless ``params`` holds them."""

    def __init__(self, graph):
        self.graph = graph
        g = graph.model.graph
        self.nodes = list(g)
        self.fns = []
        for node in self.nodes:
            if node.domain == QCOMPILE_DOMAIN:
                fn = _online(node)
                if fn is None:
                    raise QCompileError(f"{graph.path}: node {node.name} ({node.op_type}) has no torch evaluation "
                                        "(a differentiable forward evaluates the Hadamard and fake-quant ops only)")
                self.fns.append(lambda n, x, fn=fn: fn(x))
            elif node.domain in ("", "ai.onnx") and node.op_type in _OPS:
                self.fns.append(_OPS[node.op_type])
            else:
                raise QCompileError(f"{graph.path}: node {node.name} ({node.domain or 'ai.onnx'}::{node.op_type}) "
                                    "has no torch evaluation; a differentiable forward (SpinQuant's training) needs "
                                    "a torch.onnx.export decoder's standard ops")
        self.consts = {name: torch.from_numpy(np.array(v.const_value.numpy()))
                       for name, v in g.initializers.items() if name not in graph.weights}
        ins = [v for v in g.inputs if not v.is_initializer()]
        if len(ins) != 1:
            raise QCompileError(f"{graph.path}: a differentiable forward needs one input_ids input, the graph has "
                                f"{[v.name for v in ins]} (a KV-cache step)")
        self.input = ins[0]

    def __call__(self, input_ids: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        params = params or {}
        g = self.graph.model.graph
        env: dict[str, torch.Tensor] = {self.input.name: input_ids.to(_dtype(self.input.dtype.value))}

        def get(v):
            if v is None:
                return None
            name = v.name
            if name in env:
                return env[name]
            if name in params:
                return params[name]
            if name in self.graph.weights:
                return self.graph.weights[name]
            return self.consts[name]

        for node, fn in zip(self.nodes, self.fns):
            out = fn(node, [get(v) for v in node.inputs])
            outs = out if isinstance(out, tuple) else (out,)
            for v, t in zip(node.outputs, outs):
                env[v.name] = t
        return env[g.outputs[0].name]
