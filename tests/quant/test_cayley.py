"""Cayley SGD: every step stays orthogonal to rounding, and the loss falls on a toy Procrustes problem."""

import torch

from qcompile.quant.cayley import CayleySGD, cayley_step, skew_direction
from qcompile.quant.hadamard import random_orthogonal_matrix


def test_direction_is_skew_and_a_descent_direction():
    r = random_orthogonal_matrix(8, 0)
    g = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = skew_direction(r, g)
    assert torch.allclose(a, -a.T)
    assert (g * (a @ r)).sum() > 0  # moving by −A·R decreases L to first order


def test_steps_stay_orthogonal():
    r = random_orthogonal_matrix(16, 0)
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        r = cayley_step(r, torch.randn(16, 16, dtype=torch.float64, generator=g), lr=1.5)
    assert torch.linalg.matrix_norm(r.T @ r - torch.eye(16, dtype=torch.float64)) < 1e-12


def test_optimizer_lowers_a_procrustes_loss_with_a_cosine_schedule():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 12, dtype=torch.float64, generator=g)
    target = random_orthogonal_matrix(12, 7)
    y = x @ target
    r = torch.nn.Parameter(random_orthogonal_matrix(12, 0))
    opt = CayleySGD([r], lr=1.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (x @ r - y).square().mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
        sched.step()
    assert losses[-1] < 0.05 * losses[0]
    eye = torch.eye(12, dtype=torch.float64)
    assert torch.linalg.matrix_norm(r.detach().T @ r.detach() - eye) < 1e-10


def test_fixed_point_variant_is_nearly_orthogonal():
    r = random_orthogonal_matrix(8, 0)
    g = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r2 = cayley_step(r, 0.01 * g, lr=0.1, exact=False, iterations=2)
    assert torch.linalg.matrix_norm(r2.T @ r2 - torch.eye(8, dtype=torch.float64)) < 1e-4
