"""The reference ops (the ground truth) against the fake quantization of ``quant.formats``:
dequantize-then-matmul must be what the int4 ops compute, and per-token codes must dequantize to
``fake_quantize_per_token`` exactly."""

import math

import pytest
import torch
import torch.nn.functional as F

from qcompile.kernels import reference
from qcompile.quant.formats import (
    Granularity,
    PackedWeight,
    QuantSpec,
    compute_qparams,
    fake_quantize_per_token,
    quantize,
)
from qcompile.quant.hadamard import hadamard_matrix, hadamard_transform


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _packed(n, k, g, symmetric, seed=0):
    """A real RTN-quantized weight in the canonical format, and its float original."""
    w = torch.randn(n, k, generator=_gen(seed))
    spec = QuantSpec(4, symmetric, Granularity.CHANNEL if g >= k else Granularity.GROUP, None if g >= k else g)
    scale, zero = compute_qparams(w, spec, scale_dtype=torch.float16)
    pw = PackedWeight.from_codes(quantize(w, scale, zero, spec), scale, zero, spec)
    return pw, w


@pytest.mark.parametrize("k, g, symmetric", [(576, 128, True), (576, 128, False), (577, 577, False), (96, 32, True)])
def test_linear_w4a16_is_dequantize_then_matmul(k, g, symmetric):
    pw, w = _packed(40, k, g, symmetric)
    x = torch.randn(3, 5, k, generator=_gen(1))
    bias = torch.randn(40, generator=_gen(2))
    y = reference.linear_w4a16(x, pw.packed, pw.scales, pw.zeros, pw.group_size, bias)
    torch.testing.assert_close(y, F.linear(x, pw.dequantize(), bias), rtol=0, atol=0)
    # and the quantized layer is close to the float one (SQNR of 4-bit RTN: measured ≈ 19 dB here)
    ref = F.linear(x, w, bias)
    sqnr = 10 * math.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())
    assert sqnr > 15


@pytest.mark.parametrize("bits, symmetric, clip", [(8, True, 1.0), (8, False, 0.9), (4, True, 0.9), (4, False, 1.0)])
def test_quantize_per_token_dequantizes_to_fake_quant(bits, symmetric, clip):
    x = torch.randn(4, 7, 96, generator=_gen(3)) * 3
    x[..., 5] += 30.0
    codes, scales, zeros = reference.quantize_per_token(x, bits, symmetric, clip)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (4, 7, 1)
    assert zeros.dtype == torch.int8 and zeros.shape == (4, 7, 1)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert codes.min() >= lo and codes.max() <= hi
    if symmetric:
        assert (zeros == 0).all()
    deq = (codes.float() - zeros.float()) * scales
    torch.testing.assert_close(deq, fake_quantize_per_token(x, bits, symmetric, clip), rtol=0, atol=0)


@pytest.mark.parametrize("n, block", [(576, 0), (1536, 0), (1024, 256), (12, 0)])
def test_hadamard_reference(n, block):
    x = torch.randn(3, n, generator=_gen(4), dtype=torch.float64)
    b = block or n
    h = torch.block_diag(*[hadamard_matrix(b)] * (n // b))
    torch.testing.assert_close(reference.hadamard(x, block).double(), x @ h, rtol=1e-5, atol=1e-5)  # float32 math
    # rotated quantization = quantization of the rotated input (kept in float32, not x.dtype)
    xb = x.to(torch.bfloat16)
    c, s, z = reference.quantize_per_token(xb, 8, True, 1.0, True, block)
    xr = hadamard_transform(xb.float(), block or None)
    torch.testing.assert_close((c.float() - z.float()) * s, fake_quantize_per_token(xr, 8, True, 1.0), rtol=0, atol=0)


@pytest.mark.parametrize("bits, symmetric_act, g", [(8, True, 128), (8, False, 576), (4, True, 576), (4, False, 64)])
def test_linear_w4ax_is_fake_quant_matmul(bits, symmetric_act, g):
    pw, _ = _packed(24, 576, g, symmetric=False)
    x = torch.randn(2, 3, 576, generator=_gen(5))
    codes, scales, zeros = reference.quantize_per_token(x, bits, symmetric_act, 0.9)
    za = None if symmetric_act else zeros
    y = reference.linear_w4a8(codes, scales, za, pw.packed, pw.scales, pw.zeros, pw.group_size, None, torch.float32)
    expect = F.linear(fake_quantize_per_token(x, bits, symmetric_act, 0.9), pw.dequantize())
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    assert reference.linear_w4a4 is reference.linear_w4a8  # one algebra, two op names
