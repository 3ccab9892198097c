"""ONNX translations of the ``torch.ops.qcompile.*`` ops, for ``torch.onnx.export(..., dynamo=True)``.

One translation per op (``translation_table``), written as plain onnxscript op calls; the algebra is the
reference's (``kernels/reference.py``), spelled in ONNX:

* ``hadamard(x, block)``: ``x·(H_m ⊗ H_p)/√n = H_mᵀ·X·H_p/√n`` with X the ``(m, p)`` view of each block
  (``quant/hadamard``'s convention): a reshape and two small matmuls, ``n·(m + p)`` multiply-adds per
  row instead of the dense ``n²``.
* ``quantize_per_token``: ``formats.compute_qparams`` per row (min/max widened to contain 0, clip,
  ``round`` half to even as torch does), then the int8 codes shifted by ``2^(b−1)`` — bit-exact with the
  reference for the same float32 input.
* ``linear_w4a16``: ``com.microsoft::MatMulNBits`` (bits 4). The translation wires the canonical
  initializers (``<weight>_packed/_scales/_zeros``); ``pack_matmulnbits`` then rewrites them once, after
  export, into the MatMulNBits layout by ``layout.to_matmulnbits`` (the one derived layout).
* ``linear_w4a8`` / ``linear_w4a4``: ``y = s_a·Σ_G s_w[G]·Σ_{k∈G}(a_k − z_a)(q_k − z_w)`` with the inner
  sums exact in int32 by ``MatMulInteger`` on int8 operands. The signed weight ``q − z_w`` is computed in
  the graph from the canonical int4 initializers (nibble unpacking, zero subtraction): every input is a
  constant, and the export folds it into an int8 initializer (onnxruntime would recompute it every run).
  An asymmetric activation zero is ``Σ a·w − z_a·Σ w`` (column sums folded the same way).
  Grouped weights are a batch of ``G`` MatMulIntegers ``[G, T, g] × [G, g, N]``; a partial last group is
  zero-padded (the padded weights are 0, so the padded activations multiply nothing).
* ``fake_quant`` (KV cache): quantize-dequantize per row, exactly as ``formats.fake_quantize_per_token``.

The other route for W4A8/W4A4 is ``MatMulNBits`` itself (4-bit storage, onnxruntime's fastest CPU kernels):
``w4ax_as_matmulnbits`` rewrites the fx graph so that each such linear reads its (rotated) input through
``linear_w4a16``: A8 with ``accuracy_level=4`` (int8 activations per block, onnxruntime's), A4 after the
recipe's exact per-token fake quantization with float products.
"""

from __future__ import annotations

import operator

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from qcompile.errors import ShapeError
from qcompile.kernels.layout import matmulnbits_block_size, to_matmulnbits
from qcompile.quant.hadamard import hadamard_factors, hadamard_matrix

MSFT = Opset("com.microsoft", 1)


def _matmulnbits_schema():
    """The part of onnxruntime's ``com.microsoft::MatMulNBits`` schema the tracer needs (inputs A, B, scales,
    zero_points; attributes K, N, bits, block_size, accuracy_level)."""
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attrs = [OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("K", "N", "block_size")]
    attrs += [OpSchema.Attribute("bits", OpSchema.AttrType.INT, "", required=False),
              OpSchema.Attribute("accuracy_level", OpSchema.AttrType.INT, "", required=False)]
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T3", "", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "")],
        attributes=attrs)


MatMulNBits = Op(MSFT, "MatMulNBits", _matmulnbits_schema())
qops = torch.ops.qcompile

GROUP_KEY = "qcompile.group_size"  # metadata of a MatMulNBits node still wired to canonical initializers
FLOAT = ir.DataType.FLOAT
TINY = float(np.finfo(np.float32).tiny)


def _const(array: np.ndarray):
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def _f(v: float):
    return _const(np.array(v, dtype=np.float32))


def _i64(values):
    return _const(np.array(values, dtype=np.int64))


def _static_dim(x, axis: int, what: str) -> int:
    d = x.shape[axis] if x.shape is not None else None
    if not isinstance(d, int):
        raise ShapeError(f"ONNX export of {what}: the last dim of {x.name} must be static, got {d}")
    return d


def _as_float(x):
    return x if x.dtype == FLOAT else op.Cast(x, to=FLOAT)


# ------------------------------------------------------------------------------------------------
# hadamard


def _hadamard_factors(n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(H_m/√m or None when m = 1, H_p/√p) for n = m·p, float32."""
    m, p = hadamard_factors(n) or (None, None)
    if m is None:
        raise ShapeError(f"ONNX export of hadamard: no Hadamard matrix of size {n}")
    hm = None if m == 1 else hadamard_matrix(m).numpy().astype(np.float32)
    return hm, hadamard_matrix(p).numpy().astype(np.float32)


def hadamard_onnx(x, block: int = 0):
    """``x @ H`` (block-diagonal blocks of ``block``, or the whole last dim): the last dim viewed as
    ``[n / block,] m, p``, ``·H_p`` then ``H_mᵀ·`` (broadcast over the leading dims), viewed back; float32 math,
    returned in x's dtype. Both reshapes are constants (0 keeps a leading dim): no shape arithmetic per call."""
    n = _static_dim(x, -1, "hadamard")
    b = n if block == 0 else block
    hm, hp = _hadamard_factors(b)
    m, p = (1 if hm is None else hm.shape[0]), hp.shape[0]
    keep = [0] * (len(x.shape) - 1)
    xf = _as_float(x)
    y = op.MatMul(op.Reshape(xf, _i64(keep + ([n // b] if b < n else []) + [m, p])), _const(hp))
    if hm is not None:
        y = op.MatMul(_const(np.ascontiguousarray(hm.T)), y)
    y = op.Reshape(y, _i64(keep + [n]))
    return y if x.dtype == FLOAT else op.Cast(y, to=x.dtype)


# ------------------------------------------------------------------------------------------------
# per-token quantization (activations, KV)


def _qparams(xf, bits: int, symmetric: bool, clip_ratio: float):
    """(scale, zero) per row of xf, float32 ``[..., 1]``, as ``formats.qparams_from_range``."""
    lo = op.Min(op.ReduceMin(xf, _i64([-1]), keepdims=1), _f(0.0))
    hi = op.Max(op.ReduceMax(xf, _i64([-1]), keepdims=1), _f(0.0))
    qmax = float((1 << bits) - 1)
    if symmetric:
        scale = op.Div(op.Mul(op.Max(op.Neg(lo), hi), _f(clip_ratio)), _f(float((1 << (bits - 1)) - 1)))
        return op.Max(scale, _f(TINY)), _f(float(1 << (bits - 1)))
    full = op.Max(op.Div(op.Sub(hi, lo), _f(qmax)), _f(TINY))
    zero = op.Clip(op.Round(op.Div(op.Neg(lo), full)), _f(0.0), _f(qmax))
    return op.Max(op.Mul(full, _f(clip_ratio)), _f(TINY)), zero


def _codes(xf, scale, zero, bits: int):
    """Unsigned codes ``clamp(round(x/s) + z, 0, 2^b − 1)`` as float32."""
    return op.Clip(op.Add(op.Round(op.Div(xf, scale)), zero), _f(0.0), _f(float((1 << bits) - 1)))


def quantize_per_token_onnx(x, bits: int, symmetric: bool, clip_ratio: float, rotate: bool, block: int):
    """``(codes int8, scales float32 [..., 1], zeros int8 [..., 1])`` as ``reference.quantize_per_token``."""
    xf = hadamard_onnx(_as_float(x), block) if rotate else _as_float(x)
    scale, zero = _qparams(xf, bits, symmetric, clip_ratio)
    shift = _f(float(1 << (bits - 1)))
    codes = op.Cast(op.Sub(_codes(xf, scale, zero, bits), shift), to=ir.DataType.INT8)
    zeros = op.Cast(op.Sub(op.Expand(zero, op.Shape(scale)), shift), to=ir.DataType.INT8)
    return codes, scale, zeros


def fake_quant_onnx(x, bits: int, symmetric: bool, clip_ratio: float):
    """Per-row quantize→dequantize, ``(q − z)·s``, in x's dtype (``formats.fake_quantize_per_token``)."""
    xf = _as_float(x)
    scale, zero = _qparams(xf, bits, symmetric, clip_ratio)
    y = op.Mul(op.Sub(_codes(xf, scale, zero, bits), zero), scale)
    return y if x.dtype == FLOAT else op.Cast(y, to=x.dtype)


# ------------------------------------------------------------------------------------------------
# W4A16: MatMulNBits


def _linear_w4a16(accuracy_level: int):
    def linear_w4a16_onnx(x, packed, scales, zeros, group_size: int, bias=None):
        """``MatMulNBits(x, B, scales, zero_points)`` + bias; B/scales/zeros are re-laid by ``pack_matmulnbits``."""
        K = _static_dim(x, -1, "linear_w4a16")
        N = packed.shape[0]
        inputs = [x, packed, scales] + ([zeros] if zeros is not None else [])
        y = MatMulNBits(*inputs, K=K, N=N, bits=4, block_size=matmulnbits_block_size(K, group_size),
                             accuracy_level=accuracy_level)
        y.producer().metadata_props[GROUP_KEY] = str(group_size)
        return y if bias is None else op.Add(y, bias)

    return linear_w4a16_onnx


def pack_matmulnbits(model: ir.Model) -> int:
    """Re-lay the canonical initializers of every MatMulNBits node emitted above (``GROUP_KEY`` set) by
    ``layout.to_matmulnbits``; returns how many nodes it packed. Names keep their source prefix."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != "com.microsoft" or node.op_type != "MatMulNBits" or GROUP_KEY not in node.metadata_props:
            continue
        group = int(node.metadata_props.pop(GROUP_KEY))
        K = node.attributes["K"].as_int()
        ins = list(node.inputs)
        consts = []
        for v in ins[1:]:
            if v.const_value is None:
                raise ShapeError(f"MatMulNBits {node.name}: input {v.name} is not an initializer")
            consts.append(torch.from_numpy(np.array(v.const_value.numpy())))
        packed, scales = consts[0], consts[1]
        zeros = consts[2] if len(consts) > 2 else None
        x_dtype = ins[0].dtype
        dtype = torch.float16 if x_dtype == ir.DataType.FLOAT16 else torch.float32
        w = to_matmulnbits(packed, scales, zeros, group, K, dtype)
        for v, t in zip(ins[1:], (w.B, w.scales, w.zero_points)):
            _replace_initializer(model.graph, v, t)
        if w.block_size != node.attributes["block_size"].as_int():
            raise AssertionError("block_size of the translation and of the layout differ")
        count += 1
    return count


def _replace_initializer(graph: ir.Graph, value: ir.Value, tensor: torch.Tensor) -> None:
    """Give ``value`` (an initializer) new contents; refuse if another node reads the canonical form."""
    others = [u for u, _ in value.uses() if not (u.domain == "com.microsoft" and u.op_type == "MatMulNBits")]
    if others:
        raise ShapeError(f"initializer {value.name} is read by {others[0].op_type} {others[0].name} as well")
    value.const_value = ir.tensor(tensor.contiguous().numpy(), name=value.name)
    value.shape = ir.Shape(tensor.shape)
    value.dtype = value.const_value.dtype


# ------------------------------------------------------------------------------------------------
# W4A8 / W4A4: per-token int8 codes × int4 weights through MatMulInteger


def _signed_weight(packed, w_zeros, K: int, N: int, n_groups: int, g: int):
    """``q − z_w`` as int8 ``[G, g, N]`` (or ``[K, N]`` for one group), from the canonical int4 initializers;
    all constants, folded by onnxruntime at session start. Columns past K (padding) are 0."""
    lo = op.BitwiseAnd(packed, _const(np.array(15, dtype=np.uint8)))
    hi = op.BitShift(packed, _const(np.array(4, dtype=np.uint8)), direction="RIGHT")
    q = op.Reshape(op.Concat(op.Unsqueeze(lo, _i64([-1])), op.Unsqueeze(hi, _i64([-1])), axis=-1), _i64([N, -1]))
    q = op.Cast(op.Slice(q, _i64([0]), _i64([K]), _i64([1]), _i64([1])), to=ir.DataType.INT32)  # [N, K]
    Kp = n_groups * g
    if Kp != K:
        q = op.Pad(q, _i64([0, 0, 0, Kp - K]))
    q = op.Reshape(q, _i64([N, n_groups, g]))
    z = _const(np.array(8, dtype=np.int32)) if w_zeros is None else op.Unsqueeze(
        op.Cast(w_zeros, to=ir.DataType.INT32), _i64([-1]))
    w = op.Sub(q, z)
    if Kp != K:  # padded codes are 0, not z: zero them after the subtraction
        mask = np.zeros((1, n_groups, g), dtype=np.int32)
        mask.reshape(-1)[:K] = 1
        w = op.Mul(w, _const(mask))
    w = op.Transpose(w, perm=[1, 2, 0])  # [G, g, N]
    return op.Cast(w if n_groups > 1 else op.Reshape(w, _i64([K, N])), to=ir.DataType.INT8)


def linear_w4ax_onnx(x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size: int, bias=None,
                     out_dtype: int = 6):
    """``s_a·Σ_G s_w[G]·MatMulInteger(a_G, w_G)`` (see the module docstring), output in float32."""
    K = _static_dim(x_codes, -1, "linear_w4a8/w4a4")
    N = packed_weight.shape[0]
    G = w_scales.shape[1]
    g = K if G == 1 else group_size
    w = _signed_weight(packed_weight, w_zeros, K, N, G, g)
    if G == 1:
        acc = op.MatMulInteger(x_codes, w)  # [..., N] int32
        if x_zeros is not None:
            colsum = op.ReduceSum(op.Cast(w, to=ir.DataType.INT32), _i64([0]), keepdims=0)  # [N]
            acc = op.Sub(acc, op.Mul(op.Cast(x_zeros, to=ir.DataType.INT32), colsum))
        y = op.Mul(op.Cast(acc, to=FLOAT), op.Reshape(op.Cast(w_scales, to=FLOAT), _i64([N])))
    else:
        a = op.Reshape(x_codes, _i64([-1, K]))  # [T, K]
        if G * g != K:
            a = op.Pad(a, _i64([0, 0, 0, G * g - K]))
        a = op.Transpose(op.Reshape(a, _i64([-1, G, g])), perm=[1, 0, 2])  # [G, T, g]
        acc = op.MatMulInteger(a, w)  # [G, T, N]
        if x_zeros is not None:
            colsum = op.ReduceSum(op.Cast(w, to=ir.DataType.INT32), _i64([1]), keepdims=1)  # [G, 1, N]
            za = op.Reshape(op.Cast(x_zeros, to=ir.DataType.INT32), _i64([1, -1, 1]))  # [1, T, 1]
            acc = op.Sub(acc, op.Mul(za, colsum))
        sw = op.Unsqueeze(op.Transpose(op.Cast(w_scales, to=FLOAT), perm=[1, 0]), _i64([1]))  # [G, 1, N]
        y = op.ReduceSum(op.Mul(op.Cast(acc, to=FLOAT), sw), _i64([0]), keepdims=0)  # [T, N]
        out_shape = op.Concat(op.Slice(op.Shape(x_codes), _i64([0]), _i64([-1]), _i64([0])), _i64([N]), axis=0)
        y = op.Reshape(y, out_shape)
        y = op.Mul(y, x_scales)
        return y if bias is None else op.Add(y, bias)
    y = op.Mul(y, x_scales)
    return y if bias is None else op.Add(y, bias)


# ------------------------------------------------------------------------------------------------
# the table and the W4A8 → MatMulNBits(accuracy_level=4) rewrite


def translation_table(accuracy_level: int = 0) -> dict:
    """``{torch op overload: onnxscript translation}`` for ``torch.onnx.export(custom_translation_table=...)``;
    ``accuracy_level`` is MatMulNBits' compute type (0: float as the input, 4: int8 activations)."""
    return {
        qops.hadamard.default: hadamard_onnx,
        qops.quantize_per_token.default: quantize_per_token_onnx,
        qops.linear_w4a16.default: _linear_w4a16(accuracy_level),
        qops.linear_w4a8.default: linear_w4ax_onnx,
        qops.linear_w4a4.default: linear_w4ax_onnx,
        qops.fake_quant.default: fake_quant_onnx,
    }


def w4ax_as_matmulnbits(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """Rewrite every ``quantize_per_token(x, b, …, rotate, block) → linear_w4a8/w4a4`` in place so that the
    weights reach onnxruntime as ``MatMulNBits`` (4-bit storage, its fast kernels); returns how many
    linears it rewrote and the ``accuracy_level`` to emit them with.

    * only A8 linears: ``[hadamard(x)] → linear_w4a16`` with ``accuracy_level=4``: onnxruntime quantizes the
      input to int8 itself, symmetric per block of K (``block_size`` ≤ 128 columns: finer than the recipe's
      per-token scale, so never coarser than what was calibrated);
    * any A4 linear: ``[hadamard(x)] → fake_quant(·, b, …) → linear_w4a16`` with ``accuracy_level=0``: the
      recipe's per-token codes exactly (``fake_quant = (codes − zeros)·scales``), the products in float32.
    """
    graph = gm.graph
    linears = [n for n in graph.nodes
               if n.op == "call_function" and n.target in (qops.linear_w4a8.default, qops.linear_w4a4.default)]
    emulate = any(n.target == qops.linear_w4a4.default for n in linears)
    for node in linears:
        codes = node.args[0]
        q = codes.args[0] if codes.target is operator.getitem else None
        if q is None or q.target != qops.quantize_per_token.default:
            raise ShapeError(f"{node.name}: its input is not a quantize_per_token output")
        x, bits, symmetric, clip, rotate, block = q.args
        packed, w_scales, w_zeros, group, bias = node.args[3:8]
        with graph.inserting_before(node):
            src = graph.call_function(qops.hadamard.default, (x, block)) if rotate else x
            if emulate:
                src = graph.call_function(qops.fake_quant.default, (src, bits, symmetric, clip))
            new = graph.call_function(qops.linear_w4a16.default, (src, packed, w_scales, w_zeros, group, bias))
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return len(linears), (0 if emulate or not linears else 4)


__all__ = ["translation_table", "pack_matmulnbits", "w4ax_as_matmulnbits", "hadamard_onnx",
           "quantize_per_token_onnx", "linear_w4ax_onnx", "fake_quant_onnx"]
