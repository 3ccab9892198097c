"""Linears that share a Hessian quantized as one stack of rows give each linear its own result, bit for bit
(GPTQ's column loop is row by row); a QuantizedWeight cut into row runs and joined again is unchanged."""

import pytest
import torch

from qcompile.errors import RecipeError, ShapeError
from qcompile.quant.formats import QuantSpec
from qcompile.quant.gptq import gptq_quantize
from qcompile.quant.leanquant import leanquant_quantize
from qcompile.quant.rows import cat_rows, row_runs, split_rows


@pytest.fixture(scope="module")
def shared_input():
    g = torch.Generator().manual_seed(0)
    k = 320
    x = torch.randn(1500, k, generator=g) * torch.linspace(0.1, 3.0, k)
    h = x.T @ x / x.shape[0]
    h[:, 7] = h[7, :] = 0  # a dead input: its column is zeroed in every linear alike
    ws = [torch.randn(n, k, generator=g) * 0.02 for n in (40, 8, 24)]  # q, k, v of unequal heights
    return h, ws


QUANTIZERS = {
    "gptq g128 (params at each group start)": lambda w, h: gptq_quantize(w, h, QuantSpec(4, False, "group", 128)),
    "gptq g64 mse, block 32": lambda w, h: gptq_quantize(w, h, QuantSpec(4, False, "group", 64), mse=True,
                                                         block_size=32),
    "gptq per-channel act-order": lambda w, h: gptq_quantize(w, h, QuantSpec(3, True), act_order=True),
    "gptq g64 act-order static": lambda w, h: gptq_quantize(w, h, QuantSpec(4, False, "group", 64), act_order=True,
                                                            static_groups=True),
    "leanquant affine g128": lambda w, h: leanquant_quantize(w, h, QuantSpec(4, False, "group", 128)),
}


@pytest.mark.parametrize("how", QUANTIZERS)
def test_stacked_rows_equal_each_linear_alone(shared_input, how):
    h, ws = shared_input
    fn = QUANTIZERS[how]
    stacked = split_rows(fn(torch.cat(ws), h), [w.shape[0] for w in ws])
    for w, got in zip(ws, stacked):
        alone = fn(w, h)
        assert torch.equal(got.codes, alone.codes) and torch.equal(got.weight, alone.weight)
        assert torch.equal(got.scales, alone.scales) and torch.equal(got.zeros, alone.zeros)
    assert not torch.equal(stacked[0].weight, ws[0])  # it did quantize


def test_any_row_run_quantizes_alone(shared_input):
    """What the ranks do: each quantizes a run of the stack's rows; the joined runs are the whole result."""
    h, ws = shared_input
    w = torch.cat(ws)
    whole = gptq_quantize(w, h, QuantSpec(4, False, "group", 128))
    for world in (2, 3):
        runs = row_runs(w.shape[0], world)
        assert runs[0][0] == 0 and runs[-1][1] == w.shape[0] and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        joined = cat_rows([gptq_quantize(w[lo:hi], h, QuantSpec(4, False, "group", 128)) for lo, hi in runs])
        assert torch.equal(joined.codes, whole.codes) and torch.equal(joined.weight, whole.weight)


def test_split_and_cat_refuse_what_does_not_fit(shared_input):
    h, ws = shared_input
    q = gptq_quantize(ws[0], h, QuantSpec(4, True))
    with pytest.raises(ShapeError, match="add up to 39"):
        split_rows(q, [30, 9])
    with pytest.raises(ShapeError, match="differ in spec"):
        cat_rows([q, gptq_quantize(ws[1], h, QuantSpec(3, True))])
    with pytest.raises(ShapeError, match="nothing"):
        cat_rows([])


def test_cuda_graph_loop_needs_a_cuda_weight(shared_input):
    h, ws = shared_input
    with pytest.raises(RecipeError, match="CUDA device"):
        gptq_quantize(ws[0], h, QuantSpec(4, True), cuda_graph=True)


GRAPHED = {  # (w, h, graph, fused): the torch loop eager or as CUDA graphs, or the fused Triton loop
    "gptq g128": lambda w, h, graph, fused: gptq_quantize(w, h, QuantSpec(4, False, "group", 128), cuda_graph=graph,
                                                          fused=fused),
    "gptq per-channel act-order mse": lambda w, h, graph, fused: gptq_quantize(
        w, h, QuantSpec(4, True), act_order=True, mse=True, cuda_graph=graph, fused=fused),
    "leanquant affine g64": lambda w, h, graph, fused: leanquant_quantize(w, h, QuantSpec(4, False, "group", 64),
                                                                          cuda_graph=graph, fused=fused),
    "leanquant codebook": lambda w, h, graph, fused: leanquant_quantize(w, h, QuantSpec(4, False), nonuniform=True,
                                                                        cuda_graph=graph, fused=False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("how", GRAPHED)
def test_cuda_graph_loop_equals_the_eager_loop(shared_input, how):
    """The captured column loop launches the eager loop's kernels on the same values: the same result; so does
    the fused Triton loop (``quant.gptq_fused``: the same operations per element) on affine grids."""
    h, ws = shared_input
    w, h = torch.cat(ws).cuda(), h.cuda()
    eager = GRAPHED[how](w, h, False, False)
    for _ in range(2):  # the second call replays the graphs the first one captured
        graphed = GRAPHED[how](w, h, True, False)
        assert torch.equal(eager.codes, graphed.codes) and torch.equal(eager.weight, graphed.weight)
    if "codebook" not in how:
        fused = GRAPHED[how](w, h, False, True)
        assert torch.equal(eager.codes, fused.codes) and torch.equal(eager.weight, fused.weight)
