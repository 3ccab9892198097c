"""Hadamard rotation and per-token quantization in one Triton kernel (either part optional).

Algebra. A Hadamard unit of size ``u = m·p`` (``p = 2^k``) is ``H_u = H_m ⊗ H_p`` (the convention of
``qcompile.quant.hadamard``), and for ``p > 128`` Sylvester's ``H_p = H_p1 ⊗ H_p2``. Viewing one unit
of a row as a tensor ``X[a, b1, b2]`` (a < m, b1 < p1, b2 < p2), ``x @ (A ⊗ B ⊗ C)`` contracts each
axis with its own factor: ``Y[c, d1, d2] = Σ X[a, b1, b2]·A[a, c]·B[b1, d1]·C[b2, d2]``. The kernel
does each contraction as one ``tl.dot`` of the tile (that axis moved last, the others flattened into
rows) with the small ±1 matrix, so a 4096-wide row costs two 64×64 products instead of twelve
butterfly passes through shared memory; m is zero-padded to a power of two ≥ 16 (the padded
rows/columns of ``H_m`` are 0, so padding never leaks into real outputs). Sizes without a 2^k ≥ 16
part (n ≤ 256) use the dense ``H_u`` as a single factor.

Precision. The ±1 factors are exact in bfloat16; a float32 operand ``t`` is split as
``t = hi + lo (+ lo2)`` with each part in bfloat16, and the dots of the parts accumulate in float32.
Two parts leave ~2^-17 relative error per stage (three, ~2^-25, for float32 outputs), far below any
int8 step, so the codes agree with the float32 reference except at exact rounding ties.

Quantization (``formats``' rules exactly: ``scale = clip·max|x| / (2^(b−1)−1)`` symmetric; asymmetric
``full = (hi − lo)/(2^b − 1)``, ``zero = round(−lo/full)``, ``scale = clip·full``; codes
``clamp(round(x/scale) + zero, 0, 2^b − 1)``, stored shifted by ``−2^(b−1)`` in int8; round half to
even; IEEE divisions) needs the whole row's range before any code is written. A row of one unit is
kept in registers: one read, one write. A row of several units (block-diagonal Hadamard, or plain
quantization of a long row in chunks) is streamed twice: a first pass takes the range, the second
recomputes each unit (a re-read that mostly hits L2) and writes codes.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.kernels.autotune import Candidate, choose, chosen
from qcompile.kernels.hadamard_plan import MAX_TILE, UnitPlan, next_pow2, plan_unit, pm1_matrix
from qcompile.kernels.triton.launch import launch



@triton.jit
def _mm_pm1(t, h, SPLITS: tl.constexpr):
    """``t [R, C] float32 @ h [C, C]`` (±1 in bfloat16), t split into bfloat16 parts."""
    hi = t.to(tl.bfloat16)
    acc = tl.dot(hi, h)
    if SPLITS >= 2:
        r = t - hi.to(tl.float32)
        lo = r.to(tl.bfloat16)
        acc = tl.dot(lo, h, acc)
        if SPLITS >= 3:
            acc = tl.dot((r - lo.to(tl.float32)).to(tl.bfloat16), h, acc)
    return acc


@triton.jit
def _transform(t, hm, h1, h2, ROWS: tl.constexpr, MP: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
               SPLITS: tl.constexpr, FIRST_SPLITS: tl.constexpr):
    """``t [ROWS, MP, P1·P2]`` → t ×₂ H_P2 ×₁ H_P1 ×₀ H_M (each factor skipped when its size is 1).
    The first contraction reads the input itself, exact in FIRST_SPLITS parts (1 for bfloat16)."""
    P: tl.constexpr = P1 * P2
    if P2 > 1:
        t = tl.reshape(_mm_pm1(tl.reshape(t, (ROWS * MP * P1, P2)), h2, FIRST_SPLITS), (ROWS, MP, P))
    if P1 > 1:
        u = tl.permute(tl.reshape(t, (ROWS * MP, P1, P2)), (0, 2, 1))
        u = _mm_pm1(tl.reshape(u, (ROWS * MP * P2, P1)), h1, SPLITS)
        t = tl.reshape(tl.permute(tl.reshape(u, (ROWS * MP, P2, P1)), (0, 2, 1)), (ROWS, MP, P))
    if MP > 1:
        u = tl.reshape(tl.permute(t, (0, 2, 1)), (ROWS * P, MP))
        if P2 > 1:
            u = _mm_pm1(u, hm, SPLITS)
        else:
            u = _mm_pm1(u, hm, FIRST_SPLITS)
        t = tl.permute(tl.reshape(u, (ROWS, P, MP)), (0, 2, 1))
    return t


@triton.jit
def _load_unit(x_ptr, row, rmask, u, local, lmask, N, U, stride_x, hm, h1, h2, norm,
               ROWS: tl.constexpr, MP: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
               SPLITS: tl.constexpr, FIRST_SPLITS: tl.constexpr, TRANSFORM: tl.constexpr):
    offs = u * U + local
    mask = rmask & lmask & (offs < N)
    t = tl.load(x_ptr + row[:, None, None] * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if TRANSFORM:
        t = _transform(t, hm, h1, h2, ROWS, MP, P1, P2, SPLITS, FIRST_SPLITS) * norm
    return t, offs, mask


@triton.jit
def _rint(v):
    """Round half to even (as ``torch.round``): (v + 1.5·2^23) − 1.5·2^23 for |v| ≤ 2^22."""
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _codes(t, scale, zero, QMAX: tl.constexpr, SHIFT: tl.constexpr):
    q = _rint(tl.math.div_rn(t, scale[:, None, None])) + zero[:, None, None]
    q = tl.minimum(tl.maximum(q, 0.0), QMAX)
    return (q - SHIFT).to(tl.int32).to(tl.int8)


@triton.jit
def _rotate_quant_kernel(
    x_ptr, y_ptr, s_ptr, z_ptr, hm_ptr, h1_ptr, h2_ptr,
    R, N, stride_x, stride_y, m_real, U, NU, norm, clip,
    ROWS: tl.constexpr, MP: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, SPLITS: tl.constexpr,
    FIRST_SPLITS: tl.constexpr, TRANSFORM: tl.constexpr, QUANT: tl.constexpr, SYMMETRIC: tl.constexpr,
    BITS: tl.constexpr,
    SINGLE: tl.constexpr,
):
    P: tl.constexpr = P1 * P2
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = (row < R)[:, None, None]
    a = tl.arange(0, MP)
    local = a[None, :, None] * P + tl.arange(0, P)[None, None, :]
    lmask = (a < m_real)[None, :, None]
    hm = 0.0
    h1 = 0.0
    h2 = 0.0
    if TRANSFORM:
        if MP > 1:
            hm = tl.load(hm_ptr + a[:, None] * MP + a[None, :])
        if P1 > 1:
            i1 = tl.arange(0, P1)
            h1 = tl.load(h1_ptr + i1[:, None] * P1 + i1[None, :])
        if P2 > 1:
            i2 = tl.arange(0, P2)
            h2 = tl.load(h2_ptr + i2[:, None] * P2 + i2[None, :])
    if not QUANT:
        for u in range(NU):
            t, offs, mask = _load_unit(x_ptr, row, rmask, u, local, lmask, N, U, stride_x, hm, h1, h2, norm,
                                       ROWS, MP, P1, P2, SPLITS, FIRST_SPLITS, TRANSFORM)
            tl.store(y_ptr + row[:, None, None] * stride_y + offs, t.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        SHIFT: tl.constexpr = 1 << (BITS - 1)
        if SINGLE:
            t, offs, mask = _load_unit(x_ptr, row, rmask, 0, local, lmask, N, U, stride_x, hm, h1, h2, norm,
                                       ROWS, MP, P1, P2, SPLITS, FIRST_SPLITS, TRANSFORM)
            hi = tl.maximum(tl.max(tl.max(t, axis=2), axis=1), 0.0)
            lo = tl.minimum(tl.min(tl.min(t, axis=2), axis=1), 0.0)
        else:
            hi = tl.zeros([ROWS], dtype=tl.float32)
            lo = tl.zeros([ROWS], dtype=tl.float32)
            for u in range(NU):
                t, offs, mask = _load_unit(x_ptr, row, rmask, u, local, lmask, N, U, stride_x, hm, h1, h2, norm,
                                           ROWS, MP, P1, P2, SPLITS, FIRST_SPLITS, TRANSFORM)
                hi = tl.maximum(hi, tl.max(tl.max(t, axis=2), axis=1))
                lo = tl.minimum(lo, tl.min(tl.min(t, axis=2), axis=1))
        if SYMMETRIC:
            scale = tl.maximum(tl.math.div_rn(tl.maximum(-lo, hi) * clip, SHIFT - 1.0), 1.1754943508222875e-38)
            zero = tl.full([ROWS], SHIFT, tl.float32)
        else:
            full = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), 1.1754943508222875e-38)
            zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, full)), 0.0), QMAX)
            scale = tl.maximum(full * clip, 1.1754943508222875e-38)
        if SINGLE:
            tl.store(y_ptr + row[:, None, None] * stride_y + offs, _codes(t, scale, zero, QMAX, SHIFT), mask=mask)
        else:
            for u in range(NU):
                t, offs, mask = _load_unit(x_ptr, row, rmask, u, local, lmask, N, U, stride_x, hm, h1, h2, norm,
                                           ROWS, MP, P1, P2, SPLITS, FIRST_SPLITS, TRANSFORM)
                tl.store(y_ptr + row[:, None, None] * stride_y + offs, _codes(t, scale, zero, QMAX, SHIFT),
                         mask=mask)
        row_mask = row < R
        tl.store(s_ptr + row, scale, mask=row_mask)
        tl.store(z_ptr + row, (zero - SHIFT).to(tl.int32).to(tl.int8), mask=row_mask)


# ------------------------------------------------------------------------------------------------
# Host side


PLAIN_CHUNK = 8192  # row elements one program quantizes per pass without a rotation (one pass ≤ 8192)


@functools.lru_cache(maxsize=64)
def _factors(up: UnitPlan, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    dummy = torch.zeros(1, dtype=torch.bfloat16, device=device)
    hm = pm1_matrix(up.m, up.MP).to(device) if up.MP > 1 else dummy
    h1 = pm1_matrix(up.P1, up.P1).to(device) if up.P1 > 1 else dummy
    h2 = pm1_matrix(up.P2, up.P2).to(device) if up.P2 > 1 else dummy
    return hm, h1, h2


def _candidates(tile: int, min_rows: int) -> list[Candidate]:
    """Rows per program (min_rows and up to 2 doublings that fit MAX_TILE) × warps."""
    rows = [min_rows * f for f in (1, 2, 4) if f == 1 or min_rows * f * tile <= MAX_TILE]
    return [Candidate(f"r{r}_w{w}", dict(ROWS=r, num_warps=w)) for r in rows for w in (4, 8)]


def _launch(cand: Candidate, x: Tensor, y: Tensor, s: Tensor, z: Tensor, up: UnitPlan | None, n: int,
            unit: int, quant: bool, bits: int, symmetric: bool, clip: float, splits: int) -> None:
    launch(*launch_args(cand, x, y, s, z, up, n, unit, quant, bits, symmetric, clip, splits))


def launch_args(cand: Candidate, x: Tensor, y: Tensor, s: Tensor, z: Tensor, up: UnitPlan | None, n: int,
                unit: int, quant: bool, bits: int, symmetric: bool, clip: float, splits: int) -> tuple:
    """``launch`` arguments of the rotate/quantize kernel for rows ``x [R, n]`` into ``y`` (and, when
    ``quant``, per-row scales ``s`` and zeros ``z``)."""
    R = x.shape[0]
    rows = cand.meta["ROWS"]
    if up is None:  # plain quantization, chunked along the row
        chunk = min(next_pow2(n), PLAIN_CHUNK)
        hm = h1 = h2 = s
        geo = dict(MP=1, P1=1, P2=chunk)
        m_real, U, NU, norm = 1, chunk, -(-n // chunk), 1.0
    else:
        hm, h1, h2 = _factors(up, x.device)
        geo = dict(MP=up.MP, P1=up.P1, P2=up.P2)
        m_real, U, NU, norm = up.m, unit, n // unit, 1.0 / math.sqrt(unit)
    return (_rotate_quant_kernel, (-(-R // rows),),
            (x, y, s, z, hm, h1, h2, R, n, x.stride(0), y.stride(0), m_real, U, NU, norm, clip),
            dict(ROWS=rows, **geo, SPLITS=splits, FIRST_SPLITS=1 if x.dtype == torch.bfloat16 else splits,
                 TRANSFORM=up is not None, QUANT=quant, SYMMETRIC=symmetric, BITS=bits, SINGLE=NU == 1),
            cand.meta["num_warps"])


def supports(unit: int) -> bool:
    """Whether the Triton kernel applies a Hadamard unit of this size (else torch does, on the GPU)."""
    return plan_unit(unit) is not None


def _bucket(R: int) -> int:
    return min(next_pow2(R), 8192)


def hadamard(x: Tensor, unit: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """``x [R, n]`` → ``x @ blockdiag(H_unit, …)`` in ``out_dtype`` (default ``x.dtype``; requires
    ``supports(unit)``). Blocks are independent, so each is its own row: a short ``x`` still fills the GPU."""
    R, n = x.shape
    x = x.reshape(R * (n // unit), unit)
    up = plan_unit(unit)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    splits = 3 if y.dtype == torch.float32 else 2
    key = (_bucket(x.shape[0]), unit, unit, x.dtype, y.dtype)
    run = lambda c: _launch(c, x, y, y, y, up, unit, unit, False, 8, True, 1.0, splits)  # noqa: E731
    run(choose("hadamard", key, lambda: _candidates(up.tile, up.min_rows), run, x.device))
    return y.reshape(R, n)


SPLIT_ROWS = 512  # below this many rows, a block-diagonal rotation runs blocks in parallel, then quantizes


def chosen_candidate(x: Tensor, bits: int, symmetric: bool, unit: int | None) -> Candidate | None:
    """The tuned kernel configuration ``quantize_per_token`` uses for rows ``x [R, n]`` (None before its
    first call)."""
    R, n = x.shape
    return chosen("rotate_quant", (_bucket(R), n, unit or 0, bits, symmetric, x.dtype), x.device)


def quantize_per_token(x: Tensor, bits: int, symmetric: bool, clip: float, unit: int | None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``x [R, n]`` → int8 codes ``[R, n]``, float32 scales ``[R]``, int8 zeros ``[R]``; rotated by
    ``blockdiag(H_unit, …)`` first when ``unit`` is given (requires ``supports(unit)``)."""
    R, n = x.shape
    if unit is not None and unit < n and R < SPLIT_ROWS:
        # few rows: the fused kernel would give each program a whole row of n/unit blocks in series;
        # rotate every block in parallel into float32, then quantize (the same numbers, two launches)
        return quantize_per_token(hadamard(x, unit, torch.float32), bits, symmetric, clip, None)
    up = None if unit is None else plan_unit(unit)
    codes = torch.empty((R, n), dtype=torch.int8, device=x.device)
    scales = torch.empty((R,), dtype=torch.float32, device=x.device)
    zeros = torch.empty((R,), dtype=torch.int8, device=x.device)
    def make() -> list[Candidate]:
        if up is None:
            return [Candidate(f"r{r}_w{w}", dict(ROWS=r, num_warps=w)) for r, w in ((1, 4), (2, 4), (4, 8), (1, 8))]
        return _candidates(up.tile, up.min_rows)

    key = (_bucket(R), n, unit or 0, bits, symmetric, x.dtype)
    run = lambda c: _launch(c, x, codes, scales, zeros, up, n, unit or n, True, bits, symmetric, clip, 2)  # noqa: E731
    device = x.device
    run(chosen("rotate_quant", key, device) or choose("rotate_quant", key, make, run, device))
    return codes, scales, zeros
