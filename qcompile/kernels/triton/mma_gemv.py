"""Tensor-core W4A16 GEMV for decode (M = 1, 16-bit x; CUDA only, PTX).

Why: the word GEMV (``w4a16._gemv_kernel``) spends ~30 instructions per word of eight codes (12 to
unpack, 8 FMAs, the rest on activations, scales and addresses), so at 28672×8192 it is issue-bound
near 2.6 TB/s. Here every lane feeds one ``mma.m16n8k16`` per word instead: 8 bit operations turn the
word into its A fragment (16-bit magic-number codes ``OFFSET + q``, see ``int4``), and the tensor
core does the multiply-adds, and a second mma of the same activations with the constant
``−(OFFSET + z)`` takes offset and zero off: ~16 SASS instructions per word.

Layout: ``layout.to_mma_tiles`` (derived once per weight from the canonical packing, cached by the
caller): lane ``l = 4g + t`` of a warp holds the codes of rows ``g, g + 8`` at ``k = 2t, 2t+1, 2t+8,
2t+9`` of a 16 × 16 tile, four consecutive k-tiles in one 16-byte load.

Algebra, per warp = one tile of 16 rows, per step of one or two 64-k slabs (inside one group, or
per-channel): ``C[r, n] = Σ_k (q[r, k] − z[r])·B[k, n]`` with every column of B equal to x, so each
lane's accumulators ``c0`` (row g) and ``c2`` (row g + 8) are the rows' partial dots; they take the
group's scale, ``acc += s·C``, and lanes ``t = 0`` store the two rows at the end. A lane's B
registers are pairs of its 16 consecutive activations of the slab (the layout permutes k inside a
slab to make them so). Products are exact (a small integer times a 16-bit float) and accumulate in
float32.

Every tensor here is 1-D over the program's ``32·num_warps`` threads (one element per thread, lane =
index mod 32), so the warp-wide ``mma.sync`` in an elementwise asm runs converged, in every lane.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.kernels.layout import MMA_STEP, to_mma_tiles
from qcompile.kernels.triton.launch import launch

_MMA_ASM = """
{
.reg .b32 t0, t1, u0, u1, a0, a1, a2, a3;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 a0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 a1, t1, 0x000F000F, MAGIC, 0xEA;
shr.b32 u0, t0, 4;
shr.b32 u1, t1, 4;
lop3.b32 a2, u0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 a3, u1, 0x000F000F, MAGIC, 0xEA;
mma.sync.aligned.m16n8k16.row.col.f32.DT.DT.f32 {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$7, $8}, {$9, $10, $11, $12};
mma.sync.aligned.m16n8k16.row.col.f32.DT.DT.f32 {$0, $1, $2, $3}, {$5, $6, $5, $6}, {$7, $8}, {$0, $1, $2, $3};
}
"""
# a0 = (lo b0, lo b1) = row g, slab k d = 0, 1; a1 = (lo b2, lo b3) = row g + 8; a2, a3: the same rows at
# d = 2, 3. The first mma adds Σ (OFFSET + q)·x, the second Σ −(OFFSET + z)·x ($5, $6: that constant
# for rows g and g + 8 in both halves): exact products, the codes' offset and zero gone in float32.
_MMA_BF16 = tl.constexpr(_MMA_ASM.replace("MAGIC", "0x43004300").replace("DT", "bf16"))
_MMA_F16 = tl.constexpr(_MMA_ASM.replace("MAGIC", "0x64006400").replace("DT", "f16"))


@triton.jit
def _mma(word, zg, zg8, b0, b1, c0, c1, c2, c3, dt: tl.constexpr):
    """``C += (codes(word) − z)·B`` for one 16 × 16 tile: unpack, two mmas."""
    if dt == tl.bfloat16:
        return tl.inline_asm_elementwise(_MMA_BF16, "=f,=f,=f,=f,r,r,r,r,r,f,f,f,f",
                                         [word, zg, zg8, b0, b1, c0, c1, c2, c3],
                                         dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_MMA_F16, "=f,=f,=f,=f,r,r,r,r,r,f,f,f,f",
                                     [word, zg, zg8, b0, b1, c0, c1, c2, c3],
                                     dtype=(tl.float32,) * 4, is_pure=True, pack=1)


@triton.jit
def _zero_pair(z_ptr, offs, mask, HAS_ZEROS: tl.constexpr, dt: tl.constexpr):
    """``−(OFFSET + z)`` in both 16-bit halves of an int32 (z = 8 without zero points)."""
    neg = 0xC300 if dt == tl.bfloat16 else 0xE400  # −128 / −1024: OFFSET with the sign bit set
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        z = tl.zeros_like(offs) + 8
    h = neg | z
    return (h << 16) | h


@triton.jit
def _split4(v, n: tl.constexpr):
    """``v [n, 4]`` → its four columns (in-thread: each thread holds a row's 4 values)."""
    v02, v13 = tl.split(tl.reshape(v, (n, 2, 2)))  # (v[:, 0::2], v[:, 1::2])
    v0, v2 = tl.split(v02)
    v1, v3 = tl.split(v13)
    return v0, v1, v2, v3


@triton.jit
def _slab(w, xlo, xhi, zg, zg8, acc, n: tl.constexpr, dt: tl.constexpr):
    """The mmas of a 64-k slab: ``w [n, 4]`` the lane's fragment words (k-tiles 0…3); ``xlo``, ``xhi
    [n, 4]`` its 16 activations as 32-bit pairs 0…3 and 4…7 (k-tile j takes pairs 2j, 2j + 1). ``acc``:
    one accumulator (c0, c1, c2, c3) per k-tile, so the four mma chains are independent (an mma
    waits for the one before it on the same accumulator)."""
    w0, w1, w2, w3 = _split4(w, n)
    p0, p1, p2, p3 = _split4(xlo, n)
    p4, p5, p6, p7 = _split4(xhi, n)
    a0 = _mma(w0, zg, zg8, p0, p1, acc[0][0], acc[0][1], acc[0][2], acc[0][3], dt)
    a1 = _mma(w1, zg, zg8, p2, p3, acc[1][0], acc[1][1], acc[1][2], acc[1][3], dt)
    a2 = _mma(w2, zg, zg8, p4, p5, acc[2][0], acc[2][1], acc[2][2], acc[2][3], dt)
    a3 = _mma(w3, zg, zg8, p6, p7, acc[3][0], acc[3][1], acc[3][2], acc[3][3], dt)
    return a0, a1, a2, a3


@triton.jit
def _mma_gemv_kernel(
    x_ptr, t_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    N, N_SLABS, NT, stride_sn,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SLABS_PER_GROUP: tl.constexpr, SLABS: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_WARPS: tl.constexpr,
):
    dt = x_ptr.dtype.element_ty
    n: tl.constexpr = 32 * NUM_WARPS
    i = tl.arange(0, n)
    lane = i % 32
    g = lane // 4
    t = lane % 4
    tile = tl.program_id(0) * NUM_WARPS + i // 32
    live = tile < NT
    rg = tile * 16 + g
    rg8 = rg + 8
    mg = live & (rg < N)
    mg8 = live & (rg8 < N)
    steps = N_SLABS // SLABS  # the host makes SLABS divide N_SLABS
    per_split = tl.cdiv(steps, SPLIT_K)
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, steps)
    quad = tl.arange(0, 4)
    # a slab of a tile: 32 lanes × 4 words; the lane's 16 bytes of slab q at wp + 128·q
    wp = t_ptr + ((tile * N_SLABS)[:, None] * 128 + lane[:, None] * 4 + quad[None, :])
    wmask = live[:, None]
    # the lane's 16 activations of slab q: 32-bit pairs 32·q + 8t … 32·q + 8t + 7
    xp = x_ptr.to(tl.pointer_type(tl.int32)) + (8 * t[:, None] + quad[None, :])  # pairs 0…3; 4…7 at +4
    sp_g = s_ptr + rg * stride_sn
    sp_g8 = s_ptr + rg8 * stride_sn
    acc_g = tl.zeros([n], dtype=tl.float32)
    acc_g8 = tl.zeros([n], dtype=tl.float32)
    wa = tl.load(wp + first * SLABS * 128, mask=wmask & (first < last), other=0)
    if SLABS == 2:
        wb = tl.load(wp + (first * 2 + 1) * 128, mask=wmask & (first < last), other=0)
    for step in range(first, last):
        # the next step's words are requested before this step's arithmetic
        more = step + 1 < last
        wa_next = tl.load(wp + (step + 1) * SLABS * 128, mask=wmask & more, other=0)
        if SLABS == 2:
            wb_next = tl.load(wp + ((step + 1) * 2 + 1) * 128, mask=wmask & more, other=0)
        slab = step * SLABS
        grp = 0 if SLABS_PER_GROUP == 0 else slab // SLABS_PER_GROUP  # the step lies in one group
        zg = _zero_pair(z_ptr, rg * stride_sn + grp, mg, HAS_ZEROS, dt)
        zg8 = _zero_pair(z_ptr, rg8 * stride_sn + grp, mg8, HAS_ZEROS, dt)
        zero = tl.zeros([n], dtype=tl.float32)
        z4 = (zero, zero, zero, zero)
        xs = xp + 32 * slab
        acc = _slab(wa, tl.load(xs), tl.load(xs + 4), zg, zg8, (z4, z4, z4, z4), n, dt)
        if SLABS == 2:
            acc = _slab(wb, tl.load(xs + 32), tl.load(xs + 36), zg, zg8, acc, n, dt)
            wb = wb_next
        c0 = (acc[0][0] + acc[1][0]) + (acc[2][0] + acc[3][0])  # row g
        c2 = (acc[0][2] + acc[1][2]) + (acc[2][2] + acc[3][2])  # row g + 8
        acc_g = tl.fma(c0, tl.load(sp_g + grp, mask=mg, other=0.0).to(tl.float32), acc_g)
        acc_g8 = tl.fma(c2, tl.load(sp_g8 + grp, mask=mg8, other=0.0).to(tl.float32), acc_g8)
        wa = wa_next
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            acc_g += tl.load(b_ptr + rg, mask=mg, other=0.0).to(tl.float32)
            acc_g8 += tl.load(b_ptr + rg8, mask=mg8, other=0.0).to(tl.float32)
    lead = t == 0  # lanes 4g + t hold the same two rows; one of them writes
    if SPLIT_K == 1:
        tl.store(y_ptr + rg, acc_g.to(y_ptr.dtype.element_ty), mask=mg & lead)
        tl.store(y_ptr + rg8, acc_g8.to(y_ptr.dtype.element_ty), mask=mg8 & lead)
    else:
        tl.atomic_add(y_ptr + rg, acc_g, mask=mg & lead)
        tl.atomic_add(y_ptr + rg8, acc_g8, mask=mg8 & lead)


_tiles: WeakIdKeyDictionary = WeakIdKeyDictionary()  # packed weight -> (its version, its mma tiles)


def supports(M: int, K: int, group_size: int, n_groups: int, x_dtype: torch.dtype | None) -> bool:
    """Shapes and dtypes this kernel takes: one token, 16-bit x, K a multiple of 64 and every step of
    64 k inside one group."""
    return (M == 1 and x_dtype in (torch.bfloat16, torch.float16) and K % MMA_STEP == 0
            and (n_groups == 1 or group_size % MMA_STEP == 0))


def tiles_of(packed: Tensor, K: int) -> Tensor:
    """The weight's mma tiles, made on first use and kept as long as the weight lives (an in-place
    change of the weight makes new ones). Costs as much memory again as the packed weight."""
    hit = _tiles.get(packed)
    if hit is not None and hit[0] == packed._version:
        return hit[1]
    tiles = to_mma_tiles(packed, K)
    _tiles[packed] = (packed._version, tiles)
    return tiles


def run(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None,
        warps: int, slabs: int, split: int) -> Tensor:
    """``x [1, K] @ Wᵀ (+ bias)`` (x contiguous; scales and zeros with unit stride along groups).
    ``slabs`` (1 or 2) 64-k slabs per loop step, taken as 1 where 2 would straddle groups or K."""
    K = x.shape[1]
    N = packed.shape[0]
    tiles = tiles_of(packed, K)
    nt, n_slabs = tiles.shape[:2]
    G = scales.shape[1]
    spg = group_size // MMA_STEP if G > 1 else 0
    if n_slabs % slabs or (spg and spg % slabs):
        slabs = 1
    y = x.new_zeros((1, N), dtype=torch.float32) if split > 1 else x.new_empty((1, N))
    if x.data_ptr() % 16:
        x = x.clone()
    launch(_mma_gemv_kernel, (triton.cdiv(nt, warps), split),
           (x, tiles, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
            N, n_slabs, nt, scales.stride(0)),
           dict(HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SLABS_PER_GROUP=spg, SLABS=slabs,
                SPLIT_K=split, NUM_WARPS=warps), warps)
    return y.to(x.dtype) if split > 1 else y
