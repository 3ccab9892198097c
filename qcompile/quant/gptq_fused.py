"""GPTQ's column loop over one block as a single Triton kernel (CUDA; Triton's interpreter on the CPU).

``gptq.block_columns`` runs the ``B`` columns of a block one after another, a few small kernels each, so its
time is set by the columns and not by the rows (a rank given half the rows takes as long). The loop is
independent per row, so here each program holds a tile of ``BM`` rows × the block's columns in registers and
runs all ``B`` columns on it: for column ``i``,

    c = clamp(round(w_i / s_i) + z_i, 0, qmax),  q = (c − z_i)·s_i,  e = (w_i − q) / U_ii,
    W[:, j] −= e · U_ij  for every j (U is upper triangular: U_ij = 0 for j < i leaves those columns as they are),

the same operations in the same order as ``block_columns`` with an ``AffineGrid`` (division rounded to nearest,
round half to even, ``W − e·U`` with the product rounded first, as ``addr_`` rounds it on the CPU and on CUDA),
so the codes, values and errors are those of the torch loop bit for bit (tested on the CPU through Triton's
interpreter; on an H200, the 70B shape's four stacked stages equal the CUDA-graph loop's bit for bit).
``fma=True`` lets the compiler fuse ``W − e·U`` into one rounding instead (not the reference's; 0.02 % of the
codes differed on the H200, through near-ties).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.errors import ShapeError

__all__ = ["fused_block_columns"]


@triton.jit
def _rint(v):
    """Round half to even (as ``torch.round``): (v + 1.5·2^23) − 1.5·2^23, exact for |v| ≤ 2^22 (larger values
    are clamped to the code range afterwards either way)."""
    v = tl.minimum(tl.maximum(v, -4194304.0), 4194304.0)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, s_ptr, z_ptr, c_ptr, q_ptr, e_ptr, N, B,
                       stride_w, stride_u, stride_s, stride_z, stride_o,
                       QMAX: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BP)
    rmask = rows < N
    cmask = cols < B
    tile = rmask[:, None] & cmask[None, :]
    W = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=tile, other=0.0)
    C = tl.zeros([BM, BP], dtype=tl.float32)
    Q = tl.zeros([BM, BP], dtype=tl.float32)
    E = tl.zeros([BM, BP], dtype=tl.float32)
    for i in range(B):
        sel = cols[None, :] == i
        w = tl.sum(tl.where(sel, W, 0.0), axis=1)  # column i: one term and zeros, exact
        s = tl.load(s_ptr + rows * stride_s + i, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows * stride_z + i, mask=rmask, other=0.0)
        c = tl.minimum(tl.maximum(_rint(tl.math.div_rn(w, s)) + z, 0.0), QMAX)
        q = (c - z) * s
        d = tl.load(u_ptr + i * stride_u + i)
        e = tl.math.div_rn(w - q, d)
        u = tl.load(u_ptr + i * stride_u + cols, mask=cmask, other=0.0)
        W = W - e[:, None] * u[None, :]
        C = tl.where(sel, c[:, None], C)
        Q = tl.where(sel, q[:, None], Q)
        E = tl.where(sel, e[:, None], E)
    out = rows[:, None] * stride_o + cols[None, :]
    tl.store(c_ptr + out, C.to(tl.uint8), mask=tile)
    tl.store(q_ptr + out, Q, mask=tile)
    tl.store(e_ptr + out, E, mask=tile)


def fused_block_columns(W1: Tensor, U1: Tensor, params: tuple[Tensor, Tensor], qmax: int, *, fma: bool = False,
                        rows: int = 16, num_warps: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """``block_columns`` of an ``AffineGrid`` block in one launch: codes ``[N, B]`` (uint8), values and scaled
    errors ``[N, B]`` (float32) of ``W1 [N, B]`` against ``U1 [B, B]`` (upper triangular) and per-column params
    ``(s, z)`` ``[N, B]``. ``W1`` is left as it is. ``rows`` rows per program; ``fma`` as in the module text."""
    N, B = W1.shape
    s, z = (p.float() for p in params)
    if U1.shape != (B, B) or s.shape != (N, B) or z.shape != (N, B):
        raise ShapeError(f"fused_block_columns: W1 {tuple(W1.shape)}, U1 {tuple(U1.shape)}, params "
                         f"{tuple(s.shape)}/{tuple(z.shape)} do not fit one block")
    W1 = W1.float().contiguous()
    U1, s, z = U1.float().contiguous(), s.contiguous(), z.contiguous()
    codes = torch.empty(N, B, dtype=torch.uint8, device=W1.device)
    Q1, E1 = torch.empty(N, B, dtype=torch.float32, device=W1.device), torch.empty(N, B, dtype=torch.float32,
                                                                                  device=W1.device)
    if N == 0 or B == 0:
        return codes, Q1, E1
    grid = (triton.cdiv(N, rows),)
    _gptq_block_kernel[grid](W1, U1, s, z, codes, Q1, E1, N, B, W1.stride(0), U1.stride(0), s.stride(0),
                             z.stride(0), B, QMAX=qmax, BM=rows, BP=triton.next_power_of_2(B),
                             num_warps=num_warps, enable_fp_fusion=fma)
    return codes, Q1, E1
