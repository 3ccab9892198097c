"""``codes_route``: a one-token A8/A4 linear of inlined codes as the W4A16 GEMV on ``codes − zeros`` with the token's
scale as the op's row scale (one rounding: the codes GEMV's numerics), on by default; only one-row linears of
inlined codes rewritten. Also ``linear_w4a16``'s ``row_scale`` argument itself (CPU reference, checks, opcheck)."""

import operator

import pytest
import torch
from torch import fx

import qcompile.kernels as K
from qcompile.errors import ShapeError
from qcompile.kernels import codes_route, reference
from qcompile.kernels.codes_route import linear_codes_w4a16, route_codes_to_w4a16
from qcompile.kernels.quant_inline import quantize_per_token_inline

Q = torch.ops.qcompile


def _weight(n=24, k=256, g=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen)
    return packed, scales, zeros


def test_routed_linear_has_the_codes_gemv_numerics():
    """Same sum, one rounding: float32 out within float32 summation order of ``linear_w4a8``; bfloat16 out equal
    to it but for an occasional one-ulp tie of that order, where rounding the sum to bfloat16 before the scale
    (the route before the row scale) is off on many outputs."""
    p, s, z = _weight()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1)).bfloat16() * 3
    bias = torch.randn(24).bfloat16()
    for bits, sym in ((8, True), (8, False), (4, True), (4, False)):
        codes, sa, za = reference.quantize_per_token(x, bits, sym, 0.9)
        za = None if sym else za
        want = reference.linear_w4a8(codes, sa, za, p, s, z, 128, bias, torch.float32)
        got = linear_codes_w4a16(codes, sa, za, p, s, z, 128, bias, torch.float32)
        assert got.dtype == torch.float32 and (got - want).abs().max() <= 1e-5 * want.abs().max()
        want16 = reference.linear_w4a8(codes, sa, za, p, s, z, 128, bias, torch.bfloat16)
        got16 = linear_codes_w4a16(codes, sa, za, p, s, z, 128, bias, torch.bfloat16)
        assert got16.dtype == torch.bfloat16
        assert (got16.float() - want16.float()).abs().max() <= 2 ** -7 * want16.float().abs().max()
        assert (got16 != want16).sum() <= 1
        a = codes.float() - (0 if za is None else za.float())
        two = (K.linear_w4a16(a.bfloat16(), p, s, z, 128).float() * sa + bias.float()).bfloat16()
        assert (two != want16).sum() > 2  # the extra rounding this removes is visible at this size


def test_route_is_on_by_default(monkeypatch):
    monkeypatch.delenv("QCOMPILE_CODES_W4A16", raising=False)
    assert codes_route.enabled()
    monkeypatch.setenv("QCOMPILE_CODES_W4A16", "0")
    assert not codes_route.enabled()
    monkeypatch.setenv("QCOMPILE_CODES_W4A16", "1")
    assert codes_route.enabled()


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 2)])
def test_row_scale_is_applied_before_the_one_rounding(lead):
    p, s, z = _weight(n=16, k=256)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, 256, generator=gen).bfloat16()
    r = torch.rand(*lead, 1, generator=gen) * 3 + 0.1
    bias = torch.randn(16, generator=gen).bfloat16()
    got = K.linear_w4a16(x, p, s, z, 128, bias, row_scale=r)
    want = (reference.linear_w4a16(x.float(), p, s, z, 128) * r + bias.float()).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(K.linear_w4a16(x, p, s, z, 128, bias), Q.linear_w4a16(x, p, s, z, 128, bias))  # default: none


def test_row_scale_errors_and_opcheck():
    p, s, z = _weight(n=16, k=256)
    x = torch.randn(3, 256).bfloat16()
    for bad, what in ((torch.ones(3, 1, dtype=torch.float64), "float32"), (torch.ones(2, 1), "one value per row")):
        with pytest.raises(ShapeError, match=what):
            K.linear_w4a16(x, p, s, z, 128, None, row_scale=bad)
    torch.library.opcheck(Q.linear_w4a16.default, (x, p, s, z, 128, None, torch.rand(3, 1)))
    schema = str(Q.linear_w4a16.default._schema)
    assert schema.endswith("Tensor? bias, Tensor? row_scale=None) -> Tensor")  # old calls (6 arguments) still bind


class _Linears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        p, s, _ = _weight()
        self.register_buffer("p", p)
        self.register_buffer("s", s)

    def forward(self, x, xs):
        c = quantize_per_token_inline(x, 8, True, 1.0)
        one = Q.linear_w4a8.default(c[0], c[1], None, self.p, self.s, None, 128, None, torch.bfloat16)  # routed
        c2 = quantize_per_token_inline(xs, 8, True, 1.0)
        rows = Q.linear_w4a8.default(c2[0], c2[1], None, self.p, self.s, None, 128, None, torch.bfloat16)  # kept
        c3 = Q.quantize_per_token.default(x, 4, True, 1.0, True, 0)
        rot = Q.linear_w4a4.default(c3[0], c3[1], None, self.p, self.s, None, 128, None, torch.bfloat16)  # kept
        return one, rows, rot


def test_route_rewrites_one_row_linears_of_inlined_codes_only():
    m = _Linears()
    gm = fx.GraphModule(m, fx.Tracer(autowrap_functions=(quantize_per_token_inline,)).trace(m))
    x, xs = torch.randn(1, 1, 256).bfloat16(), torch.randn(1, 3, 256).bfloat16()
    for n in gm.graph.nodes:  # Dynamo's graphs carry example values
        if n.op == "call_function" and n.target is operator.getitem:
            n.meta["example_value"] = torch.empty((*(x if n.args[0].args[0].name == "x" else xs).shape[:-1],
                                                  256 if n.args[1] == 0 else 1))
    before = gm(x, xs)
    assert route_codes_to_w4a16(gm) == 1
    assert [n.target for n in gm.graph.nodes].count(linear_codes_w4a16) == 1
    after = gm(x, xs)
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])
    assert (after[0].float() - before[0].float()).abs().max() <= 2 ** -7 * before[0].float().abs().max()
    assert (after[0] != before[0]).sum() <= 1  # one rounding, as the codes GEMV's
