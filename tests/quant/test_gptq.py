"""GPTQ: Hessian accumulation, output error ≤ RTN on an ill-conditioned Hessian, exactness checks,
and refusals that name the layer."""

import pytest
import torch

from qcompile.errors import CalibrationError, RecipeError, ShapeError
from qcompile.quant.formats import QuantSpec
from qcompile.quant.gptq import HessianAccumulator, damped_inverse_cholesky, gptq_quantize
from qcompile.quant.rtn import rtn_quantize


def correlated_inputs(t=1024, k=576, seed=0):
    """X = Z·A: per-feature scales spanning 30× and a random mixing A, so H is ill-conditioned."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t, k, generator=g) * torch.linspace(0.1, 3.0, k)
    return z @ (torch.randn(k, k, generator=g) / k**0.5)


@pytest.fixture(scope="module")
def problem():
    x = correlated_inputs()
    acc = HessianAccumulator(x.shape[1], name="model.layers.0.mlp.down_proj")
    for chunk in x.split(300):  # streamed, uneven batches
        acc.add(chunk)
    w = torch.randn(48, x.shape[1], generator=torch.Generator().manual_seed(1)) * 0.02
    return x, w, acc.hessian()


def out_err(x, w, wq):
    return ((x @ w.T - x @ wq.T).norm() / (x @ w.T).norm()).item()


def test_hessian_accumulator_streams_exactly(problem):
    x, _, h = problem
    torch.testing.assert_close(h, 2.0 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-4)
    assert torch.linalg.cond(h.double()) > 1e4  # the problem is genuinely ill-conditioned


def test_hessian_accumulator_refusals():
    acc = HessianAccumulator(8, name="blk.3.q_proj")
    with pytest.raises(CalibrationError, match="blk.3.q_proj"):
        acc.hessian()
    bad = torch.randn(2, 4, 8)
    bad[1, 2, 5] = float("nan")
    with pytest.raises(CalibrationError, match="blk.3.q_proj.*NaN"):
        acc.add(bad)
    with pytest.raises(ShapeError, match="blk.3.q_proj"):
        acc.add(torch.randn(3, 7))
    acc.add(torch.randn(2, 4, 8))
    assert acc.n_samples == 8


CASES = [
    (QuantSpec(4, True), dict()),
    (QuantSpec(4, True), dict(act_order=True)),
    (QuantSpec(3, False), dict(act_order=True)),
    (QuantSpec(4, False, "group", 128), dict()),  # K = 576: four groups of 128 + one of 64
    (QuantSpec(4, False, "group", 64), dict(block_size=96)),  # group starts mid-block
    (QuantSpec(4, True, "group", 128), dict(static_groups=True)),
    (QuantSpec(4, False, "group", 128), dict(static_groups=True, act_order=True)),
    (QuantSpec(4, True, "channel"), dict(mse=True)),
]


@pytest.mark.parametrize("spec, kw", CASES)
def test_gptq_beats_rtn_on_layer_output(problem, spec, kw):
    x, w, h = problem
    q = gptq_quantize(w, h, spec, name="down", **kw)
    rtn = rtn_quantize(w, spec, clip_search=kw.get("mse", False))
    e_gptq, e_rtn = out_err(x, w, q.weight), out_err(x, w, rtn.weight)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    n_groups = -(-576 // (spec.group_size or 576))
    assert q.scales.shape == q.zeros.shape == (48, n_groups)
    assert torch.equal(q.pack().dequantize(), q.weight)  # the canonical format reproduces it


def test_identity_hessian_reduces_to_rtn():
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(2))
    for spec in (QuantSpec(4, False, "group", 64), QuantSpec(3, True)):
        q = gptq_quantize(w, torch.eye(200), spec)
        assert torch.equal(q.codes, rtn_quantize(w, spec, clip_search=False).codes)


def test_lazy_blocks_do_not_change_the_result(problem):
    x, w, h = problem
    spec = QuantSpec(4, False, "group", 64)
    ref = gptq_quantize(w[:4], h, spec, block_size=1)
    for bs in (37, 576):
        torch.testing.assert_close(gptq_quantize(w[:4], h, spec, block_size=bs).weight, ref.weight)


def test_dead_columns(problem):
    x, w, _ = problem
    x = x.clone()
    x[:, [3, 100]] = 0
    h = 2 / x.shape[0] * x.T @ x
    q = gptq_quantize(w, h, QuantSpec(4, False, "group", 128), act_order=True, static_groups=True)
    assert bool(torch.isfinite(q.weight).all())
    assert bool((q.weight[:, [3, 100]] == 0).all())
    assert out_err(x, w, q.weight) < out_err(x, w, rtn_quantize(w, QuantSpec(4, False, "group", 128)).weight)


def test_singular_hessian_is_damped(problem):
    x, w, _ = problem
    x = x.clone()
    x[:, 1] = x[:, 0]  # duplicated feature: H singular, diagonal nonzero
    h = 2 / x.shape[0] * x.T @ x
    q = gptq_quantize(w, h, QuantSpec(4, True))
    assert bool(torch.isfinite(q.weight).all())
    assert out_err(x, w, q.weight) < out_err(x, w, rtn_quantize(w, QuantSpec(4, True), clip_search=False).weight)


def test_refusals_name_the_layer():
    w = torch.randn(4, 16)
    with pytest.raises(CalibrationError, match="layers.7.o_proj.*positive definite"):
        gptq_quantize(w, -torch.eye(16), QuantSpec(4, True), name="layers.7.o_proj")
    h = torch.eye(16)
    h[2, 3] = float("nan")
    with pytest.raises(CalibrationError, match="layers.7.o_proj.*NaN"):
        gptq_quantize(w, h, QuantSpec(4, True), name="layers.7.o_proj")
    with pytest.raises(RecipeError, match="static_groups"):
        gptq_quantize(w, torch.eye(16), QuantSpec(4, True, "group", 8), act_order=True, name="x")
    with pytest.raises(ShapeError, match="H \\[K, K\\]"):
        gptq_quantize(w, torch.eye(8), QuantSpec(4, True))
    with pytest.raises(CalibrationError, match="not positive definite"):
        damped_inverse_cholesky(torch.zeros(4, 4), percdamp=0.0)
