"""Tensor-core W4A16 GEMV for decode (M ≤ 16 tokens, 16-bit x; CUDA only, PTX).

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
per-channel): ``C[r, n] = Σ_k (q[r, k] − z[r])·x[n, k]``, token n in column n of B (a second block of
8 columns for tokens 8…15: the A fragment is unpacked once and feeds both). Lane ``4g + t`` reads
tokens g and 8 + g as its B registers: pairs of the token's 16 consecutive activations in the slab
(the layout permutes k inside a slab to make them so), and holds C for rows g, g + 8 and tokens 2t,
2t + 1 (+ 8): those take the group's scale, ``acc += s·C``, and are stored at the end. Products are
exact (a small integer times a 16-bit float) and accumulate in float32.

Warps along K (KSPLIT): one warp per 16-row tile leaves an SM with a few warps and little in flight
(at 11008×4096, 688 warps for 132 SMs; ``ncu`` saw 42% of issue slots stalled on L1TEX). KSPLIT warps
of a program share a tile, warp ``p`` taking steps ``p, p + KSPLIT, …``, and add their accumulators
through shared memory at the end (``C = Σ_p C_p``: the sum is linear), with no atomics, zeroing or cast
launch, unlike the grid's SPLIT_K. AHEAD: the next step's scales and zero pairs are loaded with its words.
SLABS = 4: a step requests four slabs (64 bytes a lane) before any is used, so each warp has twice the bytes
in flight of a 2-slab step; under g = 128 (two slabs a group) the step spans two groups and the first two
slabs' sum takes its scale before the second two start (22016×4096 at M = 1: 20.1 → 18.2 µs on the H200).

Row scale (HAS_RS): ``y = C·r[token] + bias`` in float32 before the one rounding to y's dtype, for one-token
A8/A4 linears run on the exact integer codes (``codes_route``): the token's scale then costs no rounding.

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
from qcompile.kernels.triton.launch import cdiv, launch

def _mma_asm(blocks: int, magic: str, dt: str) -> str:
    """PTX: unpack word $W into the A fragment, then per block of 8 tokens two mmas (codes, then the
    constant ``−(OFFSET + z)``) into that block's accumulators."""
    n_out = 4 * blocks
    w, zg, zg8 = n_out, n_out + 1, n_out + 2
    b = n_out + 3  # B registers: two per block
    c = b + 2 * blocks  # accumulators in
    lines = [
        "{", ".reg .b32 t0, t1, u0, u1, a0, a1, a2, a3;",
        f"prmt.b32 t0, ${w}, 0, 0x4140;", f"prmt.b32 t1, ${w}, 0, 0x4342;",
        f"lop3.b32 a0, t0, 0x000F000F, {magic}, 0xEA;", f"lop3.b32 a1, t1, 0x000F000F, {magic}, 0xEA;",
        "shr.b32 u0, t0, 4;", "shr.b32 u1, t1, 4;",
        f"lop3.b32 a2, u0, 0x000F000F, {magic}, 0xEA;", f"lop3.b32 a3, u1, 0x000F000F, {magic}, 0xEA;",
    ]
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{dt}.{dt}.f32"
    for k in range(blocks):
        d = ", ".join(f"${4 * k + i}" for i in range(4))
        cin = ", ".join(f"${c + 4 * k + i}" for i in range(4))
        bb = f"${b + 2 * k}, ${b + 2 * k + 1}"
        lines += [f"{mma} {{{d}}}, {{a0, a1, a2, a3}}, {{{bb}}}, {{{cin}}};",
                  f"{mma} {{{d}}}, {{${zg}, ${zg8}, ${zg}, ${zg8}}}, {{{bb}}}, {{{d}}};"]
    return "\n".join(lines + ["}"])


# a0 = (lo b0, lo b1) = row g, slab k d = 0, 1; a1 = (lo b2, lo b3) = row g + 8; a2, a3: the same rows at
# d = 2, 3 (layout.to_mma_tiles). Products are exact; the offset and zero leave in float32.
_BF16_1 = tl.constexpr(_mma_asm(1, "0x43004300", "bf16"))
_BF16_2 = tl.constexpr(_mma_asm(2, "0x43004300", "bf16"))
_F16_1 = tl.constexpr(_mma_asm(1, "0x64006400", "f16"))
_F16_2 = tl.constexpr(_mma_asm(2, "0x64006400", "f16"))
_CONS_1 = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 5 + ["f"] * 4))
_CONS_2 = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 7 + ["f"] * 8))


@triton.jit
def _mma(word, zg, zg8, p, q, c, BLOCKS: tl.constexpr, dt: tl.constexpr):
    """``C += (codes(word) − z)·B`` for one 16 × 16 tile and 8 (or 16) tokens: B registers ``p``
    (tokens 0…7) and ``q`` (8…15), accumulators ``c`` (4 per block of tokens)."""
    if BLOCKS == 1:
        args = [word, zg, zg8, p[0], p[1], c[0], c[1], c[2], c[3]]
        if dt == tl.bfloat16:
            out = tl.inline_asm_elementwise(_BF16_1, _CONS_1, args, dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(_F16_1, _CONS_1, args, dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        args = [word, zg, zg8, p[0], p[1], q[0], q[1], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]
        if dt == tl.bfloat16:
            out = tl.inline_asm_elementwise(_BF16_2, _CONS_2, args, dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(_F16_2, _CONS_2, args, dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    return out


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
def _activations(xp, xm, n: tl.constexpr):
    """A lane's 16 activations of a slab for one token, as 32-bit pairs 0…7 (two 16-byte loads)."""
    a0, a1, a2, a3 = _split4(tl.load(xp, mask=xm, other=0), n)
    a4, a5, a6, a7 = _split4(tl.load(xp + 4, mask=xm, other=0), n)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _slab(w, xp, xq, xm, xmq, zg, zg8, c, n: tl.constexpr, BLOCKS: tl.constexpr, dt: tl.constexpr):
    """The mmas of a 64-k slab: ``w [n, 4]`` the lane's fragment words (k-tiles 0…3); ``xp``/``xq``
    the lane's activation pointers for its tokens g and 8 + g (k-tile j takes pairs 2j, 2j + 1)."""
    w0, w1, w2, w3 = _split4(w, n)
    p = _activations(xp, xm, n)
    q = p
    if BLOCKS == 2:
        q = _activations(xq, xmq, n)
    c = _mma(w0, zg, zg8, (p[0], p[1]), (q[0], q[1]), c, BLOCKS, dt)
    c = _mma(w1, zg, zg8, (p[2], p[3]), (q[2], q[3]), c, BLOCKS, dt)
    c = _mma(w2, zg, zg8, (p[4], p[5]), (q[4], q[5]), c, BLOCKS, dt)
    c = _mma(w3, zg, zg8, (p[6], p[7]), (q[6], q[7]), c, BLOCKS, dt)
    return c


@triton.jit
def _scaled(acc, c, s_g, s_g8, BLOCKS: tl.constexpr):
    """``acc += s·C`` (rows g take ``s_g``, rows g + 8 ``s_g8``)."""
    if BLOCKS == 1:
        out = (tl.fma(c[0], s_g, acc[0]), tl.fma(c[1], s_g, acc[1]), tl.fma(c[2], s_g8, acc[2]),
               tl.fma(c[3], s_g8, acc[3]))
    else:
        out = (tl.fma(c[0], s_g, acc[0]), tl.fma(c[1], s_g, acc[1]), tl.fma(c[2], s_g8, acc[2]),
               tl.fma(c[3], s_g8, acc[3]), tl.fma(c[4], s_g, acc[4]), tl.fma(c[5], s_g, acc[5]),
               tl.fma(c[6], s_g8, acc[6]), tl.fma(c[7], s_g8, acc[7]))
    return out


@triton.jit
def _store(y_ptr, stride_ym, tok, rg, rg8, v0, v1, v2, v3, M, mg, mg8, ATOMIC: tl.constexpr):
    """C fragment → y: ``v0, v1`` = row g for tokens tok, tok + 1; ``v2, v3`` = row g + 8."""
    m0 = tok < M
    m1 = tok + 1 < M
    p0 = y_ptr + tok * stride_ym
    p1 = p0 + stride_ym
    if not ATOMIC:
        dt = y_ptr.dtype.element_ty
        tl.store(p0 + rg, v0.to(dt), mask=mg & m0)
        tl.store(p1 + rg, v1.to(dt), mask=mg & m1)
        tl.store(p0 + rg8, v2.to(dt), mask=mg8 & m0)
        tl.store(p1 + rg8, v3.to(dt), mask=mg8 & m1)
    else:
        tl.atomic_add(p0 + rg, v0, mask=mg & m0)
        tl.atomic_add(p1 + rg, v1, mask=mg & m1)
        tl.atomic_add(p0 + rg8, v2, mask=mg8 & m0)
        tl.atomic_add(p1 + rg8, v3, mask=mg8 & m1)


@triton.jit
def _finish(y_ptr, r_ptr, stride_ym, tok, rg, rg8, v, bias_g, bias_g8, M, mg, mg8, HAS_RS: tl.constexpr,
            ATOMIC: tl.constexpr):
    """``y = C·r + bias`` for tokens tok, tok + 1 (``r`` the per-token output scale, 1 without HAS_RS), one
    rounding to y's dtype (or float32 atomics)."""
    v0, v1, v2, v3 = v
    if HAS_RS:
        r0 = tl.load(r_ptr + tok, mask=tok < M, other=1.0)
        r1 = tl.load(r_ptr + tok + 1, mask=tok + 1 < M, other=1.0)
        v0, v2 = v0 * r0, v2 * r0
        v1, v3 = v1 * r1, v3 * r1
    _store(y_ptr, stride_ym, tok, rg, rg8, v0 + bias_g, v1 + bias_g, v2 + bias_g8, v3 + bias_g8, M, mg, mg8, ATOMIC)


@triton.jit
def _step_params(s_ptr, z_ptr, rg, rg8, mg, mg8, slab, stride_sn, SLABS_PER_GROUP: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, dt: tl.constexpr):
    """Scales of rows g, g + 8 and their ``−(OFFSET + z)`` pairs for the step starting at ``slab`` (inside
    one group, or per-channel)."""
    grp = 0 if SLABS_PER_GROUP == 0 else slab // SLABS_PER_GROUP
    zg = _zero_pair(z_ptr, rg * stride_sn + grp, mg, HAS_ZEROS, dt)
    zg8 = _zero_pair(z_ptr, rg8 * stride_sn + grp, mg8, HAS_ZEROS, dt)
    s_g = tl.load(s_ptr + rg * stride_sn + grp, mask=mg, other=0.0).to(tl.float32)
    s_g8 = tl.load(s_ptr + rg8 * stride_sn + grp, mask=mg8, other=0.0).to(tl.float32)
    return s_g, s_g8, zg, zg8


@triton.jit
def _warp_sum(v, TILES: tl.constexpr, KSPLIT: tl.constexpr):
    """``v [TILES·KSPLIT·32]`` (warp = tile·KSPLIT + part) summed over the KSPLIT warps of each tile."""
    if KSPLIT == 1:
        return v
    return tl.reshape(tl.sum(tl.reshape(v, (TILES, KSPLIT, 32)), axis=1), (TILES * 32,))


@triton.jit
def _words(wp, step, SLABS: tl.constexpr, mask):
    """A lane's fragment words of the step's SLABS slabs (16 bytes each), all requested at once."""
    base = (step * SLABS * 128)[:, None]
    m = mask[:, None]
    wa = tl.load(wp + base, mask=m, other=0)
    wb = wa
    wc = wa
    wd = wa
    if SLABS >= 2:
        wb = tl.load(wp + base + 128, mask=m, other=0)
    if SLABS == 4:
        wc = tl.load(wp + base + 256, mask=m, other=0)
        wd = tl.load(wp + base + 384, mask=m, other=0)
    return wa, wb, wc, wd


@triton.jit
def _mma_gemv_kernel(
    x_ptr, t_ptr, s_ptr, z_ptr, b_ptr, y_ptr, r_ptr,
    M, N, N_SLABS, NT, stride_xm, stride_ym, stride_sn,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RS: tl.constexpr, SLABS_PER_GROUP: tl.constexpr,
    SLABS: tl.constexpr, BLOCKS: tl.constexpr, SPLIT_K: tl.constexpr, NUM_WARPS: tl.constexpr,
    KSPLIT: tl.constexpr, AHEAD: tl.constexpr,
):
    dt = x_ptr.dtype.element_ty
    n: tl.constexpr = 32 * NUM_WARPS
    TILES: tl.constexpr = NUM_WARPS // KSPLIT  # tiles of 16 rows per program, KSPLIT warps each along K
    # a step of 4 slabs under groups of 2 slabs (g = 128) spans two groups: two scales per step
    TWO: tl.constexpr = SLABS == 4 and SLABS_PER_GROUP == 2
    i = tl.arange(0, n)
    lane = i % 32
    g = lane // 4
    t = lane % 4
    tile = tl.program_id(0) * TILES + (i // 32) // KSPLIT
    part = (i // 32) % KSPLIT  # the warp's share of the tile's steps: part, part + KSPLIT, …
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
    # B column n = token n (lane 4g + t reads tokens g and 8 + g): its 16 activations of slab q are
    # the 32-bit pairs 32·q + 8t … 32·q + 8t + 7 of the token's row
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    xp = xw + (g * (stride_xm // 2) + 8 * t)[:, None] + quad[None, :]
    xq = xp + 8 * (stride_xm // 2)
    zero = tl.zeros([n], dtype=tl.float32)
    acc = (zero, zero, zero, zero)
    if BLOCKS == 2:
        acc = (zero, zero, zero, zero, zero, zero, zero, zero)
    step = first + part  # per warp
    ok = step < last
    wa, wb, wc, wd = _words(wp, step, SLABS, live & ok)
    if AHEAD:
        s_g, s_g8, zg, zg8 = _step_params(s_ptr, z_ptr, rg, rg8, mg & ok, mg8 & ok, step * SLABS, stride_sn,
                                          SLABS_PER_GROUP, HAS_ZEROS, dt)
    for _ in range(0, tl.cdiv(last - first, KSPLIT)):
        # the next step's words (and scales) are requested before this step's arithmetic
        nxt = step + KSPLIT
        more = nxt < last
        wa_n, wb_n, wc_n, wd_n = _words(wp, nxt, SLABS, live & more)
        if AHEAD:
            s_n, s_n8, zg_n, zg_n8 = _step_params(s_ptr, z_ptr, rg, rg8, mg & more, mg8 & more, nxt * SLABS,
                                                  stride_sn, SLABS_PER_GROUP, HAS_ZEROS, dt)
        else:
            s_g, s_g8, zg, zg8 = _step_params(s_ptr, z_ptr, rg, rg8, mg & ok, mg8 & ok, step * SLABS, stride_sn,
                                              SLABS_PER_GROUP, HAS_ZEROS, dt)
        if TWO:  # the second group's (slabs 2, 3)
            s2, s28, z2, z28 = _step_params(s_ptr, z_ptr, rg, rg8, mg & ok, mg8 & ok, step * SLABS + 2, stride_sn,
                                            SLABS_PER_GROUP, HAS_ZEROS, dt)
        slab = (step * SLABS)[:, None]
        xm = ((g < M) & ok)[:, None]  # a warp past its last step reads no activations: its mmas add zeros
        xmq = ((g + 8 < M) & ok)[:, None]
        c = (zero, zero, zero, zero)
        if BLOCKS == 2:
            c = (zero, zero, zero, zero, zero, zero, zero, zero)
        c = _slab(wa, xp + 32 * slab, xq + 32 * slab, xm, xmq, zg, zg8, c, n, BLOCKS, dt)
        if SLABS >= 2:
            c = _slab(wb, xp + 32 * (slab + 1), xq + 32 * (slab + 1), xm, xmq, zg, zg8, c, n, BLOCKS, dt)
        if SLABS == 4:
            if TWO:
                acc = _scaled(acc, c, s_g, s_g8, BLOCKS)
                c = (zero, zero, zero, zero)
                if BLOCKS == 2:
                    c = (zero, zero, zero, zero, zero, zero, zero, zero)
                s_g, s_g8, zg, zg8 = s2, s28, z2, z28
            c = _slab(wc, xp + 32 * (slab + 2), xq + 32 * (slab + 2), xm, xmq, zg, zg8, c, n, BLOCKS, dt)
            c = _slab(wd, xp + 32 * (slab + 3), xq + 32 * (slab + 3), xm, xmq, zg, zg8, c, n, BLOCKS, dt)
        acc = _scaled(acc, c, s_g, s_g8, BLOCKS)
        wa, wb, wc, wd = wa_n, wb_n, wc_n, wd_n
        if AHEAD:
            s_g, s_g8, zg, zg8 = s_n, s_n8, zg_n, zg_n8
        step = nxt
        ok = more
    # the KSPLIT warps of a tile add their sums (through shared memory); the stores then use the reduced layout
    j = tl.arange(0, TILES * 32)
    lane = j % 32
    g = lane // 4
    t = lane % 4
    tile = tl.program_id(0) * TILES + j // 32
    live = tile < NT
    rg = tile * 16 + g
    rg8 = rg + 8
    mg = live & (rg < N)
    mg8 = live & (rg8 < N)
    zero = tl.zeros([TILES * 32], dtype=tl.float32)
    bias_g = zero
    bias_g8 = zero
    if HAS_BIAS:
        if tl.program_id(1) == 0:  # (split-K: added by the first split)
            bias_g = tl.load(b_ptr + rg, mask=mg, other=0.0).to(tl.float32)
            bias_g8 = tl.load(b_ptr + rg8, mask=mg8, other=0.0).to(tl.float32)
    # lane 4g + t holds rows g, g + 8 for tokens 2t, 2t + 1 (and 8 + 2t, 9 + 2t in the second block)
    v = (_warp_sum(acc[0], TILES, KSPLIT), _warp_sum(acc[1], TILES, KSPLIT), _warp_sum(acc[2], TILES, KSPLIT),
         _warp_sum(acc[3], TILES, KSPLIT))
    v8 = v
    if BLOCKS == 2:
        v8 = (_warp_sum(acc[4], TILES, KSPLIT), _warp_sum(acc[5], TILES, KSPLIT), _warp_sum(acc[6], TILES, KSPLIT),
              _warp_sum(acc[7], TILES, KSPLIT))
    _finish(y_ptr, r_ptr, stride_ym, 2 * t, rg, rg8, v, bias_g, bias_g8, M, mg, mg8, HAS_RS, SPLIT_K > 1)
    if BLOCKS == 2:
        _finish(y_ptr, r_ptr, stride_ym, 8 + 2 * t, rg, rg8, v8, bias_g, bias_g8, M, mg, mg8, HAS_RS, SPLIT_K > 1)


_tiles: WeakIdKeyDictionary = WeakIdKeyDictionary()  # packed weight -> (its version, its mma tiles)


def supports(M: int, K: int, group_size: int, n_groups: int, x_dtype: torch.dtype | None) -> bool:
    """Shapes and dtypes this kernel takes: up to 16 tokens, 16-bit x, K a multiple of 64 and every
    step of 64 k inside one group."""
    return (1 <= M <= 16 and x_dtype in (torch.bfloat16, torch.float16) and K % MMA_STEP == 0
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
        meta: dict, row_scale: Tensor | None = None) -> Tensor:
    """``(x [M ≤ 16, K] @ Wᵀ)·row_scale (+ bias)`` (x with unit stride along K; scales and zeros with unit
    stride along groups; ``row_scale`` float32 ``[M]`` or None). ``meta``: ``WARPS`` per program, ``KSPLIT``
    of them sharing one tile of 16 rows along K (summed through shared memory); ``SLABS`` (1, 2 or 4) 64-k
    slabs per loop step, taken as fewer where they would straddle K or more than two groups; ``SPLIT_K``
    programs along K, adding float32 partials atomically (zeroed output, cast after); ``AHEAD`` scales a step
    ahead."""
    M, K = x.shape
    N = packed.shape[0]
    tiles = tiles_of(packed, K)
    atomic = meta["SPLIT_K"] > 1
    y = x.new_zeros((M, N), dtype=torch.float32) if atomic else x.new_empty((M, N))
    if x.data_ptr() % 16 or x.stride(0) % 8:  # rows are read as 16-byte vectors
        x = x.clone(memory_format=torch.contiguous_format)
    launch(*launch_args(x, tiles, scales, zeros, group_size, bias, y, meta, row_scale))
    return y.to(x.dtype) if atomic else y


def launch_args(x: Tensor, tiles: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None,
                y: Tensor, meta: dict, row_scale: Tensor | None = None) -> tuple:
    """``launch`` arguments of the kernel for ``x [M, K]`` (16-byte aligned rows) into ``y [M, N]``."""
    M = x.shape[0]
    N = y.shape[1]
    nt, n_slabs = tiles.shape[:2]
    G = scales.shape[1]
    spg = group_size // MMA_STEP if G > 1 else 0
    warps, slabs, split, ksplit = meta["WARPS"], meta["SLABS"], meta["SPLIT_K"], meta.get("KSPLIT", 1)
    if slabs == 4 and (n_slabs % 4 or spg not in (0, 2) and spg % 4):  # at most two groups a step
        slabs = 2
    if n_slabs % slabs or (spg and spg % slabs and not (slabs == 4 and spg == 2)):
        slabs = 1
    if warps % ksplit:
        raise ValueError(f"mma_gemv: {warps} warps cannot share tiles {ksplit} at a time")
    programs = cdiv(nt, warps // ksplit)
    consts = dict(HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, HAS_RS=row_scale is not None,
                  SLABS_PER_GROUP=spg, SLABS=slabs, BLOCKS=1 if M <= 8 else 2, SPLIT_K=split, NUM_WARPS=warps,
                  KSPLIT=ksplit, AHEAD=meta.get("AHEAD", False))
    return (_mma_gemv_kernel, (programs, split),
            (x, tiles, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
             row_scale if row_scale is not None else scales,
             M, N, n_slabs, nt, x.stride(0), y.stride(0), scales.stride(0)),
            consts, warps)
