"""grouped_linear_w4a16: routed experts' int4 matmul over rows sorted by expert."""

import pytest
import torch

from qcompile.errors import ShapeError
from qcompile.kernels import ops
from qcompile.quant.formats import Granularity, QuantSpec
from qcompile.quant.rtn import rtn_quantize


def _experts(E=4, N=24, K=40, g=16, symmetric=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(E * N, K, generator=gen)
    qw = rtn_quantize(w, QuantSpec(4, symmetric, Granularity.GROUP, g), clip_search=False)
    p = qw.pack()
    z = None if p.zeros is None else p.zeros.reshape(E, N, -1)
    return p.packed.reshape(E, N, -1), p.scales.reshape(E, N, -1), z, g, qw.weight.reshape(E, N, K)


@pytest.mark.parametrize("symmetric", [True, False])
def test_grouped_op_is_each_experts_rows_times_its_weight(symmetric):
    packed, scales, zeros, g, w = _experts(symmetric=symmetric)  # K = 40: a partial last group of 8
    counts = [5, 0, 7, 3]  # expert 1 gets no row; 2 rows past offs[-1] (expert-parallel sentinels)
    x = torch.randn(sum(counts) + 2, 40, generator=torch.Generator().manual_seed(1))
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = ops.grouped_linear_w4a16(x, offs, packed, scales, zeros, g)
    start = 0
    for e, n in enumerate(counts):
        torch.testing.assert_close(y[start : start + n], x[start : start + n] @ w[e].T, rtol=1e-5, atol=1e-5)
        start += n
    assert torch.equal(y[start:], torch.zeros(2, 24))


def test_grouped_op_traces_with_dynamic_rows():
    packed, scales, zeros, g, _ = _experts()

    class M(torch.nn.Module):
        def forward(self, x, offs):
            return ops.grouped_linear_w4a16(x, offs, packed, scales, zeros, g)

    x, offs = torch.randn(9, 40), torch.tensor([2, 4, 4, 9], dtype=torch.int32)
    ep = torch.export.export(M(), (x, offs), dynamic_shapes=({0: torch.export.Dim("s", min=2)}, None))
    x2 = torch.randn(13, 40)
    offs2 = torch.tensor([1, 5, 10, 13], dtype=torch.int32)
    assert torch.equal(ep.module()(x2, offs2), M()(x2, offs2))


def test_grouped_op_refuses_bad_shapes_by_name():
    packed, scales, zeros, g, _ = _experts()
    with pytest.raises(ShapeError, match="offs integer"):
        ops.grouped_linear_w4a16(torch.randn(4, 40), torch.tensor([1, 2, 3]), packed, scales, zeros, g)
    with pytest.raises(ShapeError, match="packed_weight must be uint8"):
        ops.grouped_linear_w4a16(torch.randn(4, 48), torch.tensor([1, 2, 3, 4]), packed, scales, zeros, g)


@pytest.mark.parametrize("bits", [8, 4])
def test_grouped_w4ax_is_each_experts_rows_on_their_codes(bits):
    packed, scales, zeros, g, w = _experts(symmetric=True)
    counts = [3, 6, 0, 4]
    x = torch.randn(sum(counts), 40, generator=torch.Generator().manual_seed(2))
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    codes, s, z = ops.quantize_per_token(x, bits, symmetric=False)
    y = ops.grouped_linear_w4a8(codes, s, z, offs, packed, scales, zeros, g, torch.float32, act_bits=bits)
    a = (codes.float() - z.float()) * s
    start = 0
    for e, n in enumerate(counts):
        torch.testing.assert_close(y[start : start + n], a[start : start + n] @ w[e].T, rtol=1e-5, atol=1e-5)
        start += n
