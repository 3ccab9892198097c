"""``codes_route``: a one-token A8/A4 linear of inlined codes as the W4A16 GEMV on ``bf16(codes − zeros)``, scaled
after: the reference's sum up to one bfloat16 rounding, and only one-row linears of inlined codes rewritten."""

import operator

import torch
from torch import fx

from qcompile.kernels import reference
from qcompile.kernels.codes_route import linear_codes_w4a16, route_codes_to_w4a16
from qcompile.kernels.quant_inline import quantize_per_token_inline

Q = torch.ops.qcompile


def _weight(n=24, k=256, g=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen)
    return packed, scales, zeros


def test_routed_linear_is_the_w4a8_sum_up_to_one_rounding():
    p, s, z = _weight()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1)).bfloat16() * 3
    bias = torch.randn(24).bfloat16()
    for bits, sym in ((8, True), (8, False), (4, True), (4, False)):
        codes, sa, za = reference.quantize_per_token(x, bits, sym, 0.9)
        za = None if sym else za
        want = reference.linear_w4a8(codes, sa, za, p, s, z, 128, bias, torch.float32)
        got = linear_codes_w4a16(codes, sa, za, p, s, z, 128, bias, torch.float32)
        assert (got - want).abs().max() <= 2 ** -8 * want.abs().max()  # the W4A16 op's bf16 output rounding
        assert not torch.equal(got, want)  # (that rounding is there: the check above is not vacuous)


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
