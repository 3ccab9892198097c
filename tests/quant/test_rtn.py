"""RTN with QuaRot's clip search: the search never loses to the unclipped grid, and helps on tails."""

import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.quant.formats import QuantSpec, compute_qparams, dequantize, group_reduce, quantize
from qcompile.quant.rtn import (
    coarse_to_fine_mse_qparams,
    fake_quantize_mse,
    linear_shrinks,
    mse_qparams,
    rtn_quantize,
    search_qparams,
)


def _heavy_tailed(n=16, k=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _student_t(n, k, g)


def _student_t(n, k, g, df=3.0):
    z = torch.randn(n, k, generator=g)
    chi2 = torch.randn(n, k, int(df), generator=g).square().sum(-1)
    return z / (chi2 / df).sqrt()


def _group_err(w, s, z, spec, g, norm=2.0):
    return group_reduce((dequantize(quantize(w, s, z, spec), s, z, spec) - w).abs().pow(norm), g, "sum")


SPECS = [
    (QuantSpec(4, True), 320),
    (QuantSpec(4, False), 320),
    (QuantSpec(3, False, "group", 128), 128),  # 320 = 2·128 + a partial group of 64
    (QuantSpec(4, True, "group", 64, clip_ratio=0.9), 64),
]


@pytest.mark.parametrize("spec, g", SPECS)
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_search_never_increases_error(spec, g, norm):
    w = _heavy_tailed(seed=int(norm * 10) + spec.bits)
    s0, z0 = compute_qparams(w, spec)
    s1, z1 = mse_qparams(w, spec, norm=norm)
    base, searched = _group_err(w, s0, z0, spec, g, norm), _group_err(w, s1, z1, spec, g, norm)
    assert bool((searched <= base * (1 + 1e-6)).all())
    gain = 0.9 if spec.clip_ratio == 1.0 else 0.99  # heavy tails: clipping must actually help
    assert searched.sum() < gain * base.sum()


@pytest.mark.parametrize("spec, g", SPECS)
def test_coarse_to_fine_search_finds_nearly_every_exhaustive_optimum(spec, g):
    w = _heavy_tailed(seed=spec.bits + 7)
    s1, z1 = mse_qparams(w, spec)
    s2, z2 = coarse_to_fine_mse_qparams(w, spec)
    exhaustive, fast = _group_err(w, s1, z1, spec, g, 2.4), _group_err(w, s2, z2, spec, g, 2.4)
    assert bool((fast >= exhaustive * (1 - 1e-6)).all())  # never better than the exhaustive optimum
    assert (s1 == s2).float().mean() > 0.95  # and the same one almost everywhere
    assert fast.sum() <= exhaustive.sum() * 1.01


def test_candidates_and_validation():
    c = linear_shrinks(100, 0.8)
    assert c[0] == 1.0 and len(c) == 80 and abs(c[-1] - 0.21) < 1e-9
    with pytest.raises(RecipeError, match="max_shrink"):
        linear_shrinks(100, 1.0)
    with pytest.raises(RecipeError, match="granularity"):
        search_qparams(torch.randn(2, 8), QuantSpec(4, True, "token"), [(1.0, 1.0)])


def test_asymmetric_search_can_shrink_ends_independently():
    w = torch.linspace(-1, 1, 64).repeat(2, 1)
    w[:, 0] = -40.0  # one outlier on the low end only
    spec = QuantSpec(4, False)
    one_sided = [(1.0, 1.0)] + [(a, 1.0) for a in torch.linspace(1, 0.05, 40).tolist()]
    s, z = search_qparams(w, spec, one_sided)
    s0, z0 = compute_qparams(w, spec)
    assert _group_err(w, s, z, spec, 64).sum() < _group_err(w, s0, z0, spec, 64).sum()


def test_rtn_quantize_packs_exactly():
    w = torch.randn(8, 200, generator=torch.Generator().manual_seed(3))
    for clip_search in (True, False):
        q = rtn_quantize(w, QuantSpec(4, False, "group", 64), clip_search=clip_search)
        assert q.scales.shape == (8, 4) and q.codes.dtype == torch.uint8
        assert torch.equal(q.pack().dequantize(), q.weight)


def test_fake_quantize_mse_ste():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    y = fake_quantize_mse(w, QuantSpec(4, True), norm=2.0)
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert (y.detach() - w.detach()).abs().max() > 0
