"""DuQuant numerics: the rotation basis, greedy rotation, zigzag permutation, and the composed transform."""

import torch

from qcompile.quant.duquant import (
    block_rotation,
    duquant_transform,
    greedy_rotation,
    permutation_matrix,
    step_basis,
    step_for_channel,
    zigzag_permutation,
)

EYE = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731


def _outliers(n=512, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    for ch, f in ((3, 50), (17, 20), (40, 30)):
        x[:, ch % c] *= f
    return x


def test_basis_is_orthogonal_with_a_uniform_first_row():
    for b in (2, 3, 16, 40):
        r = step_basis(b, seed=b)
        assert torch.allclose(r @ r.T, EYE(b), atol=1e-12)
        assert torch.allclose(r[0].abs(), torch.full((b,), b ** -0.5, dtype=torch.float64), atol=1e-12)
        s = step_for_channel(r, b - 1)
        assert torch.allclose(s[b - 1].abs(), torch.full((b,), b ** -0.5, dtype=torch.float64), atol=1e-12)


def test_one_step_spreads_the_outlier_channel():
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[:, 5] = 100.0
    res = greedy_rotation(x, steps=1)
    assert res.peaks[1] < res.peaks[0] / 2  # 100 spread over 16 channels: ~100/4 + noise


def test_greedy_is_orthogonal_and_keeps_the_best_prefix():
    x = _outliers(c=16)
    for index in ("channel", "row"):
        res = greedy_rotation(x, steps=32, seed=3, index=index)
        r = res.rotation
        assert torch.allclose(r @ r.T, EYE(16), atol=1e-10)
        assert len(res.peaks) == 33
        assert min(res.peaks) == res.peaks[res.steps] < res.peaks[0]
        assert abs((x @ r).abs().max().item() - res.peaks[res.steps]) < 1e-9


def test_block_rotation_handles_a_partial_last_block():
    x = _outliers(c=72)
    r, kept = block_rotation(x, block=32, steps=8)
    assert r.shape == (72, 72) and len(kept) == 2
    assert torch.allclose(r @ r.T, EYE(72), atol=1e-10)
    assert r[:64, 64:].abs().max() == 0  # block-diagonal: 32, 32, then 8


def test_zigzag_balances_block_maxima():
    absmax = torch.tensor([100.0, 90, 80, 70] + [1.0] * 12)  # four outliers, four blocks of 4, all in block 0
    perm = zigzag_permutation(absmax, 4)
    assert sorted(perm.tolist()) == list(range(16))
    per_block = absmax[perm].view(4, 4).amax(1)
    assert sorted(per_block.tolist()) == [70.0, 80.0, 90.0, 100.0]  # one outlier per block
    # the zigzag deals 0,1,2,3 then 3,2,1,0: block 0 gets the largest and then the eighth largest channel
    assert perm[0] == 0 and perm[4] == 1 and perm[12] == 3 and perm[13] == 4
    pm = permutation_matrix(perm)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(x @ pm, x[:, perm])


def test_transform_is_orthogonal_and_reduces_the_peak():
    x = _outliers()
    t = duquant_transform(x, block=16, steps=32)
    m = t.matrix()
    assert torch.allclose(m @ m.T, EYE(64), atol=1e-10)
    assert (x @ m).abs().max() < 0.5 * x.abs().max()
    r1, r2 = t.blocks()
    assert torch.allclose(torch.block_diag(*[r1] * 4), t.r1)
