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


@pytest.mark.parametrize("n", [48, 300])
def test_factor_methods_give_the_same_factor(n):
    """``reversed`` (U = J·chol(J·H_d·J)⁻¹·J) and ``inverse`` (U = chol((L Lᵀ)⁻¹)) are one factor: equal in float64
    to rounding, upper with UᵀU = H_d⁻¹; in float32 each is as close to the float64 factor as the other."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64) * torch.randn(n, generator=g, dtype=torch.float64).exp()
    h = x.T @ x / x.shape[0]
    ref = damped_inverse_cholesky(h, method="inverse")
    rev = damped_inverse_cholesky(h, method="reversed")
    assert float((rev - ref).norm() / ref.norm()) < 1e-12
    assert bool((rev.tril(-1) == 0).all()) and bool((rev.diagonal() > 0).all())
    hd = h.clone()
    hd.diagonal().add_(0.01 * hd.diagonal().mean())
    torch.testing.assert_close(rev.T @ rev @ hd, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    err = {m: float((damped_inverse_cholesky(h.float(), method=m).double() - ref).norm() / ref.norm())
           for m in ("inverse", "reversed")}
    assert max(err.values()) < 1e-5 and err["reversed"] < 2 * err["inverse"], err


@pytest.mark.parametrize("n, block", [(257, 64), (128, 128), (40, 2048)])
def test_reversed_lower_inverse_by_column_blocks(n, block):
    """The column-block solves (each block only below its first row, the last block ragged) give J·L⁻¹·J."""
    from qcompile.quant.gptq import _reversed_lower_inverse

    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    low = torch.linalg.cholesky(x.T @ x / n)
    got = _reversed_lower_inverse(low, block)
    torch.testing.assert_close(got, torch.linalg.inv(low).flip(0, 1), rtol=0, atol=1e-12)
    assert bool((got.tril(-1) == 0).all())


def test_factor_method_choice_and_refusals(monkeypatch):
    with pytest.raises(CalibrationError, match="layers.3.down.*trailing minor"):
        damped_inverse_cholesky(-torch.eye(6), name="layers.3.down", method="reversed")
    with pytest.raises(RecipeError, match="'lu'"):
        damped_inverse_cholesky(torch.eye(6), method="lu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64)
    w = torch.randn(16, 64, generator=g) * 0.02
    by = {}
    for m in ("inverse", "reversed"):  # the env picks the factor; from a float64 H both round to one float32 U
        monkeypatch.setenv("QCOMPILE_GPTQ_FACTOR", m)
        by[m] = gptq_quantize(w, x.T @ x, QuantSpec(4, True, "group", 32))
    assert torch.equal(by["inverse"].codes, by["reversed"].codes)
    monkeypatch.setenv("QCOMPILE_GPTQ_FACTOR", "nope")
    with pytest.raises(RecipeError, match="'nope'"):
        gptq_quantize(w, x.T @ x, QuantSpec(4, True))
