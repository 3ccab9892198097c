"""LeanQuant: the loss-error-aware grid beats min/max in its own metric; the non-uniform codebook
beats uniform RTN on the layer output; k-means is deterministic under a seed."""

import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.quant.formats import QuantSpec, compute_qparams, dequantize, group_reduce, quantize
from qcompile.quant.gptq import HessianAccumulator, damped_inverse_cholesky
from qcompile.quant.leanquant import (
    affine_grid,
    codebook_grid,
    leanquant_quantize,
    loss_error_weights,
    weighted_kmeans_1d,
)
from qcompile.quant.rtn import rtn_quantize


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    k = 320
    x = (torch.randn(1024, k, generator=g) * torch.linspace(0.1, 3.0, k)) @ (torch.randn(k, k, generator=g) / k**0.5)
    acc = HessianAccumulator(k, name="layers.0.self_attn.q_proj")
    acc.add(x)
    w = torch.randn(32, k, generator=g) * 0.02
    return x, w, acc.hessian()


def out_err(x, w, wq):
    return ((x @ w.T - x @ wq.T).norm() / (x @ w.T).norm()).item()


def test_loss_error_weights():
    d = torch.tensor([0.5, 1.0, 2.0])
    w = loss_error_weights(d, p=4)
    torch.testing.assert_close(w, torch.tensor([1.0, 1 / 16, 1 / 256]))


@pytest.mark.parametrize(
    "spec, g",
    [(QuantSpec(4, False), 320), (QuantSpec(3, False, "group", 128), 128), (QuantSpec(3, True, "group", 64), 64)],
)
def test_affine_grid_weighted_error_at_most_minmax(problem, spec, g):
    _, w, h = problem
    d = damped_inverse_cholesky(h).diagonal()
    omega = loss_error_weights(d)

    def weighted(s, z):
        e = (dequantize(quantize(w, s, z, spec), s, z, spec) - w).square() * omega
        return group_reduce(e, g, "sum")

    grid = affine_grid(spec, steps=12, scale_dtype=None)(w, d)
    lean, base = weighted(grid.scales, grid.zeros), weighted(*compute_qparams(w, spec))
    assert bool((lean <= base * (1 + 1e-6)).all())
    assert lean.sum() < 0.95 * base.sum()


@pytest.mark.parametrize("bits", [3, 4])
def test_nonuniform_codebook_beats_uniform_rtn(problem, bits):
    x, w, h = problem
    spec = QuantSpec(bits, True)
    q = leanquant_quantize(w, h, spec, nonuniform=True, name="q_proj")
    assert q.codebook.shape == (32, 2**bits)
    assert bool((q.codebook.diff(dim=1) >= 0).all())
    assert int(q.codes.max()) < 2**bits
    assert torch.equal(q.weight, q.codebook.gather(1, q.codes.long()))
    assert out_err(x, w, q.weight) < out_err(x, w, rtn_quantize(w, spec, clip_search=False).weight)
    assert torch.equal(q.pack().dequantize(), q.weight)


@pytest.mark.parametrize("spec", [QuantSpec(3, False, "group", 128), QuantSpec(4, True)])
def test_affine_leanquant_beats_rtn(problem, spec):
    x, w, h = problem
    q = leanquant_quantize(w, h, spec, grid_steps=10)
    assert out_err(x, w, q.weight) < 0.8 * out_err(x, w, rtn_quantize(w, spec).weight)
    assert torch.equal(q.pack().dequantize(), q.weight)


def test_determinism_under_seed(problem):
    _, w, h = problem
    d = damped_inverse_cholesky(h).diagonal()
    a = codebook_grid(4, seed=3)(w, d).codebook
    b = codebook_grid(4, seed=3)(w, d).codebook
    c = codebook_grid(4, seed=4)(w, d).codebook
    assert torch.equal(a, b) and not torch.equal(a, c)
    q1 = leanquant_quantize(w, h, QuantSpec(4, True), nonuniform=True, seed=5)
    q2 = leanquant_quantize(w, h, QuantSpec(4, True), nonuniform=True, seed=5)
    assert torch.equal(q1.codes, q2.codes) and torch.equal(q1.codebook, q2.codebook)


@pytest.mark.parametrize("init", ["kmeans++", "linspace"])
def test_weighted_kmeans_finds_clusters_and_follows_weights(init):
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, -1.0, 0.5, 4.0])
    x = (centers[torch.randint(0, 4, (6, 400), generator=g)] + 0.01 * torch.randn(6, 400, generator=g))
    c = weighted_kmeans_1d(x, torch.ones(400), 4, init=init, seed=1)
    torch.testing.assert_close(c, centers.expand(6, 4), atol=0.02, rtol=0)
    # two points, one cluster: the centroid sits at the weighted mean
    pts = torch.tensor([[0.0, 1.0]])
    c1 = weighted_kmeans_1d(pts, torch.tensor([3.0, 1.0]), 1, init="linspace")
    torch.testing.assert_close(c1, torch.tensor([[0.25]]))


def test_nonuniform_refuses_groups():
    with pytest.raises(RecipeError, match="channel"):
        leanquant_quantize(torch.randn(4, 16), torch.eye(16), QuantSpec(4, True, "group", 8), nonuniform=True)
    with pytest.raises(RecipeError, match="init"):
        weighted_kmeans_1d(torch.randn(2, 8), torch.ones(8), 4, init="random")
