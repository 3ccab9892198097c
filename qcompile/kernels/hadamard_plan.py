"""How the Triton rotation kernel factors a Hadamard unit onto its register tile (no Triton import,
so a planner on a CPU machine can ask which sizes get a fused kernel).

A unit ``u = m·p`` (``H_u = H_m ⊗ H_p``, ``p = 2^k``) becomes a tile ``[MP, P1, P2]``: ``MP`` is m
zero-padded to a power of two ≥ 16 (1 when m = 1); ``P1·P2 = p`` with ``P2 = p`` for p ≤ 128, else the
balanced Sylvester split ``H_p = H_P1 ⊗ H_P2`` (both ≥ 16 so every contraction is a tensor-core dot).
Units with no 2^k ≥ 16 part and u ≤ 256 use the dense ``H_u`` as the single factor ``MP``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qcompile.quant.hadamard import hadamard_factors, hadamard_matrix

MAX_TILE = 16384  # float32 elements of one (padded) unit that one program holds in registers


@dataclass(frozen=True)
class UnitPlan:
    """The kernel's view of one Hadamard unit of size ``unit``."""

    unit: int
    m: int  # real extent of the outer axis (m of H_m ⊗ H_p, or the whole unit when dense)
    MP: int
    P1: int
    P2: int

    @property
    def tile(self) -> int:
        return self.MP * self.P1 * self.P2

    @property
    def min_rows(self) -> int:
        """Rows per program so that every dot has at least 16 rows."""
        need = 1
        if self.P2 > 1:
            need = max(need, 16 // min(16, self.MP * self.P1))
        if self.P1 > 1:
            need = max(need, 16 // min(16, self.MP * self.P2))
        if self.MP > 1:
            need = max(need, 16 // min(16, self.P1 * self.P2))
        return need


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_unit(unit: int) -> UnitPlan | None:
    """The tile of a Hadamard of size ``unit``, or None (no Hadamard, or the tile exceeds MAX_TILE)."""
    factors = hadamard_factors(unit)
    if factors is None:
        return None
    m, p = factors
    if p >= 16:
        mp = 1 if m == 1 else max(16, next_pow2(m))
        if p <= 128:
            p1, p2 = 1, p
        else:
            p1 = 1 << ((p.bit_length() - 1) // 2)
            p2 = p // p1
        plan = UnitPlan(unit, m, mp, p1, p2)
    elif unit <= 256:
        plan = UnitPlan(unit, unit, max(16, next_pow2(unit)), 1, 1)
    else:
        return None
    return plan if plan.tile <= MAX_TILE else None


def pm1_matrix(n: int, pad: int) -> Tensor:
    """The unnormalized (±1) Hadamard of order n, zero-padded to ``pad``, in bfloat16 (exact)."""
    h = torch.round(hadamard_matrix(n) * math.sqrt(n))
    out = torch.zeros(pad, pad, dtype=torch.float64)
    out[:n, :n] = h
    return out.to(torch.bfloat16)
