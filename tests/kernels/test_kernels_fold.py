"""``fold_activation_quant``: quantize_per_token → linear_w4a8/w4a4 becomes one ``linear_w4ax_dynamic`` where
that is the same computation, and only there (a rotation, or an asymmetric quantization whose zeros the linear
drops, is left alone); the rewritten graph gives the same outputs bit for bit on the CPU."""

import pytest
import torch
from torch import fx

import qcompile.kernels as K
from qcompile.kernels import reference
from qcompile.kernels.fold import fold_activation_quant

Q = torch.ops.qcompile


def _weight(n=24, k=128, g=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).half()
    return packed, scales


class _Linears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        p, s = _weight()
        self.register_buffer("p", p)
        self.register_buffer("s", s)

    def forward(self, x):
        c, s, z = Q.quantize_per_token.default(x, 4, False, 0.9, False, 0)
        shared_a = Q.linear_w4a4.default(c, s, z, self.p, self.s, None, 64, None, torch.bfloat16)  # folded
        shared_b = Q.linear_w4a4.default(c, s, z, self.p, self.s, None, 64, None, torch.float32)  # folded
        c1, s1, _ = Q.quantize_per_token.default(x, 8, True, 1.0, False, 0)
        sym = Q.linear_w4a8.default(c1, s1, None, self.p, self.s, None, 64, None, torch.float32)  # folded
        c2, s2, _ = Q.quantize_per_token.default(x, 8, False, 1.0, False, 0)
        dropped = Q.linear_w4a8.default(c2, s2, None, self.p, self.s, None, 64, None, torch.float32)  # kept
        c3, s3, z3 = Q.quantize_per_token.default(x, 8, True, 1.0, True, 0)
        rotated = Q.linear_w4a8.default(c3, s3, z3, self.p, self.s, None, 64, None, torch.float32)  # kept
        return shared_a, shared_b, sym, dropped, rotated


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_fold_rewrites_exactly_the_equivalent_linears():
    gm = fx.symbolic_trace(_Linears())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    before = gm(x)
    assert fold_activation_quant(gm) == 3
    t = _targets(gm)
    assert t.count(Q.linear_w4ax_dynamic.default) == 3
    assert t.count(Q.quantize_per_token.default) == 2  # the first two quantizations are gone
    after = gm(x)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert fold_activation_quant(gm) == 0


def test_dynamic_op_is_quantize_then_linear():
    p, s = _weight(k=576, g=64, seed=2)
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    bias = torch.randn(24, dtype=torch.bfloat16)
    codes, sa, za = reference.quantize_per_token(x, 4, False, 0.9)
    ref = reference.linear_w4a8(codes, sa, za, p, s, None, 64, bias, torch.bfloat16)
    assert torch.equal(K.ops.linear_w4ax_dynamic(x, 4, False, 0.9, p, s, None, 64, bias), ref)
    torch.library.opcheck(Q.linear_w4ax_dynamic.default, (x, 8, True, 1.0, p, s, None, 64, None, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("on", [True, False])
def test_backend_folds_the_graph_dynamo_hands_over(monkeypatch, on):
    """An already-quantized graph through the ``qcompile`` backend: with ``QCOMPILE_ACT_GEMV=1`` Dynamo's fx
    graph (weights as inputs) reaches ``fold_activation_quant`` and runs with the folded op, otherwise it is
    left as it is; either way the outputs are the eager ones."""
    import torch._dynamo

    from qcompile.export import backend

    seen = []
    real = backend._calls_qcompile_ops

    def spy(gm):
        seen.append(gm)
        return real(gm)

    monkeypatch.setenv("QCOMPILE_ACT_GEMV", "1" if on else "0")
    m = _Linears()
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    eager = m(x)
    torch._dynamo.reset()
    try:
        backend._calls_qcompile_ops, saved = spy, backend._calls_qcompile_ops
        out = torch.compile(m, backend=backend.qcompile_backend, fullgraph=True, options={"inductor": False})(x)
    finally:
        backend._calls_qcompile_ops = saved
        torch._dynamo.reset()
    assert _targets(seen[0]).count(Q.linear_w4ax_dynamic.default) == (3 if on else 0)
    for a, b in zip(eager, out):
        assert torch.equal(a, b)


def test_dynamic_op_names_bad_input():
    from qcompile.errors import ShapeError

    p, s = _weight()
    with pytest.raises(ShapeError, match="linear_w4ax_dynamic: out_dtype"):
        K.ops.linear_w4ax_dynamic(torch.randn(1, 128), 8, True, 1.0, p, s, None, 64, None, torch.int8)
    with pytest.raises(ShapeError, match=r"linear_w4ax_dynamic: packed_weight must be uint8 \[N, ceil\(K/2\)\]"):
        K.ops.linear_w4ax_dynamic(torch.randn(1, 130), 8, True, 1.0, p, s, None, 64)
