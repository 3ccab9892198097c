"""qcompile's custom ops, declared in one place (namespace ``qcompile``).

Each op has a CPU reference in plain torch (the ground truth), a fake implementation so that
``torch.export`` and ``torch.compile`` trace it, and, on CUDA, a Triton kernel imported lazily.
"""

from __future__ import annotations

import torch

from qcompile.quant.hadamard import hadamard_transform

_LIB = "qcompile"


@torch.library.custom_op(f"{_LIB}::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, block: int = 0) -> torch.Tensor:
    """x @ H over the last dim: H_n (orthogonal, 1/√n) or, with ``block`` > 0, diag(H_block, …)."""
    return hadamard_transform(x, block or None)


@hadamard.register_fake
def _(x: torch.Tensor, block: int = 0) -> torch.Tensor:
    return torch.empty_like(x)
