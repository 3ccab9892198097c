"""``quantize_per_token_inline``: the op's codes, scales and zeros bit for bit (ties at .5, clipping, every bit
width, both zero-point modes), eagerly and compiled by Inductor inside the kernel that makes x; the backend
inlines exactly the unrotated quantizations."""

import operator

import pytest
import torch
from torch import fx

from qcompile.kernels import reference
from qcompile.kernels.quant_inline import _div_mersenne, inline_activation_quant, quantize_per_token_inline

Q = torch.ops.qcompile


def _same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.view(torch.int32) if g.dtype == torch.float32 else g,
                           w.view(torch.int32) if w.dtype == torch.float32 else w)


def _with_ties(dtype):
    """Rows whose codes hit exact .5 ties (and clip at clip_ratio 0.5): row 0 has max|x| = 127, so the 8-bit
    symmetric scale is 1 (0.5 at clip 0.5) and x = k + .5 divides to a tie; other rows are random."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=g) * 3
    x[0] = torch.arange(96) - 47.5  # ties ±0.5 … ±47.5
    x[0, 0], x[0, 1] = 127.0, -126.5
    x[1] = x[1].clamp(min=0)  # no negative value (lo = 0)
    x[2] = -x[2].abs()  # no positive value (hi = 0)
    x[3] = 0.0  # all zeros: the scale is float32's tiny
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.9, 0.5])
def test_inline_equals_the_op_bit_for_bit(dtype, symmetric, clip):
    x = _with_ties(dtype)
    for bits in range(2, 9):
        _same(quantize_per_token_inline(x, bits, symmetric, clip), reference.quantize_per_token(x, bits, symmetric, clip))
    codes, scale, _ = reference.quantize_per_token(x, 8, True, 1.0)
    q = x[0].float() / scale[0]
    assert (q - q.floor() == 0.5).sum() >= 90  # the ties are there (half to even decides them)
    if clip == 0.5:
        c, _, _ = reference.quantize_per_token(x, 8, True, 0.5)
        assert c[0, 0] == 127 and c[0, 1] == -128  # clipped


def test_three_dims_and_float16_refused():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    _same(quantize_per_token_inline(x, 4, True, 0.9), reference.quantize_per_token(x, 4, True, 0.9))
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        quantize_per_token_inline(x.half(), 8, True)


@pytest.mark.parametrize("p", range(1, 9))
def test_division_by_mersenne_numbers_is_correctly_rounded(p):
    """float32(float64(y)·(1/d)) = float32 y/d for d = 2^p − 1 and every float32 mantissa (two binades)."""
    d = (1 << p) - 1
    m = torch.arange(1 << 23, dtype=torch.int32) | (127 << 23)  # [1, 2)
    for y in (m.view(torch.float32), m.view(torch.float32) * 2.0 ** -100):
        assert torch.equal(_div_mersenne(y, d), y / d)


class _NormQuant(torch.nn.Module):
    """RMSNorm in float32 cast to bfloat16 (as transformers' Llama), then the per-token quantizations."""

    def forward(self, h, w):
        hf = h.float()
        x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
        a = Q.quantize_per_token.default(x, 8, True, 1.0, False, 0)
        b = Q.quantize_per_token.default(x, 4, False, 0.9, False, 0)
        r = Q.quantize_per_token.default(x, 4, True, 1.0, True, 0)  # rotated: kept
        return a[0], a[1], a[2], b[0], b[1], b[2], r[0], r[1], r[2]


def test_inline_pass_replaces_exactly_the_unrotated_quantizations():
    gm = fx.symbolic_trace(_NormQuant())
    h, w = torch.randn(3, 64), torch.rand(64).bfloat16() + 0.5
    for n in gm.graph.nodes:  # what Dynamo's graph carries: example values
        n.meta["example_value"] = torch.empty(0, dtype=torch.bfloat16)
    before = gm(h, w)
    assert inline_activation_quant(gm) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert targets.count(quantize_per_token_inline) == 2 and targets.count(Q.quantize_per_token.default) == 1
    _same(gm(h, w), before)


def test_backend_inductor_fuses_and_keeps_the_codes(monkeypatch):
    """Through the backend and Inductor (C++ on the CPU), with and without the inlining: the same codes, scales
    and zeros, bit for bit. Inductor keeps the norm's bfloat16 x in float32 inside a fused kernel, so this
    fails if x is not read through its bits (the codes of the unrounded x differ in many places)."""
    import torch._dynamo

    from qcompile.export.backend import qcompile_backend

    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 256, generator=g) * 4
    w = (torch.rand(256, generator=g) + 0.5).bfloat16()
    outs = {}
    for on in ("1", "0"):
        monkeypatch.setenv("QCOMPILE_INLINE_QUANT", on)
        torch._dynamo.reset()
        try:
            outs[on] = torch.compile(_NormQuant(), backend=qcompile_backend, fullgraph=True)(h, w)
        finally:
            torch._dynamo.reset()
    _same(outs["1"], outs["0"])
