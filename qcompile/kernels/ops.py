"""Every ``torch.ops.qcompile.*`` op, declared once: schema, CPU/any-device implementation (the
plain-torch ground truth in ``reference.py``), CUDA implementation (Triton, imported on first use),
fake implementation (shapes only, for ``torch.export`` and ``torch.compile``), and a typed wrapper.
Shapes are checked inside each implementation (real and fake), once per call, so a direct
``torch.ops.qcompile.*`` call from a lowered graph is checked exactly like a wrapper call. On CUDA a
decode-sized call first tries its launch plan (``triton/plans.py``: recorded after a checked call with
the same weight tensors and activation signature), which skips the checks it has already passed.

The ops are declared with the low-level ``torch.library.Library`` (``define`` + ``impl`` per dispatch
key + ``register_fake``) rather than ``torch.library.custom_op``: the latter wraps every call in
Python autograd and aliasing checks (~10 µs per call, measured), a decode GEMV's whole GPU time.
Only ``hadamard`` and ``fake_quant`` have backward formulas (registered below); the linear and
quantize ops are inference ops.

Schemas::

    qcompile::hadamard(Tensor x, int block=0) -> Tensor
    qcompile::quantize_per_token(Tensor x, int bits, bool symmetric, float clip_ratio, bool rotate,
                                 int block) -> (Tensor codes, Tensor scales, Tensor zeros)
    qcompile::linear_w4a16(Tensor x, Tensor packed_weight, Tensor scales, Tensor? zeros,
                           int group_size, Tensor? bias) -> Tensor
    qcompile::linear_w4a8(Tensor x_codes, Tensor x_scales, Tensor? x_zeros, Tensor packed_weight,
                          Tensor w_scales, Tensor? w_zeros, int group_size, Tensor? bias,
                          ScalarType out_dtype) -> Tensor
    qcompile::linear_w4a4(...same as linear_w4a8...) -> Tensor
    qcompile::linear_w4ax_dynamic(Tensor x, int bits, bool symmetric, float clip_ratio, Tensor packed_weight,
                                  Tensor w_scales, Tensor? w_zeros, int group_size, Tensor? bias,
                                  ScalarType out_dtype) -> Tensor
    qcompile::grouped_linear_w4a16(Tensor x, Tensor offs, Tensor packed_weight, Tensor scales, Tensor? zeros,
                                   int group_size) -> Tensor
    qcompile::grouped_linear_w4a8(Tensor x_codes, Tensor x_scales, Tensor? x_zeros, Tensor offs,
                                  Tensor packed_weight, Tensor w_scales, Tensor? w_zeros, int group_size,
                                  ScalarType out_dtype) -> Tensor
    qcompile::grouped_linear_w4a4(...same as grouped_linear_w4a8...) -> Tensor
    qcompile::decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor

Conventions (see ``reference.py``): weights are the canonical int4 format of
``qcompile.quant.formats`` (``packed uint8 [N, ceil(K/2)]``, scales ``[N, ceil(K/g)]``, zeros uint8 or
None ⇒ 8, per-channel = ``group_size == K``); activation codes are int8, shifted by ``2^(b−1)`` from
the canonical unsigned codes, with float32 per-token scales ``[..., 1]`` and int8 zeros ``[..., 1]``
(all 0 when symmetric; pass ``None`` to the linear ops to skip the zero correction). ``block``
0 means a Hadamard over the whole last dim, else block-diagonal blocks of that size.
``linear_w4a4`` is ``linear_w4a8`` for codes in ``[−8, 7]``: Hopper has no int4 tensor cores, so
both run the int8 kernel; the two names keep the graph's intent (and its ONNX lowering) explicit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile.kernels import reference, shapes

__all__ = ["hadamard", "quantize_per_token", "linear_w4a16", "linear_w4a8", "linear_w4a4", "linear_w4ax_dynamic",
           "grouped_linear_w4a16", "grouped_linear_w4a8", "decode_attention"]


_triton: list = []  # [dispatch, plans], imported on the first CUDA call


def _cuda():
    if not _triton:
        from qcompile.kernels.triton import dispatch, plans

        _triton[:] = [dispatch, plans]
    return _triton[0]


def _plans():
    if not _triton:
        _cuda()
    return _triton[1]


# ------------------------------------------------------------------------------------------------
# hadamard


_lib = torch.library.Library("qcompile", "DEF")  # noqa: TOR901 - low-level registration, see the docstring


def _op(schema: str, default, cuda, fake) -> None:
    """Declare ``qcompile::<schema>`` with its reference (any device), CUDA and fake implementations."""
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, default, "CompositeExplicitAutograd")
    _lib.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"qcompile::{name}", fake, lib=_lib)


def _hadamard(x: Tensor, block: int = 0) -> Tensor:
    shapes.check_hadamard(x, block)
    return reference.hadamard(x, block)


def _hadamard_cuda(x: Tensor, block: int = 0) -> Tensor:
    shapes.check_hadamard(x, block)
    return _cuda().hadamard(x, block)


def _hadamard_fake(x: Tensor, block: int = 0) -> Tensor:
    shapes.check_hadamard(x, block)
    return torch.empty_like(x)


_op("hadamard(Tensor x, int block=0) -> Tensor", _hadamard, _hadamard_cuda, _hadamard_fake)


def hadamard(x: Tensor, block: int | None = None) -> Tensor:
    """``x @ H`` over the last dim: the normalized Hadamard of the whole dim, or block-diagonal
    blocks of size ``block``."""
    return torch.ops.qcompile.hadamard(x, 0 if block is None else block)  # checked inside the op


# ------------------------------------------------------------------------------------------------
# quantize_per_token


def _quantize_per_token(
    x: Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    shapes.check_quantize_per_token(x, bits, symmetric, clip_ratio, rotate, block)
    return reference.quantize_per_token(x, bits, symmetric, clip_ratio, rotate, block)


def _quantize_per_token_cuda(
    x: Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    out = _plans().call_quantize(x, bits, symmetric, clip_ratio, rotate, block)  # the decode fast path
    if out is not None:
        return out
    shapes.check_quantize_per_token(x, bits, symmetric, clip_ratio, rotate, block)
    return _cuda().quantize_per_token(x, bits, symmetric, clip_ratio, rotate, block)


def _quantize_per_token_fake(
    x: Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    shapes.check_quantize_per_token(x, bits, symmetric, clip_ratio, rotate, block)
    tok = (*x.shape[:-1], 1)
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty(tok, dtype=torch.float32, device=x.device),
        torch.empty(tok, dtype=torch.int8, device=x.device),
    )


_op("quantize_per_token(Tensor x, int bits, bool symmetric, float clip_ratio, bool rotate, int block) "
    "-> (Tensor, Tensor, Tensor)", _quantize_per_token, _quantize_per_token_cuda, _quantize_per_token_fake)


def quantize_per_token(
    x: Tensor,
    bits: int,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    rotate: bool = False,
    block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(codes int8, scales float32 [..., 1], zeros int8 [..., 1])`` of ``x`` — or of
    ``hadamard(x, block)`` when ``rotate``, fused into one pass."""
    bs = 0 if block is None else block
    return torch.ops.qcompile.quantize_per_token(x, bits, symmetric, float(clip_ratio), rotate, bs)


# ------------------------------------------------------------------------------------------------
# linear_w4a16


def _check_row_scale(x: Tensor, row_scale: Tensor | None) -> None:
    if row_scale is None:
        return
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if row_scale.dtype != torch.float32 or row_scale.numel() != rows or row_scale.device != x.device:
        raise shapes.ShapeError(f"linear_w4a16: row_scale must be float32 with one value per row of x ({rows}, "
                                f"e.g. [..., 1]) on x's device, got {row_scale.dtype} {list(row_scale.shape)} on "
                                f"{row_scale.device}")


def _linear_w4a16(
    x: Tensor, packed_weight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None,
    row_scale: Tensor | None = None,
) -> Tensor:
    shapes.check_linear_w4a16(x, packed_weight, scales, zeros, group_size, bias)
    _check_row_scale(x, row_scale)
    if row_scale is None:
        return reference.linear_w4a16(x, packed_weight, scales, zeros, group_size, bias)
    y = reference.linear_w4a16(x.float(), packed_weight, scales, zeros, group_size, None)
    y = y * row_scale.reshape(*x.shape[:-1], 1)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _linear_w4a16_cuda(
    x: Tensor, packed_weight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None,
    row_scale: Tensor | None = None,
) -> Tensor:
    y = _plans().call_w4a16(x, packed_weight, scales, zeros, group_size, bias, row_scale)  # the decode fast path
    if y is not None:
        return y
    shapes.check_linear_w4a16(x, packed_weight, scales, zeros, group_size, bias)
    _check_row_scale(x, row_scale)
    return _cuda().linear_w4a16(x, packed_weight, scales, zeros, group_size, bias, row_scale)


def _linear_w4a16_fake(
    x: Tensor, packed_weight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None,
    row_scale: Tensor | None = None,
) -> Tensor:
    shapes.check_linear_w4a16(x, packed_weight, scales, zeros, group_size, bias)
    _check_row_scale(x, row_scale)
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]))


_op("linear_w4a16(Tensor x, Tensor packed_weight, Tensor scales, Tensor? zeros, int group_size, Tensor? bias, "
    "Tensor? row_scale=None) -> Tensor", _linear_w4a16, _linear_w4a16_cuda, _linear_w4a16_fake)


def linear_w4a16(
    x: Tensor,
    packed_weight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    group_size: int | None,
    bias: Tensor | None = None,
    row_scale: Tensor | None = None,
) -> Tensor:
    """``x @ W.T + bias`` for a canonical int4 W; ``group_size`` None = per-channel (K). ``row_scale`` (float32,
    one per row of x): ``(x @ W.T)·row_scale + bias`` computed in float32 and rounded once to x's dtype (the
    exact route of one-token A8/A4 linears, ``codes_route``)."""
    g = x.shape[-1] if group_size is None else group_size
    return torch.ops.qcompile.linear_w4a16(x, packed_weight, scales, zeros, g, bias, row_scale)


# ------------------------------------------------------------------------------------------------
# linear_w4a8 / linear_w4a4


def _declare_w4ax(name: str) -> None:
    def op(x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias, out_dtype):
        args = (x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias, out_dtype)
        shapes.check_linear_w4ax(name, *args)
        return reference.linear_w4a8(*args)

    bits = 4 if name == "linear_w4a4" else 8

    def cuda(x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias, out_dtype):
        y = _plans().call_w4ax(x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias,
                               out_dtype, bits)  # the decode fast path
        if y is not None:
            return y
        args = (x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias, out_dtype)
        shapes.check_linear_w4ax(name, *args)
        return _cuda().linear_w4ax(*args, act_bits=bits)

    def fake(x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias, out_dtype):
        args = (x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias, out_dtype)
        shapes.check_linear_w4ax(name, *args)
        return x_codes.new_empty((*x_codes.shape[:-1], packed_weight.shape[0]), dtype=out_dtype)

    _op(f"{name}(Tensor x_codes, Tensor x_scales, Tensor? x_zeros, Tensor packed_weight, Tensor w_scales, "
        "Tensor? w_zeros, int group_size, Tensor? bias, ScalarType out_dtype) -> Tensor", op, cuda, fake)


_declare_w4ax("linear_w4a8")
_declare_w4ax("linear_w4a4")


def _w4ax(name: str, x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias, out_dtype):
    g = x_codes.shape[-1] if group_size is None else group_size
    return getattr(torch.ops.qcompile, name)(x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, g, bias,
                                             out_dtype)


def linear_w4a8(
    x_codes: Tensor,
    x_scales: Tensor,
    x_zeros: Tensor | None,
    packed_weight: Tensor,
    w_scales: Tensor,
    w_zeros: Tensor | None,
    group_size: int | None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """``((x_codes − x_zeros)·x_scales) @ W.T + bias`` in ``out_dtype``; 8-bit per-token codes."""
    return _w4ax("linear_w4a8", x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias,
                 out_dtype)


def linear_w4a4(
    x_codes: Tensor,
    x_scales: Tensor,
    x_zeros: Tensor | None,
    packed_weight: Tensor,
    w_scales: Tensor,
    w_zeros: Tensor | None,
    group_size: int | None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """As ``linear_w4a8`` for 4-bit per-token codes (``quantize_per_token(x, 4, ...)``)."""
    return _w4ax("linear_w4a4", x_codes, x_scales, x_zeros, packed_weight, w_scales, w_zeros, group_size, bias,
                 out_dtype)


# ------------------------------------------------------------------------------------------------
# linear_w4ax_dynamic: quantize_per_token (no rotation) and linear_w4a8/w4a4 of its codes as one op, so that at
# one token the CUDA kernel quantizes the 16-bit activation itself (one launch, no codes in memory). Built by
# ``fold.fold_activation_quant`` from the lowered graph; by definition the two ops it replaces.


def _dynamic_parts(x, bits, symmetric, clip_ratio):
    codes, scales, zeros = reference.quantize_per_token(x, bits, symmetric, clip_ratio)
    return codes, scales, None if symmetric else zeros


def _linear_w4ax_dynamic(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size, bias,
                         out_dtype):
    shapes.check_linear_w4ax_dynamic(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size,
                                     bias, out_dtype)
    return reference.linear_w4a8(*_dynamic_parts(x, bits, symmetric, clip_ratio), packed_weight, w_scales, w_zeros,
                                 group_size, bias, out_dtype)


def _linear_w4ax_dynamic_cuda(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size, bias,
                              out_dtype):
    y = _plans().call_dynamic(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size, bias,
                              out_dtype)  # the decode fast path
    if y is not None:
        return y
    shapes.check_linear_w4ax_dynamic(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size,
                                     bias, out_dtype)
    return _cuda().linear_w4ax_dynamic(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size,
                                       bias, out_dtype)


def _linear_w4ax_dynamic_fake(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size, bias,
                              out_dtype):
    shapes.check_linear_w4ax_dynamic(x, bits, symmetric, clip_ratio, packed_weight, w_scales, w_zeros, group_size,
                                     bias, out_dtype)
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]), dtype=out_dtype)


_op("linear_w4ax_dynamic(Tensor x, int bits, bool symmetric, float clip_ratio, Tensor packed_weight, "
    "Tensor w_scales, Tensor? w_zeros, int group_size, Tensor? bias, ScalarType out_dtype) -> Tensor",
    _linear_w4ax_dynamic, _linear_w4ax_dynamic_cuda, _linear_w4ax_dynamic_fake)


def linear_w4ax_dynamic(x: Tensor, bits: int, symmetric: bool, clip_ratio: float, packed_weight: Tensor,
                        w_scales: Tensor, w_zeros: Tensor | None, group_size: int | None, bias: Tensor | None = None,
                        out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``linear_w4a8`` (or ``linear_w4a4`` for ``bits`` ≤ 4) of ``quantize_per_token(x, bits, symmetric,
    clip_ratio)``'s codes (zeros dropped when symmetric: they are 0), as one op."""
    g = x.shape[-1] if group_size is None else group_size
    return torch.ops.qcompile.linear_w4ax_dynamic(x, bits, symmetric, float(clip_ratio), packed_weight, w_scales,
                                                  w_zeros, g, bias, out_dtype)


# ------------------------------------------------------------------------------------------------
# grouped_linear_w4a16: routed experts (stacked int4 weights [E, N, ·], rows of x sorted by expert, ``offs`` the
# cumulative rows per expert: transformers' grouped_mm with an int4 weight). Runs one linear_w4a16 per expert
# that has rows; on CUDA each is the Triton kernel.


def _check_grouped(x: Tensor, offs: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                   op: str = "grouped_linear_w4a16"):
    from qcompile.errors import ShapeError

    if x.dim() != 2 or (op == "grouped_linear_w4a16" and x.dtype not in shapes.FLOAT_DTYPES):
        raise ShapeError(f"{op}: x must be [S, K]{' float' if op.endswith('16') else ''}, got {shapes._desc(x)}")
    if packed.dim() != 3 or offs.dim() != 1 or offs.shape[0] != packed.shape[0] or offs.is_floating_point():
        raise ShapeError(f"{op}: packed_weight must be [E, N, ceil(K/2)] and offs integer [E]; got "
                         f"{shapes._desc(packed)}, {shapes._desc(offs)}")
    if scales.dim() != 3 or (zeros is not None and zeros.dim() != 3):
        raise ShapeError(f"{op}: scales and zeros must be [E, N, G], got {shapes._desc(scales)}")
    shapes.check_int4_weight(op, x.shape[-1], packed[0], scales[0], None if zeros is None else zeros[0], group_size,
                             None)


def _grouped_linear_w4a16(x, offs, packed_weight, scales, zeros, group_size):
    _check_grouped(x, offs, packed_weight, scales, zeros, group_size)
    return reference.grouped_linear_w4a16(x, offs, packed_weight, scales, zeros, group_size)


def _grouped_linear_w4a16_cuda(x, offs, packed_weight, scales, zeros, group_size):
    _check_grouped(x, offs, packed_weight, scales, zeros, group_size)
    return reference.grouped_linear_w4a16(x, offs, packed_weight, scales, zeros, group_size,
                                          linear=_cuda().linear_w4a16)


def _grouped_linear_w4a16_fake(x, offs, packed_weight, scales, zeros, group_size):
    _check_grouped(x, offs, packed_weight, scales, zeros, group_size)
    return x.new_empty((x.shape[0], packed_weight.shape[1]))


_op("grouped_linear_w4a16(Tensor x, Tensor offs, Tensor packed_weight, Tensor scales, Tensor? zeros, "
    "int group_size) -> Tensor", _grouped_linear_w4a16, _grouped_linear_w4a16_cuda, _grouped_linear_w4a16_fake)


def grouped_linear_w4a16(x: Tensor, offs: Tensor, packed_weight: Tensor, scales: Tensor, zeros: Tensor | None,
                         group_size: int | None) -> Tensor:
    """Routed experts: ``y[rows of e] = x[rows of e] @ W_eᵀ`` for canonical int4 ``W [E, N, K]``."""
    g = x.shape[-1] if group_size is None else group_size
    return torch.ops.qcompile.grouped_linear_w4a16(x, offs, packed_weight, scales, zeros, g)


def _declare_grouped_w4ax(name: str) -> None:
    def check(x_codes, x_scales, x_zeros, offs, packed_weight, w_scales, w_zeros, group_size, out_dtype):
        _check_grouped(x_codes, offs, packed_weight, w_scales, w_zeros, group_size, name)
        shapes.check_linear_w4ax(name, x_codes, x_scales, x_zeros, packed_weight[0],
                                 w_scales[0], None if w_zeros is None else w_zeros[0], group_size, None, out_dtype)

    def op(*args):
        check(*args)
        return reference.grouped_linear_w4a8(*args)

    def cuda(*args):
        check(*args)
        bits = 4 if name.endswith("a4") else 8
        return reference.grouped_linear_w4a8(*args, linear=lambda *a: _cuda().linear_w4ax(*a, act_bits=bits))

    def fake(x_codes, x_scales, x_zeros, offs, packed_weight, w_scales, w_zeros, group_size, out_dtype):
        check(x_codes, x_scales, x_zeros, offs, packed_weight, w_scales, w_zeros, group_size, out_dtype)
        return x_codes.new_empty((x_codes.shape[0], packed_weight.shape[1]), dtype=out_dtype)

    _op(f"{name}(Tensor x_codes, Tensor x_scales, Tensor? x_zeros, Tensor offs, Tensor packed_weight, "
        "Tensor w_scales, Tensor? w_zeros, int group_size, ScalarType out_dtype) -> Tensor", op, cuda, fake)


_declare_grouped_w4ax("grouped_linear_w4a8")
_declare_grouped_w4ax("grouped_linear_w4a4")


def grouped_linear_w4a8(x_codes: Tensor, x_scales: Tensor, x_zeros: Tensor | None, offs: Tensor,
                        packed_weight: Tensor, w_scales: Tensor, w_zeros: Tensor | None, group_size: int | None,
                        out_dtype: torch.dtype = torch.bfloat16, act_bits: int = 8) -> Tensor:
    """Routed experts on per-token activation codes (``quantize_per_token``): ``linear_w4a8`` (``act_bits`` 8) or
    ``linear_w4a4`` (4) per expert on its rows."""
    g = x_codes.shape[-1] if group_size is None else group_size
    op = torch.ops.qcompile.grouped_linear_w4a4 if act_bits == 4 else torch.ops.qcompile.grouped_linear_w4a8
    return op(x_codes, x_scales, x_zeros, offs, packed_weight, w_scales, w_zeros, g, out_dtype)


# ------------------------------------------------------------------------------------------------
# decode_attention: attention over a KV cache, key/value heads unrepeated (``attention_fold`` builds it from a
# decode graph's ``scaled_dot_product_attention`` of the repeated cache); on CUDA, at a few queries, the
# split-key kernel of ``triton/decode_attention.py``, else the reference.


_attention: list = []  # the Triton module, imported on the first CUDA call


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    shapes.check_decode_attention(q, k, v, mask)
    return reference.decode_attention(q, k, v, mask, scale)


def _decode_attention_cuda(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    shapes.check_decode_attention(q, k, v, mask)
    if not _attention:
        from qcompile.kernels.triton import decode_attention as module

        _attention.append(module)
    if _attention[0].supported(q, k, mask):
        return _attention[0].decode_attention(q, k, v, mask, scale)
    return reference.decode_attention(q, k, v, mask, scale)


def _decode_attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    shapes.check_decode_attention(q, k, v, mask)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_op("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor", _decode_attention,
    _decode_attention_cuda, _decode_attention_fake)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Attention of ``q [B, H_q, S, D]`` over ``k, v [B, H_kv, T, D]`` (``H_q`` a multiple of ``H_kv``; query head
    h reads head ``h // (H_q / H_kv)``) where the bool ``mask`` (broadcast to ``[B, H_q, S, T]``) is true; ``scale``
    defaults to ``D^-1/2``."""
    return torch.ops.qcompile.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale))


# ------------------------------------------------------------------------------------------------
# fake_quant: quantize-dequantize per token (the simulation the lowering replaces with real int ops)


def _fake_quant(x: Tensor, bits: int, symmetric: bool, clip_ratio: float) -> Tensor:
    from qcompile.quant.formats import fake_quantize_per_token

    return fake_quantize_per_token(x, bits, symmetric, clip_ratio)


def _fake_quant_fake(x: Tensor, bits: int, symmetric: bool, clip_ratio: float) -> Tensor:
    return torch.empty_like(x)


_lib.define("fake_quant(Tensor x, int bits, bool symmetric, float clip_ratio) -> Tensor")
_lib.impl("fake_quant", _fake_quant, "CompositeExplicitAutograd")
torch.library.register_fake("qcompile::fake_quant", _fake_quant_fake, lib=_lib)


def fake_quant(x: Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0) -> Tensor:
    """Per-token (last-dim) quantize→dequantize of activations, or of K/V per (token, head) when the last
    dim is head_dim; the graph op that marks where the lowering quantizes for real."""
    return torch.ops.qcompile.fake_quant(x, bits, symmetric, float(clip_ratio))


# ------------------------------------------------------------------------------------------------
# autograd, for transforms that learn through the fake-quantized graph (SpinQuant): the Hadamard's
# backward is x ↦ x·Hᵀ; fake quantization passes gradients straight through.


def _hadamard_backward(ctx, grad):
    from qcompile.quant.hadamard import hadamard_transform

    return hadamard_transform(grad, ctx.block_size or None, transpose=True), None


def _hadamard_setup(ctx, inputs, output):
    ctx.block_size = inputs[1]


torch.library.register_autograd("qcompile::hadamard", _hadamard_backward, setup_context=_hadamard_setup)


def _fake_quant_backward(ctx, grad):
    return grad, None, None, None


torch.library.register_autograd("qcompile::fake_quant", _fake_quant_backward)
