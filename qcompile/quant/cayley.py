"""Cayley SGD on the Stiefel manifold (Li, Fuxin, Todorovic 2020), as SpinQuant learns R1/R2 with it.

For an orthogonal R (n×p with RᵀR = I) and the Euclidean gradient G = ∂L/∂R, the descent direction is
the skew-symmetric
    Ŵ = G·Rᵀ − ½·R·(Rᵀ·G·Rᵀ),    A = Ŵ − Ŵᵀ        (A = −Aᵀ; ⟨G, A·R⟩ ≥ 0)
and the step moves R along the curve that stays on the manifold, the Cayley transform
    R ← (I + α/2·A)⁻¹·(I − α/2·A)·R,    α = min(lr, 1/(‖A‖ + ε))
which is orthogonal exactly (a Cayley transform of a skew matrix is orthogonal). The official optimizer
replaces the inverse by ``iterations`` fixed-point steps Y ← R − α/2·A·(R + Y) (2 by default) and
re-orthonormalizes by QR now and then; ``exact=True`` (default here) solves the linear system instead,
so RᵀR = I holds to rounding. No momentum (SpinQuant's setting). The learning rate follows whatever
scheduler drives the optimizer's ``lr`` (SpinQuant: 1.5 with cosine decay).
"""

from __future__ import annotations

import torch


def skew_direction(r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A = Ŵ − Ŵᵀ with Ŵ = G·Rᵀ − ½·R·(Rᵀ·G·Rᵀ)."""
    w = g @ r.T - 0.5 * r @ (r.T @ g @ r.T)
    return w - w.T


def cayley_step(r: torch.Tensor, g: torch.Tensor, lr: float, eps: float = 1e-8, exact: bool = True,
                iterations: int = 2) -> torch.Tensor:
    """One Cayley SGD step (descent) of orthogonal ``r`` with gradient ``g``; returns the new matrix."""
    a = skew_direction(r, g)
    alpha = min(lr, 1.0 / (float(torch.linalg.matrix_norm(a)) + eps))
    if exact:
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return torch.linalg.solve(eye + 0.5 * alpha * a, (eye - 0.5 * alpha * a) @ r)
    y = r - alpha * a @ r
    for _ in range(iterations):
        y = r - 0.5 * alpha * a @ (r + y)
    return y


class CayleySGD(torch.optim.Optimizer):
    """SGD on orthogonal matrices by Cayley steps (no momentum); ``qr_every`` > 0 re-orthonormalizes."""

    def __init__(self, params, lr: float = 1.5, eps: float = 1e-8, exact: bool = True, iterations: int = 2,
                 qr_every: int = 0):
        super().__init__(params, dict(lr=lr, eps=eps, exact=exact, iterations=iterations))
        self.qr_every, self.steps = qr_every, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.steps += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                r = p.detach().double()
                new = cayley_step(r, p.grad.double(), group["lr"], group["eps"], group["exact"], group["iterations"])
                if self.qr_every and self.steps % self.qr_every == 0:
                    q, rr = torch.linalg.qr(new)
                    new = q * torch.sign(torch.diagonal(rr))[None, :]
                p.copy_(new.to(p.dtype))
        return loss
