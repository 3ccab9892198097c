"""Ground truth of every ``qcompile`` kernel op, in plain torch (runs on any device, no Triton).

Each function here *is* the definition of its op: the Triton kernels are tested against it, and it
is what ``torch.ops.qcompile.*`` runs on a CPU. Numerics are spelled out in terms of
``qcompile.quant.formats`` (the one definition of the integer grids) and ``qcompile.quant.hadamard``
(the one definition of the rotations), so nothing is defined twice.

Activation codes (the output of ``quantize_per_token``, the input of ``linear_w4a8/w4a4``) are the
canonical unsigned codes ``q ∈ [0, 2^b − 1]`` of ``formats`` *shifted by* ``2^(b−1)`` into int8
(``q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1]``, what int8 tensor cores consume); zero points are shifted
the same way, so ``x ≈ (codes − zeros) · scales`` holds unchanged, and symmetric codes have zero 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile.quant.formats import Granularity, PackedWeight, QuantSpec, compute_qparams, quantize
from qcompile.quant.hadamard import hadamard_transform

__all__ = ["hadamard", "quantize_per_token", "linear_w4a16", "linear_w4a8", "linear_w4a4", "dequantize_weight",
           "grouped_linear_w4a16", "grouped_linear_w4a8", "grouped_linear_w4a4", "decode_attention"]


def hadamard(x: Tensor, block_size: int = 0) -> Tensor:
    """``x @ H`` over the last dim, H the normalized Hadamard of the whole dim (``block_size`` 0) or
    block-diagonal with blocks of ``block_size``; computed in float32, returned in ``x.dtype``."""
    return hadamard_transform(x.float(), None if block_size == 0 else block_size).to(x.dtype)


def quantize_per_token(
    x: Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0, rotate: bool = False, block_size: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic per-token quantization over the last dim, optionally after a Hadamard rotation.

    Returns ``(codes int8 [..., K], scales float32 [..., 1], zeros int8 [..., 1])`` with
    ``x' ≈ (codes − zeros) · scales`` where ``x' = hadamard(x, block_size)`` if ``rotate`` else x.
    The rotated values stay float32 (never rounded to ``x.dtype``) before quantization; scales and
    zeros follow ``formats.compute_qparams`` exactly, so
    ``(codes − zeros) · scales == formats.fake_quantize_per_token(x', bits, symmetric, clip_ratio)``.
    """
    xf = x.float()
    if rotate:
        xf = hadamard_transform(xf, None if block_size == 0 else block_size)
    spec = QuantSpec(bits, symmetric, Granularity.TOKEN, None, clip_ratio)
    scale, zero = compute_qparams(xf, spec)
    shift = 1 << (bits - 1)
    codes = (quantize(xf, scale, zero, spec).to(torch.int16) - shift).to(torch.int8)
    zeros = (zero - shift).to(torch.int8)
    return codes, scale, zeros


def dequantize_weight(
    packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, in_features: int
) -> Tensor:
    """The dense float32 ``W [N, K]`` of a canonical int4 weight (``formats.PackedWeight``)."""
    pw = PackedWeight(packed, scales, zeros, 4, group_size, in_features, zeros is None)
    return pw.dequantize(torch.float32)


def linear_w4a16(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ W.T + bias`` with W the dequantized int4 weight; float32 math, output in ``x.dtype``."""
    w = dequantize_weight(packed, scales, zeros, group_size, x.shape[-1])
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def linear_w4a8(
    x_codes: Tensor,
    x_scales: Tensor,
    x_zeros: Tensor | None,
    packed: Tensor,
    w_scales: Tensor,
    w_zeros: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """``a @ W.T + bias`` with ``a = (x_codes − x_zeros) · x_scales`` (per token) and W the int4 weight.

    The products of codes are exact integers; float32 here differs from the kernels' int32
    accumulation only by float32 rounding of the group sums.
    """
    a = x_codes.float()
    if x_zeros is not None:
        a = a - x_zeros.float()
    a = a * x_scales.float()
    w = dequantize_weight(packed, w_scales, w_zeros, group_size, x_codes.shape[-1])
    y = F.linear(a, w, None if bias is None else bias.float())
    return y.to(out_dtype)


linear_w4a4 = linear_w4a8  # the same algebra: only the range of the codes differs (int4 in int8)



def _per_expert(rows: int, n: int, like: Tensor, offs: Tensor, dtype: torch.dtype, linear) -> Tensor:
    """[rows, n] with rows ``offs[e−1]:offs[e]`` = ``linear(e, start, end)`` (rows past ``offs[-1]`` are 0, as in
    transformers' grouped_mm); one host sync for the offsets, as transformers' fallback."""
    out = torch.zeros(rows, n, dtype=dtype, device=like.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = linear(e, start, end)
        start = end
    return out


def grouped_linear_w4a16(
    x: Tensor, offs: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, linear=None
) -> Tensor:
    """Routed experts: rows ``offs[e−1]:offs[e]`` of ``x [S, K]`` (sorted by expert) times expert e's int4 weight
    (``packed [E, N, ceil(K/2)]``, ``scales``/``zeros [E, N, G]``). One ``linear_w4a16`` per expert that has rows
    (``linear``: another implementation of it, e.g. the CUDA kernel)."""
    linear = linear or linear_w4a16
    return _per_expert(x.shape[0], packed.shape[1], x, offs, x.dtype, lambda e, a, b: linear(
        x[a:b], packed[e], scales[e], None if zeros is None else zeros[e], group_size, None))


def grouped_linear_w4a8(
    x_codes: Tensor, x_scales: Tensor, x_zeros: Tensor | None, offs: Tensor, packed: Tensor, w_scales: Tensor,
    w_zeros: Tensor | None, group_size: int, out_dtype: torch.dtype = torch.bfloat16, linear=None,
) -> Tensor:
    """``grouped_linear_w4a16`` on per-token activation codes: one ``linear_w4a8`` per expert that has rows."""
    linear = linear or linear_w4a8
    return _per_expert(x_codes.shape[0], packed.shape[1], x_codes, offs, out_dtype, lambda e, a, b: linear(
        x_codes[a:b], x_scales[a:b], None if x_zeros is None else x_zeros[a:b], packed[e], w_scales[e],
        None if w_zeros is None else w_zeros[e], group_size, None, out_dtype))


grouped_linear_w4a4 = grouped_linear_w4a8


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """``softmax(scale · q kᵀ + (0 where mask else −∞)) v`` with query head h reading key/value head
    ``h // (H_q / H_kv)``: exactly ``scaled_dot_product_attention`` of q and the repeated k, v (what a
    captured grouped-query attention computes), contiguous as the op's fake result says (SDPA keeps a
    transposed q's layout)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).contiguous()
