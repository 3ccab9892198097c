"""W4A16 Triton kernels: canonical int4 weights × 16-bit (or float32) activations.

Layout read, unchanged (``qcompile.quant.formats``): ``packed uint8 [N, ceil(K/2)]`` with codes
``k = 2j`` in the low and ``k = 2j+1`` in the high nibble of byte j; ``scales [N, G]``; ``zeros``
uint8 ``[N, G]`` or None (z = 8); ``G = ceil(K/g)``, the last group possibly partial.

Algebra. ``y[m, n] = Σ_k x[m, k]·(q[n, k] − z[n, k//g])·s[n, k//g]``. Two rewrites make the
memory-bound (decode) kernels cheap:

* **even/odd split** — the low nibbles of a byte row multiply ``x[:, 0::2]``, the high nibbles
  ``x[:, 1::2]``: the packed bytes are used as loaded, with no interleaving shuffle; only the tiny,
  cache-resident activation is read with stride 2;
* **scale after the sum** — inside one group ``Σ_k x·(q − z)·s = s·(Σ_k q·x − z·Σ_k x)``: codes
  enter the products as exact small integers and scale/zero cost one multiply-add per (row, group)
  instead of per weight element. A tile of K is therefore chosen to lie inside one group
  (``chunk | g``), or the weight is per-channel (G = 1).

Kernels:

* ``_gemv_kernel`` (M = 1): a tile ``[BLOCK_N, NGB chunks, GH bytes]`` per step, reduced on CUDA
  cores; wide row-contiguous byte loads; optional split-K (float32 atomics).
* ``_skinny_kernel`` (M ≤ 16): the same even/odd algebra on tensor cores with A and B swapped,
  ``acc[BLOCK_N, 16] += dot(codes[BLOCK_N, H], x_halfᵀ[H, 16])``, so the weight tile is the wide
  operand and the few tokens the narrow one.
* ``_gemm_kernel`` (prefill): the classic tiled GEMM; the weight tile is dequantized in registers
  (``(q − z)·s`` per element, interleaved back to K order) before ``dot``.
* ``_dequant_kernel``: the dense weight, for the dequantize-then-cuBLAS strategy at large M.

Non-aligned groups (``g`` not a multiple of the tile) use a per-element gather of scale and zero
(``GATHER``): correct for any ``g``, slower, never the tuned default for power-of-two groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.kernels.autotune import Candidate, choose


@triton.jit
def _offset_codes(n, dt: tl.constexpr):
    """Codes ``n`` (uint8, < 16) as ``OFFSET + n`` in ``dt``, exactly, by writing n into the low
    mantissa bits of OFFSET (bfloat16: 128 = 0x4300, float16: 1024 = 0x6400, float32: 2^23 =
    0x4B000000): one bitwise op instead of a quarter-rate integer→float conversion."""
    if dt == tl.bfloat16:
        return (n.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
    elif dt == tl.float16:
        return (n.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return (n.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)


_PAIRS_ASM = """
{
.reg .b32 t0, t1, u0, u1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $1, t1, 0x000F000F, MAGIC, 0xEA;
shr.b32 u0, t0, 4;
shr.b32 u1, t1, 4;
lop3.b32 $2, u0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $3, u1, 0x000F000F, MAGIC, 0xEA;
}
"""
_PAIRS_BF16 = tl.constexpr(_PAIRS_ASM.replace("MAGIC", "0x43004300"))  # 128 + q, two bf16 per register
_PAIRS_F16 = tl.constexpr(_PAIRS_ASM.replace("MAGIC", "0x64006400"))  # 1024 + q, two fp16 per register


@triton.jit
def _offset_codes_asm(w, dt: tl.constexpr):
    """``(_offset_codes(w & 15, dt), _offset_codes(w >> 4, dt))`` for 16-bit dt, four packed bytes
    at a time (PTX, CUDA only): ``prmt`` spreads bytes b0, b1 into the two 16-bit halves of a word and
    one ``lop3`` masks a nibble into each half and ORs in OFFSET's exponent — two codes per
    instruction, where the generic path spends about four instructions per code."""
    if dt == tl.bfloat16:
        return tl.inline_asm_elementwise(_PAIRS_BF16, "=r,=r,=r,=r,r", [w],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(_PAIRS_F16, "=r,=r,=r,=r,r", [w],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _gemv_load(wp, step, rel, n_mask, KH, STEP_BYTES: tl.constexpr, EVEN_K: tl.constexpr):
    """The ``[BLOCK_N, NGB, GH]`` byte tile of one K step. With EVEN_K nothing is masked along K, so
    the mask is constant along rows and the loads stay 16 bytes wide (a per-byte K mask would make
    Triton fall back to 1-byte loads and a shuffle reduction over every byte)."""
    j = step * STEP_BYTES + rel
    if EVEN_K:
        return tl.load(wp + j[None, :, :], mask=n_mask[:, None, None], other=0)
    return tl.load(wp + j[None, :, :], mask=n_mask[:, None, None] & (j < KH)[None, :, :], other=0)


@triton.jit
def _gemv_step(acc, w, step, x_ptr, s_ptr, z_ptr, offs_n, n_mask, chunk, K, G, group_size, stride_sn,
               HAS_ZEROS: tl.constexpr, NGB: tl.constexpr, GH: tl.constexpr, EVEN_K: tl.constexpr):
    BK: tl.constexpr = 2 * NGB * GH
    # x[2j] and x[2j+1] as two stride-2 loads (tiny, cache-resident): a contiguous load split in
    # registers would hand its lane layout to the weight tile and cost it its 16-byte loads
    jj = step * (NGB * GH) + chunk[:, None] * GH + tl.arange(0, GH)[None, :]  # [NGB, GH] byte columns
    if EVEN_K:
        xe = tl.load(x_ptr + 2 * jj).to(tl.float32)
        xo = tl.load(x_ptr + 2 * jj + 1).to(tl.float32)
    else:
        xe = tl.load(x_ptr + 2 * jj, mask=2 * jj < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + 2 * jj + 1, mask=2 * jj + 1 < K, other=0.0).to(tl.float32)
    lo = _offset_codes(w & 15, tl.float32) - 8388608.0
    hi = _offset_codes(w >> 4, tl.float32) - 8388608.0
    part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BLOCK_N, NGB]
    xsum = tl.sum(xe + xo, axis=1)  # [NGB]
    grp = (step * BK + chunk * (2 * GH)) // group_size
    gmask = n_mask[:, None] & (grp < G)[None, :]
    goffs = offs_n[:, None] * stride_sn + grp[None, :]
    s = tl.load(s_ptr + goffs, mask=gmask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + goffs, mask=gmask, other=0).to(tl.float32)
    else:
        z = 8.0
    return acc + tl.sum((part - z * xsum[None, :]) * s, axis=1)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    N, K, KH, G, group_size, stride_wn, stride_sn,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    NGB: tl.constexpr, GH: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr, EVEN_K: tl.constexpr,
):
    BK: tl.constexpr = 2 * NGB * GH  # columns of K per step: NGB chunks of 2·GH, each inside one group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    chunk = tl.arange(0, NGB)
    rel = chunk[:, None] * GH + tl.arange(0, GH)[None, :]  # [NGB, GH] byte offsets inside a step
    wp = w_ptr + offs_n[:, None, None] * stride_wn
    steps = tl.cdiv(K, BK)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PREFETCH:  # the next step's bytes are requested before this step's arithmetic: 2x bytes in flight
        if first < last:
            w = _gemv_load(wp, first, rel, n_mask, KH, NGB * GH, EVEN_K)
            for step in range(first, last - 1):
                w_next = _gemv_load(wp, step + 1, rel, n_mask, KH, NGB * GH, EVEN_K)
                acc = _gemv_step(acc, w, step, x_ptr, s_ptr, z_ptr, offs_n, n_mask, chunk, K, G, group_size,
                                 stride_sn, HAS_ZEROS, NGB, GH, EVEN_K)
                w = w_next
            acc = _gemv_step(acc, w, last - 1, x_ptr, s_ptr, z_ptr, offs_n, n_mask, chunk, K, G, group_size,
                             stride_sn, HAS_ZEROS, NGB, GH, EVEN_K)
    else:
        for step in range(first, last):
            w = _gemv_load(wp, step, rel, n_mask, KH, NGB * GH, EVEN_K)
            acc = _gemv_step(acc, w, step, x_ptr, s_ptr, z_ptr, offs_n, n_mask, chunk, K, G, group_size,
                             stride_sn, HAS_ZEROS, NGB, GH, EVEN_K)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, acc, mask=n_mask)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, KH, G, group_size, stride_xm, stride_wn, stride_sn, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, H: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, OFFSET: tl.constexpr, ASM: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    byte = tl.arange(0, H)
    steps = tl.cdiv(K, 2 * H)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for step in range(first, last):
        j = step * H + byte
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + j[None, :], mask=n_mask[:, None] & (j < KH)[None, :], other=0
        )
        ke = 2 * j
        kk = step * 2 * H + tl.arange(0, 2 * H)
        xx = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :],
                     other=0.0)
        xe, xo = tl.split(tl.reshape(xx, (BLOCK_M, H, 2)))
        xe = tl.trans(xe)  # [H, BLOCK_M]
        xo = tl.trans(xo)
        if GATHER:
            sm = n_mask[:, None] & (ke < K)[None, :]
            ge = offs_n[:, None] * stride_sn + ke[None, :] // group_size
            go = offs_n[:, None] * stride_sn + (ke[None, :] + 1) // group_size
            se = tl.load(s_ptr + ge, mask=sm, other=0.0).to(tl.float32)
            so = tl.load(s_ptr + go, mask=sm & (ke + 1 < K)[None, :], other=0.0).to(tl.float32)
            if HAS_ZEROS:
                ze = tl.load(z_ptr + ge, mask=sm, other=0).to(tl.float32)
                zo = tl.load(z_ptr + go, mask=sm & (ke + 1 < K)[None, :], other=0).to(tl.float32)
            else:
                ze = 8.0
                zo = 8.0
            we = ((_offset_codes(w & 15, tl.float32) - (ze + 8388608.0)) * se).to(dt)
            wo = ((_offset_codes(w >> 4, tl.float32) - (zo + 8388608.0)) * so).to(dt)
            acc += tl.dot(we, xe, input_precision=DOT_PRECISION)
            acc += tl.dot(wo, xo, input_precision=DOT_PRECISION)
        else:
            # codes enter the dot as OFFSET + q (exact, see _offset_codes); OFFSET·Σx comes off with z
            if OFFSET == 0:
                ce = (w & 15).to(dt)
                co = (w >> 4).to(dt)
            elif ASM:
                ce, co = _offset_codes_asm(w, dt)
            else:
                ce = _offset_codes(w & 15, dt)
                co = _offset_codes(w >> 4, dt)
            part = tl.dot(ce, xe, input_precision=DOT_PRECISION)
            part += tl.dot(co, xo, input_precision=DOT_PRECISION)
            xsum = tl.sum(xe.to(tl.float32), axis=0) + tl.sum(xo.to(tl.float32), axis=0)  # [BLOCK_M]
            grp = (step * 2 * H) // group_size
            s = tl.load(s_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0).to(tl.float32) + OFFSET
            else:
                z = tl.full([BLOCK_N], 8.0 + OFFSET, tl.float32)
            acc += (part - z[:, None] * xsum[None, :]) * s[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    yp = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    ym = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(yp, acc, mask=ym)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, KH, G, group_size, stride_xm, stride_wn, stride_sn, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    H: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-blocks share each weight column-block while it is in L2
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    byte = tl.arange(0, H)
    offs_k = tl.arange(0, BLOCK_K)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k = step * BLOCK_K + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                    other=0.0)
        j = step * H + byte
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + j[None, :], mask=n_mask[:, None] & (j < KH)[None, :], other=0
        )
        q = tl.reshape(tl.join(w & 15, w >> 4), (BLOCK_N, BLOCK_K))  # back to K order
        q = _offset_codes(q, tl.float32) - 8388608.0
        if GATHER:
            gofs = offs_n[:, None] * stride_sn + k[None, :] // group_size
            gm = n_mask[:, None] & (k < K)[None, :]
            s = tl.load(s_ptr + gofs, mask=gm, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + gofs, mask=gm, other=0).to(tl.float32)
            else:
                z = 8.0
            wq = ((q - z) * s).to(dt)
        else:
            grp = (step * BLOCK_K) // group_size
            s = tl.load(s_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], 8.0, tl.float32)
            wq = ((q - z[:, None]) * s[:, None]).to(dt)
        acc = tl.dot(a, tl.trans(wq), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, KH, group_size, stride_wn, stride_sn, stride_on,
    HAS_ZEROS: tl.constexpr, GATHER: tl.constexpr, BLOCK_N: tl.constexpr, H: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * H + tl.arange(0, H)
    n_mask = offs_n < N
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + j[None, :], mask=n_mask[:, None] & (j < KH)[None, :], other=0)
    q = _offset_codes(tl.reshape(tl.join(w & 15, w >> 4), (BLOCK_N, 2 * H)), tl.float32)  # 2^23 + q
    k = tl.program_id(1) * 2 * H + tl.arange(0, 2 * H)
    km = n_mask[:, None] & (k < K)[None, :]
    if GATHER:
        gofs = offs_n[:, None] * stride_sn + k[None, :] // group_size
        s = tl.load(s_ptr + gofs, mask=km, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + gofs, mask=km, other=0).to(tl.float32)
        else:
            z = 8.0
        wq = (q - (z + 8388608.0)) * s
    else:  # the tile lies inside one group: one scale and zero per row
        grp = (tl.program_id(1) * 2 * H) // group_size
        s = tl.load(s_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0).to(tl.float32)
        else:
            z = tl.full([BLOCK_N], 8.0, tl.float32)
        wq = (q - (z[:, None] + 8388608.0)) * s[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + k[None, :], wq.to(out_ptr.dtype.element_ty), mask=km)


# ------------------------------------------------------------------------------------------------
# Host side: candidates and launches


def _pow2_divisor(g: int) -> int:
    return g & -g


def _chunk(group_size: int, n_groups: int, cap: int) -> int:
    """Largest power-of-two tile of K (≤ cap) that never straddles a group boundary."""
    return cap if n_groups == 1 else min(cap, _pow2_divisor(group_size))


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def candidates(M: int, N: int, K: int, group_size: int, asm: bool = False) -> list[Candidate]:
    """Variants worth timing for this shape; the first is the untuned default. ``asm`` adds the
    inline-PTX unpacking variants (CUDA, 16-bit activations only)."""
    G = -(-K // group_size)
    out: list[Candidate] = []
    if M == 1:
        for bn, bk, split, warps, pf in ((16, 1024, 1, 4, 1), (16, 1024, 1, 4, 0), (32, 512, 1, 4, 1),
                                         (32, 512, 1, 4, 0), (8, 1024, 1, 2, 1), (8, 1024, 1, 2, 0),
                                         (16, 512, 1, 4, 1), (64, 256, 1, 4, 0), (16, 512, 2, 4, 0),
                                         (16, 1024, 4, 4, 1), (16, 1024, 4, 4, 0), (32, 256, 2, 4, 1),
                                         (8, 2048, 1, 2, 1), (16, 2048, 1, 4, 0)):
            c = _chunk(group_size, G, bk)
            if c < 2:
                continue
            out.append(Candidate(f"gemv_n{bn}_k{bk}_s{split}_w{warps}{'_pf' if pf else ''}",
                                 dict(kind="gemv", BLOCK_N=bn, NGB=bk // c, GH=c // 2, SPLIT_K=split,
                                      PREFETCH=bool(pf), num_warps=warps)))
    if M <= 16:
        c = _chunk(group_size, G, 128)
        gather = c < 32
        shapes = [(64, 64, 1, 4, 4, False), (128, 64, 1, 4, 4, False), (32, 64, 1, 4, 4, False),
                  (64, 64, 2, 4, 4, False), (128, 64, 2, 8, 3, False), (64, 32, 1, 4, 5, False)]
        if asm and not gather:
            shapes += [(64, 64, 2, 4, 4, True), (64, 64, 1, 4, 4, True), (128, 64, 2, 4, 4, True),
                       (128, 64, 1, 8, 4, True), (64, 64, 4, 4, 4, True), (32, 64, 2, 4, 4, True)]
        for bn, h, split, warps, stages, use_asm in shapes:
            h = 32 if gather else min(h, c // 2)
            out.append(Candidate(f"skinny_n{bn}_h{h}_s{split}_w{warps}_st{stages}{'_gather' if gather else ''}"
                                 f"{'_asm' if use_asm else ''}",
                                 dict(kind="skinny", BLOCK_N=bn, H=h, SPLIT_K=split, GATHER=gather, ASM=use_asm,
                                      num_warps=warps, num_stages=stages)))
        return out
    for bm, bn, bk, warps, stages in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                      (128, 128, 128, 8, 3), (64, 64, 64, 4, 4)):
        gather = G > 1 and group_size % bk != 0
        out.append(Candidate(f"gemm_m{bm}_n{bn}_k{bk}_w{warps}_st{stages}{'_gather' if gather else ''}",
                             dict(kind="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, GATHER=gather,
                                  num_warps=warps, num_stages=stages)))
    out.append(Candidate("dequant_cublas", dict(kind="dequant_cublas")))
    return out


def dequantize(packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, K: int,
               dtype: torch.dtype) -> Tensor:
    """Dense ``W [N, K]`` in ``dtype`` (``(q − z)·s``, computed in float32)."""
    N = packed.shape[0]
    out = torch.empty((N, K), dtype=dtype, device=packed.device)
    chunk = _chunk(group_size, scales.shape[1], 256)
    gather = chunk < 32
    bn, h = 32, (64 if gather else chunk // 2)
    grid = (triton.cdiv(N, bn), triton.cdiv(packed.shape[1], h))
    _dequant_kernel[grid](
        packed, scales, zeros if zeros is not None else scales, out, N, K, packed.shape[1], group_size,
        packed.stride(0), scales.stride(0), out.stride(0), HAS_ZEROS=zeros is not None, GATHER=gather,
        BLOCK_N=bn, H=h, num_warps=4,
    )
    return out


def run(cand: Candidate, x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None,
        group_size: int, bias: Tensor | None) -> Tensor:
    """``x [M, K] @ Wᵀ (+ bias)`` with one candidate; x must have unit stride along K."""
    meta = dict(cand.meta)
    kind = meta.pop("kind")
    M, K = x.shape
    N, KH = packed.shape
    G = scales.shape[1]
    if kind == "dequant_cublas":
        w = dequantize(packed, scales, zeros, group_size, K, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    zp = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    bp = bias if bias is not None else scales
    common = dict(HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
    split = meta.get("SPLIT_K", 1)
    y = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split > 1 else torch.empty(
        (M, N), dtype=x.dtype, device=x.device)
    if kind == "gemv":
        grid = (triton.cdiv(N, meta["BLOCK_N"]), split)
        even = K % (2 * meta["NGB"] * meta["GH"]) == 0
        _gemv_kernel[grid](x, packed, scales, zp, bp, y, N, K, KH, G, group_size, packed.stride(0),
                           scales.stride(0), **common, EVEN_K=even, **meta)
    elif kind == "skinny":
        grid = (triton.cdiv(N, meta["BLOCK_N"]), split)
        offset = {torch.bfloat16: 128.0, torch.float16: 1024.0}.get(x.dtype, 0.0)
        _skinny_kernel[grid](x, packed, scales, zp, bp, y, M, N, K, KH, G, group_size, x.stride(0),
                             packed.stride(0), scales.stride(0), y.stride(0), **common, BLOCK_M=16,
                             DOT_PRECISION=_precision(x), OFFSET=offset, **meta)
    else:
        grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _gemm_kernel[grid](x, packed, scales, zp, bp, y, M, N, K, KH, G, group_size, x.stride(0),
                           packed.stride(0), scales.stride(0), y.stride(0), **common,
                           DOT_PRECISION=_precision(x), **meta)
    return y.to(x.dtype) if split > 1 else y


def _bucket(M: int) -> int:
    return M if M <= 16 else min(1 << (M - 1).bit_length(), 8192)


def linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
           bias: Tensor | None) -> Tensor:
    """The tuned W4A16 linear for ``x [M, K]``."""
    M, K = x.shape
    N = packed.shape[0]
    key = (_bucket(M), N, K, group_size, zeros is not None, bias is not None, x.dtype)
    family = "w4a16_decode" if M <= 16 else "w4a16_prefill"
    asm = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    cand = choose(family, key, lambda: candidates(M, N, K, group_size, asm),
                  lambda c: run(c, x, packed, scales, zeros, group_size, bias), x.device)
    return run(cand, x, packed, scales, zeros, group_size, bias)
