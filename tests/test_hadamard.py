import pytest
import torch

from qcompile.errors import ShapeError
from qcompile.quant import hadamard as had

QUAROT_ORDERS = [12, 20, 28, 36, 40, 52, 60, 108, 140]


@pytest.mark.parametrize("m", [1, 2, 4] + QUAROT_ORDERS + [44, 148])
def test_constructed_orders_are_hadamard(m):
    H = had._unnormalized(m)
    assert H is not None
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=H.dtype))


@pytest.mark.parametrize("dense_max", [had.DENSE_MAX, 0])  # the dense product and the butterflies
@pytest.mark.parametrize("n", [64, 576, 1536, 96, 28 * 16, 40 * 8, 52 * 4])
def test_transform_matches_dense_orthogonal_matrix(n, dense_max, monkeypatch):
    monkeypatch.setattr(had, "DENSE_MAX", dense_max)
    H = had.hadamard_matrix(n)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=H.dtype), atol=1e-10)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    assert torch.allclose(had.hadamard_transform(x), x @ H, atol=1e-9)
    assert torch.allclose(had.hadamard_transform(x, transpose=True), x @ H.T, atol=1e-9)


def test_factors_of_real_sizes():
    assert had.hadamard_factors(576) == (36, 16)
    assert had.hadamard_factors(1536) == (12, 128)
    assert had.hadamard_factors(64) == (1, 64)
    assert had.hadamard_factors(14336) == (28, 512)


@pytest.mark.parametrize("n", [156, 172, 11008, 13696])
def test_sizes_without_construction_are_reported_not_crashed(n):
    assert not had.has_hadamard(n)
    with pytest.raises(ShapeError, match=str(n)):
        had.hadamard_matrix(n)


def test_block_diagonal_fallback():
    n = 13696  # 107 · 128: no Hadamard of its own
    b = had.largest_hadamard_block(n)
    assert b == 128
    x = torch.randn(2, n, dtype=torch.float64)
    y = had.hadamard_transform(x, b)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    blocks = x.view(2, n // b, b) @ had.hadamard_matrix(b)
    assert torch.allclose(y, blocks.reshape(2, n), atol=1e-9)


def test_random_rotations_are_orthogonal_and_seeded():
    for q in (had.random_hadamard_matrix(576, 3), had.random_orthogonal_matrix(100, 3)):
        assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-10)
    assert torch.equal(had.random_hadamard_matrix(64, 1), had.random_hadamard_matrix(64, 1))
    assert not torch.equal(had.random_hadamard_matrix(64, 1), had.random_hadamard_matrix(64, 2))


def test_hadamard_op_traces_under_export():
    import qcompile.kernels.ops  # noqa: F401

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.qcompile.hadamard(x, 0) * 2

    x = torch.randn(4, 576)
    ep = torch.export.export(M(), (x,))
    assert torch.allclose(ep.module()(x), 2 * (x @ had.hadamard_matrix(576).float()), atol=1e-5)
