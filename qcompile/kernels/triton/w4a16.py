"""W4A16 Triton kernels: canonical int4 weights × 16-bit (or float32) activations.

Layout read, unchanged (``qcompile.quant.formats``): ``packed uint8 [N, ceil(K/2)]`` with codes
``k = 2j`` in the low and ``k = 2j+1`` in the high nibble of byte j; ``scales [N, G]``; ``zeros``
uint8 ``[N, G]`` or None (z = 8); ``G = ceil(K/g)``, the last group possibly partial.

Algebra. ``y[m, n] = Σ_k x[m, k]·(q[n, k] − z[n, k//g])·s[n, k//g]``. Two rewrites make the
memory-bound (decode) kernels cheap:

* **scale after the sum** — inside one group ``Σ_k x·(q − z)·s = s·(Σ_k q·x − z·Σ_k x)``: codes
  enter the products as exact small integers (as magic-number floats ``OFFSET + q``, see ``int4``;
  the offset leaves with ``z``) and scale/zero cost one multiply-add per (row, group) — per (row,
  chunk of a thread's 4 words) in the GEMV — instead of per weight element. A tile of K (a chunk)
  therefore lies inside one group, or the weight is per-channel (G = 1).
* **no reordering of the packed bytes** — the M = 1 kernel reads each row as int32 words of eight
  codes ``k = 8w … 8w + 7`` and pairs code i with ``x[8w + i]``; the tensor-core kernel pairs the low
  nibbles of a byte tile with ``x[:, 0::2]`` and the high ones with ``x[:, 1::2]``. Either way the
  weight is used as loaded, only the small activation is rearranged.

Kernels:

* ``_gemv_kernel`` (M = 1): a 2-D tile ``[BLOCK_N rows, BW words]`` per step, 4 consecutive words per
  thread and row, every row of the program in every thread, the next step's words in flight; 12 PTX
  instructions unpack a word into eight float32 codes ``256 + q`` / ``16 + q`` (``int4.word_codes``)
  that pair with x as it is, eight FMAs per word (the first also takes off the offsets, and z = 8 for
  symmetric weights: an activation-only term), and when a thread's 4 words lie in one group
  (``CHUNK = 4``: g a multiple of 32, or per-channel) their sums are added in the thread and the
  group's scale (and zero) applied once per chunk; the row reduction happens once, after the loop.
  Compiled for sm_90 this is ~30 SASS instructions per word (37 with a scale per word). The
  activation tile ``[1, BW]`` takes the weight tile's layout, so each activation value is loaded once
  per thread and feeds all BLOCK_N rows from a register (the earlier 3-D tile gave each thread one or
  two rows on the H200's Triton 3.6, and ten activation loads per weight load). FUSED (16-bit x,
  CUDA): each thread reads its words' eight activations with one 16-byte load
  (``int4.word_activations``); otherwise ``_gemv_prep_kernel`` writes them as ten float32 planes
  first (one more launch). AHEAD: the next step's scales (and zeros) are requested with its words (a
  scale loaded where it is used puts one dependent memory round trip into every step). Needs K and
  g multiples of 8. The loop is ``_gemv_rows``, shared with ``_gemv_codes_kernel`` (W4A8/W4A4 at one
  token, one launch): the eight int8 codes of a word read with one 8-byte load (``int4.word_codes8``),
  each byte put in the mantissa of 2^23 (``a − za`` exact in float32), the token's scale applied to
  the row sums.
* ``mma_gemv`` (M ≤ 16, 16-bit x, CUDA; its own module): the GEMV on tensor cores, tokens as the
  MMA's narrow operand, from a derived weight layout made once per weight; ~19 instructions per word
  against the word GEMV's ~30; several warps may share a tile of rows along K (summed in the program).
* ``_skinny_kernel`` (M ≤ 16, and M = 1 shapes the GEMV does not take): the even/odd algebra on tensor
  cores with A and B swapped, ``acc[BLOCK_N, 16] += dot(codes[BLOCK_N, H], x_halfᵀ[H, 16])``, so the
  weight tile is the wide operand and the few tokens the narrow one.
* ``_gemm_kernel`` (prefill): the classic tiled GEMM; the weight tile is dequantized in registers
  (``(q − z)·s`` per element, back in K order) before ``dot``.
* ``_dequant_kernel``: the dense weight, for the dequantize-then-cuBLAS strategy at large M (the
  tuned choice on the H200 at M ≥ 128: cuBLAS's bf16 GEMM beats the fused Triton GEMM there).

Row scale (``run``/``linear``'s ``row_scale``, float32 per row of x): ``y = (x @ Ŵᵀ)·r + bias`` rounded once; the
two GEMVs scale their float32 row sums (the exact route of one-token A8/A4 linears, ``codes_route``), the other
kinds take a float32 detour (dequantized weight, ``F.linear``), since no one-token route reaches them.

Non-aligned groups (``g`` not a multiple of the tile) use a per-element gather of scale and zero
(``GATHER``): correct for any ``g``, slower, never the tuned default for power-of-two groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.kernels.autotune import Candidate, choose, chosen, copies
from qcompile.kernels.triton import mma_gemv
from qcompile.kernels.triton.launch import cdiv, launch
from qcompile.kernels.triton.int4 import (EVEN_OFFSET, ODD_OFFSET, offset_codes, offset_codes_asm, unpack,
                                          word_activations, word_codes, word_codes8)


PLANES = 10  # rows of the GEMV's activation table: x_0 … x_7, the codes' offsets summed, Σ_i x_i per word


@triton.jit
def _gemv_prep_kernel(x_ptr, xp_ptr, KW, BLOCK: tl.constexpr):
    """The activation as the GEMV consumes it, one float32 row ``xp[p, w]`` per plane p: for word w
    (codes ``k = 8w + i``) ``xp[i, w] = x[8w+i]``; ``xp[8, w]`` the offsets ``int4.word_codes`` puts
    on the word's codes, summed (``256·Σ_even x + 16·Σ_odd x``); ``xp[9, w] = Σ_i x[8w+i]`` (for the
    zero point). Contiguous rows, so the GEMV loads them in the weight tile's own layout."""
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = w < KW
    off = tl.zeros([BLOCK], dtype=tl.float32)
    tot = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(8):
        v = tl.load(x_ptr + 8 * w + i, mask=m, other=0.0).to(tl.float32)
        tl.store(xp_ptr + i * KW + w, v, mask=m)
        off += v * (EVEN_OFFSET if i % 2 == 0 else ODD_OFFSET)
        tot += v
    tl.store(xp_ptr + 8 * KW + w, off, mask=m)
    tl.store(xp_ptr + 9 * KW + w, tot, mask=m)


@triton.jit
def _gemv_weights(wp, step, BW: tl.constexpr, col, KW, n_mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(wp + step * BW, mask=n_mask[:, None], other=0)
    return tl.load(wp + step * BW, mask=n_mask[:, None] & (step * BW + col < KW), other=0)


@triton.jit
def _plane(xp, P: tl.constexpr, KW, xm, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(xp + P * KW)
    return tl.load(xp + P * KW, mask=xm, other=0.0)


@triton.jit
def _chunk_sum(t, ROWS: tl.constexpr, BW: tl.constexpr, CHUNK: tl.constexpr):
    """``t [ROWS, BW]`` summed over runs of CHUNK consecutive words (inside one thread: free)."""
    if CHUNK == 1:
        return t
    return tl.sum(tl.reshape(t, (ROWS, BW // CHUNK, CHUNK)), axis=2)


@triton.jit
def _group_params(s_ptr, z_ptr, gp, step, BW: tl.constexpr, CHUNK: tl.constexpr, KW, GW, stride_sg, n_mask,
                  HAS_ZEROS: tl.constexpr):
    """Scales (and zeros) of the groups of a step's chunks, ``[BLOCK_N, BW / CHUNK]`` float32."""
    first = step * BW + CHUNK * tl.arange(0, BW // CHUNK)[None, :]  # the chunk's first word
    gofs = gp + (first // GW) * stride_sg
    gmask = n_mask[:, None] & (first < KW)
    s = tl.load(s_ptr + gofs, mask=gmask, other=0.0).to(tl.float32)
    z = s
    if HAS_ZEROS:
        z = tl.load(z_ptr + gofs, mask=gmask, other=0).to(tl.float32)
    return s, z


@triton.jit
def _code_value(word, SHIFT: tl.constexpr, base):
    """Byte ``SHIFT/8`` of an int32 word of int8 codes as float32 ``code + 2^23 + 128 − base``: the byte
    with its sign bit flipped is ``code + 128`` in [0, 255], put in the mantissa of 2^23 (one lop3)."""
    v = ((word >> SHIFT) & 0xFF) ^ 0x4B000080
    return v.to(tl.float32, bitcast=True) - base


@triton.jit
def _act_code(v, qs, qz, QMAX: tl.constexpr):
    """``clamp(rint(v / qs) + qz, 0, QMAX) − qz``: a value's per-token code less its zero, as
    ``rotate_quant`` computes it (IEEE division, round half to even), an exact integer in float32."""
    t = tl.minimum(tl.maximum(tl.math.div_rn(v, qs), -4194304.0), 4194304.0)
    q = ((t + 12582912.0) - 12582912.0) + qz
    return tl.minimum(tl.maximum(q, 0.0), QMAX) - qz


@triton.jit
def _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, base, offs_n, n_mask, KW, GW, stride_wn, stride_sn, stride_sg,
               HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr, CHUNK: tl.constexpr,
               EVEN: tl.constexpr, MODE: tl.constexpr, ASM: tl.constexpr, AHEAD: tl.constexpr,
               qs=1.0, qz=0.0, QMAX: tl.constexpr = 0):
    """``Σ_k x[k]·(q[n, k] − z)·s`` for the program's rows, float32 ``[BLOCK_N]``. The activation by MODE:
    0 its float32 planes (``_gemv_prep_kernel``), 1 the 16-bit x itself, 2 int8 codes ``a`` read as
    ``a − za`` (``base = 2^23 + 128 + za``; exact integers in float32, the caller applies the token's
    scale to the sum), 3 the 16-bit x quantized here with the token's scale ``qs`` and zero ``qz``
    (``_act_code``; the caller applies ``qs`` to the sum). AHEAD: the next step's scales (and zeros) are
    requested with its words, so no step waits on a dependent scale load."""
    col = tl.arange(0, BW)[None, :]  # [1, BW] int32 words (8 codes each) of a step
    steps = tl.cdiv(KW, BW)
    wp = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * stride_wn + col
    gp = offs_n[:, None] * stride_sn
    # Tiles are [BLOCK_N, BW] with BW = 4 words × 32·num_warps threads: each thread holds 4 consecutive
    # words of every row of the program (a 2-D tile leaves Triton no other layout), so the activation
    # tile [1, BW] has the same layout and each activation value, loaded once, feeds BLOCK_N rows from
    # a register. A thread's CHUNK words share one group: their sums are added in the thread, and the
    # group's scale and zero are applied once per chunk.
    acc = tl.zeros([BLOCK_N, BW // CHUNK], dtype=tl.float32)
    w = _gemv_weights(wp, 0, BW, col, KW, n_mask, EVEN)
    if AHEAD:
        s, z = _group_params(s_ptr, z_ptr, gp, 0, BW, CHUNK, KW, GW, stride_sg, n_mask, HAS_ZEROS)
    for step in range(0, steps):
        # the next step's words (and scales) are requested before this step's arithmetic
        more = offs_n * 0 + step + 1 < steps
        w_next = _gemv_weights(wp, step + 1, BW, col, KW, n_mask & more, EVEN)
        if AHEAD:
            s_next, z_next = _group_params(s_ptr, z_ptr, gp, step + 1, BW, CHUNK, KW, GW, stride_sg, n_mask & more,
                                           HAS_ZEROS)
        word = step * BW + col
        km = word < KW
        if MODE == 1 or (MODE == 3 and ASM):  # the planes made here from x itself, as the prep kernel makes them
            if EVEN:
                x0, x1, x2, x3, x4, x5, x6, x7 = word_activations(x_ptr + 8 * word, x_ptr.dtype.element_ty)
            else:  # words past K read word 0 and count as zeros
                x0, x1, x2, x3, x4, x5, x6, x7 = word_activations(x_ptr + 8 * tl.where(km, word, 0),
                                                                  x_ptr.dtype.element_ty)
        elif MODE == 3:  # (without PTX) eight loads per word, for the interpreter
            xw = x_ptr + 8 * word
            x0 = tl.load(xw, mask=km, other=0.0).to(tl.float32)
            x1 = tl.load(xw + 1, mask=km, other=0.0).to(tl.float32)
            x2 = tl.load(xw + 2, mask=km, other=0.0).to(tl.float32)
            x3 = tl.load(xw + 3, mask=km, other=0.0).to(tl.float32)
            x4 = tl.load(xw + 4, mask=km, other=0.0).to(tl.float32)
            x5 = tl.load(xw + 5, mask=km, other=0.0).to(tl.float32)
            x6 = tl.load(xw + 6, mask=km, other=0.0).to(tl.float32)
            x7 = tl.load(xw + 7, mask=km, other=0.0).to(tl.float32)
        elif MODE == 2:
            if ASM:  # one 8-byte load per word (words past K read word 0, zeroed below)
                x0, x1, x2, x3, x4, x5, x6, x7 = word_codes8(x_ptr + 8 * tl.where(km, word, 0))
                x0, x1, x2, x3 = x0 - base, x1 - base, x2 - base, x3 - base
                x4, x5, x6, x7 = x4 - base, x5 - base, x6 - base, x7 - base
            else:  # two int32 words of four int8 codes each
                ap = x_ptr.to(tl.pointer_type(tl.int32)) + 2 * word
                lo = tl.load(ap, mask=km, other=0)
                hi = tl.load(ap + 1, mask=km, other=0)
                x0, x1 = _code_value(lo, 0, base), _code_value(lo, 8, base)
                x2, x3 = _code_value(lo, 16, base), _code_value(lo, 24, base)
                x4, x5 = _code_value(hi, 0, base), _code_value(hi, 8, base)
                x6, x7 = _code_value(hi, 16, base), _code_value(hi, 24, base)
        if MODE == 3:
            x0, x1 = _act_code(x0, qs, qz, QMAX), _act_code(x1, qs, qz, QMAX)
            x2, x3 = _act_code(x2, qs, qz, QMAX), _act_code(x3, qs, qz, QMAX)
            x4, x5 = _act_code(x4, qs, qz, QMAX), _act_code(x5, qs, qz, QMAX)
            x6, x7 = _act_code(x6, qs, qz, QMAX), _act_code(x7, qs, qz, QMAX)
        if MODE != 0:
            if not EVEN:
                x0, x1, x2, x3 = tl.where(km, x0, 0.0), tl.where(km, x1, 0.0), tl.where(km, x2, 0.0), \
                    tl.where(km, x3, 0.0)
                x4, x5, x6, x7 = tl.where(km, x4, 0.0), tl.where(km, x5, 0.0), tl.where(km, x6, 0.0), \
                    tl.where(km, x7, 0.0)
            tot = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
            off = EVEN_OFFSET * ((x0 + x2) + (x4 + x6)) + ODD_OFFSET * ((x1 + x3) + (x5 + x7))
        else:
            xp = x_ptr + word
            x0 = _plane(xp, 0, KW, km, EVEN)
            x1 = _plane(xp, 1, KW, km, EVEN)
            x2 = _plane(xp, 2, KW, km, EVEN)
            x3 = _plane(xp, 3, KW, km, EVEN)
            x4 = _plane(xp, 4, KW, km, EVEN)
            x5 = _plane(xp, 5, KW, km, EVEN)
            x6 = _plane(xp, 6, KW, km, EVEN)
            x7 = _plane(xp, 7, KW, km, EVEN)
            off = _plane(xp, 8, KW, km, EVEN)
            tot = _plane(xp, 9, KW, km, EVEN)
        # Σ_i c_i·x_i − offsets = Σ_i q_i·x_i; without zero points z = 8 is taken off here too (an
        # activation-only term, shared by the BLOCK_N rows)
        c0, c1, c2, c3, c4, c5, c6, c7 = word_codes(w, ASM)
        part = tl.fma(c0, x0, -off if HAS_ZEROS else -(off + 8.0 * tot))
        part = tl.fma(c1, x1, part)
        part = tl.fma(c2, x2, part)
        part = tl.fma(c3, x3, part)
        part = tl.fma(c4, x4, part)
        part = tl.fma(c5, x5, part)
        part = tl.fma(c6, x6, part)
        part = tl.fma(c7, x7, part)
        part = _chunk_sum(part, BLOCK_N, BW, CHUNK)
        # each chunk takes its group's scale (and zero): s·(Σ q·x − z·Σ x); the row sums at the end
        if not AHEAD:
            s, z = _group_params(s_ptr, z_ptr, gp, step, BW, CHUNK, KW, GW, stride_sg, n_mask, HAS_ZEROS)
        if HAS_ZEROS:
            # summed in the weight tile's layout: a [1, BW] tile reshaped alone takes a layout of its
            # own and a shared-memory round trip per step
            part -= z * _chunk_sum(tl.broadcast_to(tot, (BLOCK_N, BW)), BLOCK_N, BW, CHUNK)
        acc = tl.fma(part, s, acc)
        w = w_next
        if AHEAD:
            s = s_next
            z = z_next
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, r_ptr,
    N, KW, GW, stride_wn, stride_sn, stride_sg,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RS: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr,
    CHUNK: tl.constexpr, EVEN: tl.constexpr, FUSED: tl.constexpr, ASM: tl.constexpr, AHEAD: tl.constexpr,
):
    """``y = (Σ_k x[k]·ŵ[n, k])·r (+ bias)``, one rounding; ``r`` the token's output scale (1 without
    HAS_RS)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    out = _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, 0.0, offs_n, n_mask, KW, GW, stride_wn, stride_sn, stride_sg,
                     HAS_ZEROS, BLOCK_N, BW, CHUNK, EVEN, 1 if FUSED else 0, ASM, AHEAD, 1.0, 0.0, 0)
    if HAS_RS:
        out *= tl.load(r_ptr).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_codes_kernel(
    a_ptr, sa_ptr, za_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    N, KW, GW, stride_wn, stride_sn, stride_sg,
    HAS_AZ: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BW: tl.constexpr, CHUNK: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, AHEAD: tl.constexpr,
):
    """W4A8/W4A4 at one token in one launch: ``y = sa·Σ_k (a[k] − za)·ŵ[n, k] (+ bias)``, the int8 codes read
    by the word GEMV itself (``_gemv_rows`` MODE 2), the token's scale applied to the row sums."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    base = 8388608.0 + 128.0
    if HAS_AZ:
        base += tl.load(za_ptr).to(tl.float32)
    out = _gemv_rows(a_ptr, w_ptr, s_ptr, z_ptr, base, offs_n, n_mask, KW, GW, stride_wn, stride_sn, stride_sg,
                     HAS_ZEROS, BLOCK_N, BW, CHUNK, EVEN, 2, ASM, AHEAD, 1.0, 0.0, 0)
    out *= tl.load(sa_ptr).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_act_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    N, K, KW, GW, stride_wn, stride_sn, stride_sg, clip,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, XB: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BW: tl.constexpr, CHUNK: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, AHEAD: tl.constexpr,
):
    """W4A8/W4A4 at one token from the 16-bit activation, in one launch: each program reads the whole row
    x (K values, from L2 after the first programs), takes its range as ``rotate_quant`` does (``hi = max(x,
    0)``, ``lo = min(x, 0)``; symmetric ``sa = clip·max(−lo, hi)/(2^(b−1)−1)``, ``za = 2^(b−1)``;
    asymmetric ``full = (hi − lo)/(2^b − 1)``, ``za = rint(−lo/full)``, ``sa = clip·full``), then runs the
    word GEMV on the codes it makes in registers (``_gemv_rows`` MODE 3):
    ``y = sa·Σ_k (clamp(rint(x/sa) + za, 0, 2^b − 1) − za)·ŵ[n, k] (+ bias)``, the same codes and the same
    sum as ``quantize_per_token`` followed by ``_gemv_codes_kernel``, without the codes' round trip and
    its launch."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    QMAX: tl.constexpr = (1 << BITS) - 1
    SHIFT: tl.constexpr = 1 << (BITS - 1)
    xs = tl.arange(0, XB)
    hi = tl.max(tl.zeros([XB], dtype=tl.float32), axis=0)
    lo = hi
    for k0 in range(0, K, XB):
        v = tl.load(x_ptr + k0 + xs, mask=k0 + xs < K, other=0.0).to(tl.float32)
        hi = tl.maximum(hi, tl.max(v, axis=0))
        lo = tl.minimum(lo, tl.min(v, axis=0))
    if SYMMETRIC:
        qs = tl.maximum(tl.math.div_rn(tl.maximum(-lo, hi) * clip, SHIFT - 1.0), 1.1754943508222875e-38)
        qz = hi * 0.0 + SHIFT
    else:
        full = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), 1.1754943508222875e-38)
        t = tl.minimum(tl.maximum(tl.math.div_rn(-lo, full), -4194304.0), 4194304.0)
        qz = tl.minimum(tl.maximum((t + 12582912.0) - 12582912.0, 0.0), QMAX * 1.0)
        qs = tl.maximum(full * clip, 1.1754943508222875e-38)
    out = _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, 0.0, offs_n, n_mask, KW, GW, stride_wn, stride_sn, stride_sg,
                     HAS_ZEROS, BLOCK_N, BW, CHUNK, EVEN, 3, ASM, AHEAD, qs, qz, QMAX)
    out *= qs
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, KH, group_size, stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, H: tl.constexpr, SPLIT_K: tl.constexpr,
    STEPS_PER_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFSET: tl.constexpr, ASM: tl.constexpr,
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
            we = ((offset_codes(w & 15, tl.float32) - (ze + 8388608.0)) * se).to(dt)
            wo = ((offset_codes(w >> 4, tl.float32) - (zo + 8388608.0)) * so).to(dt)
            acc += tl.dot(we, xe, input_precision=DOT_PRECISION)
            acc += tl.dot(wo, xo, input_precision=DOT_PRECISION)
        else:
            # codes enter the dot as OFFSET + q (exact, see int4.offset_codes); OFFSET·Σx comes off with z
            if OFFSET == 0:
                ce = (w & 15).to(dt)
                co = (w >> 4).to(dt)
            elif ASM:
                ce, co = offset_codes_asm(w, dt)
            else:
                ce = offset_codes(w & 15, dt)
                co = offset_codes(w >> 4, dt)
            part = tl.dot(ce, xe, input_precision=DOT_PRECISION)
            part += tl.dot(co, xo, input_precision=DOT_PRECISION)
            xsum = tl.sum(xe.to(tl.float32), axis=0) + tl.sum(xo.to(tl.float32), axis=0)  # [BLOCK_M]
            grp = step // STEPS_PER_GROUP
            s = tl.load(s_ptr + offs_n * stride_sn + grp * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * stride_sn + grp * stride_sg, mask=n_mask, other=0).to(tl.float32) + OFFSET
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
        q = unpack(w, BLOCK_N, BLOCK_K)  # back to K order
        q = offset_codes(q, tl.float32) - 8388608.0
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
    q = offset_codes(unpack(w, BLOCK_N, 2 * H), tl.float32)  # 2^23 + q
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


def _word_gemv(K: int, group_size: int, G: int) -> bool:
    """Whether the word GEMV takes the shape: it reads K as int32 words of 8 codes, each word inside
    one group."""
    return K % 8 == 0 and (G == 1 or group_size % 8 == 0)


# Word-GEMV configurations offered to the tuner: (BLOCK_N, num_warps, FUSED, AHEAD). From the H200 sweep
# (``benchmarks/gemv_profile.py``, kernels-h200.md): each fused one is the best or within 3% of it at one of
# the decode shapes; the unfused ones serve float32 x (W4A8/W4A4's dequantized activation).
GEMV_CONFIGS = ((8, 2, True, False), (8, 2, True, True), (8, 1, True, False), (4, 1, True, False), (8, 4, True, True),
                (4, 1, False, True), (8, 1, False, True), (8, 2, False, True))

# Tensor-core GEMV configurations: (warps per program, 64-k slabs per step, programs along K, warps per tile
# along K, AHEAD); the same sweep: warps sharing a tile along K win at M = 1 for N ≥ 11008 and for K ≥ 11008
# (16 warps), and at M = 16 everywhere; the split-K ones (atomics, zeroing and cast) stay for K-long shapes.
MMA_CONFIGS = ((8, 2, 1, 4, True), (4, 2, 1, 4, True), (8, 2, 1, 8, True), (16, 2, 1, 16, True), (2, 2, 1, 2, True),
               (4, 1, 1, 4, True), (1, 2, 4, 1, False), (1, 2, 8, 1, False))

# Offered at M = 1 as well: steps of four 64-k slabs (two g128 groups, 64 bytes of weights in flight per lane and
# step), 4 or 8 warps on one tile: 4 the fastest or tied at N ≥ 11008, K = 4096 in the 2026-12-01 04:25 sweep
# (22016×4096: 20.1 → 18.2 µs); 8 the fastest at 6144×4096 in the 08:47 and 08:53 sweeps (8.8 µs in a decode step's
# order against 9.0; kernels-h200.md); not offered at M > 1 (unmeasured there).
MMA_M1_CONFIGS = ((4, 4, 1, 4, True), (8, 4, 1, 8, True))


def mma_candidate(warps: int, slabs: int, split: int, ksplit: int = 1, ahead: bool = False) -> Candidate:
    name = f"mma_gemv_w{warps}_s{slabs}_k{split}" + (f"_q{ksplit}" if ksplit > 1 else "") + ("_ahead" if ahead else "")
    return Candidate(name, dict(kind="mma_gemv", WARPS=warps, SLABS=slabs, SPLIT_K=split, KSPLIT=ksplit,
                                AHEAD=ahead))


def gemv_candidate(bn: int, warps: int, fused: bool, asm: bool, ahead: bool = True) -> Candidate:
    """The word GEMV with BLOCK_N rows per program and ``warps`` warps along K (4 words, 16 bytes, per thread
    and row)."""
    bw = 4 * 32 * warps
    return Candidate(f"gemv_n{bn}_b{bw}_w{warps}{'_fused' if fused else ''}{'_ahead' if ahead else ''}",
                     dict(kind="gemv", BLOCK_N=bn, BW=bw, FUSED=fused, ASM=asm, AHEAD=ahead, num_warps=warps))


def candidates(M: int, N: int, K: int, group_size: int, asm: bool = False,
               x_dtype: torch.dtype | None = None) -> list[Candidate]:
    """Variants worth timing for this shape; the first is the untuned default. ``asm`` selects the
    inline-PTX unpacking (CUDA only; the tensor-core kernels use it for 16-bit activations) and, for
    16-bit ``x_dtype``, the GEMV that reads x itself (no prep launch)."""
    G = -(-K // group_size)
    out: list[Candidate] = []
    if asm and mma_gemv.supports(M, K, group_size, G, x_dtype):
        for warps, slabs, split, ksplit, ahead in MMA_CONFIGS:
            out.append(mma_candidate(warps, slabs, split, ksplit, ahead))
        if M == 1:
            out += [mma_candidate(*c) for c in MMA_M1_CONFIGS]
    if M == 1 and _word_gemv(K, group_size, G):
        fuse = asm and x_dtype in (torch.bfloat16, torch.float16)
        for bn, warps, fused, ahead in GEMV_CONFIGS:
            if fused and not fuse:
                continue
            out.append(gemv_candidate(bn, warps, fused, asm, ahead))
    if M <= 16:
        c = _chunk(group_size, G, 128)
        gather = c < 32
        use_asm = asm and not gather
        for bn, h, split, warps, stages in ((64, 64, 2, 4, 4), (64, 64, 1, 4, 4), (128, 64, 1, 8, 4),
                                            (128, 64, 2, 4, 4)):
            h = 32 if gather else min(h, c // 2)
            out.append(Candidate(f"skinny_n{bn}_h{h}_s{split}_w{warps}_st{stages}{'_gather' if gather else ''}",
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
    grid = (cdiv(N, bn), cdiv(packed.shape[1], h))
    launch(_dequant_kernel, grid,
           (packed, scales, zeros if zeros is not None else scales, out, N, K, packed.shape[1], group_size,
            packed.stride(0), scales.stride(0), out.stride(0)),
           dict(HAS_ZEROS=zeros is not None, GATHER=gather, BLOCK_N=bn, H=h), 4)
    return out


def run(cand: Candidate, x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None,
        group_size: int, bias: Tensor | None, row_scale: Tensor | None = None) -> Tensor:
    """``(x [M, K] @ Wᵀ)·row_scale (+ bias)`` with one candidate, rounded once to x's dtype; x must have unit
    stride along K; ``row_scale`` float32 ``[M]`` (contiguous) or None. The GEMVs apply the row scale to
    their float32 sums; the other kinds (never a one-token route's) take a float32 detour for it."""
    meta = cand.meta
    kind = meta["kind"]
    M, K = x.shape
    N, KH = packed.shape
    G = scales.shape[1]
    if kind == "mma_gemv":
        return mma_gemv.run(x, packed, scales, zeros, group_size, bias, meta, row_scale)
    if row_scale is not None and kind != "gemv":
        w = dequantize(packed, scales, zeros, group_size, K, torch.float32)
        y = torch.nn.functional.linear(x.float(), w) * row_scale.reshape(M, 1)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    if kind == "dequant_cublas":
        w = dequantize(packed, scales, zeros, group_size, K, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    zp = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    bp = bias if bias is not None else scales
    flags = dict(HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
    split = meta.get("SPLIT_K", 1)
    y = x.new_zeros((M, N), dtype=torch.float32) if split > 1 else x.new_empty((M, N))
    sg = 1 if G > 1 else 0  # scale column of a step: its group, or column 0 for per-channel weights
    if kind == "gemv":
        if packed.data_ptr() % 4 or packed.stride(0) % 4:  # a view off word alignment: copy it
            packed = packed.clone(memory_format=torch.contiguous_format)
        KW = KH // 4
        xp = x
        if meta["FUSED"] and x.data_ptr() % 16:  # a view off 16-byte alignment: copy it
            xp = x.clone(memory_format=torch.contiguous_format)
        if not meta["FUSED"]:
            xp = torch.empty((PLANES, KW), dtype=torch.float32, device=x.device)
            launch(*prep_launch(x, xp))
        launch(*gemv_launch(meta, xp, packed, scales, zeros, group_size, bias, y, meta["FUSED"], meta["ASM"],
                            row_scale))
    elif kind == "skinny":
        h = meta["H"]
        offset = {torch.bfloat16: 128.0, torch.float16: 1024.0}.get(x.dtype, 0.0)
        consts = dict(flags, GATHER=meta["GATHER"], BLOCK_M=16, BLOCK_N=meta["BLOCK_N"], H=h, SPLIT_K=split,
                      STEPS_PER_GROUP=max(1, group_size // (2 * h)) if G > 1 else 1,
                      DOT_PRECISION=_precision(x), OFFSET=offset, ASM=meta["ASM"] and offset > 0)
        launch(_skinny_kernel, (cdiv(N, meta["BLOCK_N"]), split),
               (x, packed, scales, zp, bp, y, M, N, K, KH, group_size, x.stride(0), packed.stride(0),
                scales.stride(0), sg, y.stride(0)), consts, meta["num_warps"], meta["num_stages"])
    else:
        consts = dict(flags, GATHER=meta["GATHER"], BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"],
                      BLOCK_K=meta["BLOCK_K"], GROUP_M=meta["GROUP_M"], DOT_PRECISION=_precision(x))
        launch(_gemm_kernel, (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),),
               (x, packed, scales, zp, bp, y, M, N, K, KH, G, group_size, x.stride(0), packed.stride(0),
                scales.stride(0), y.stride(0)), consts, meta["num_warps"], meta["num_stages"])
    return y.to(x.dtype) if split > 1 else y


def prep_launch(x: Tensor, xp: Tensor) -> tuple:
    """``launch`` arguments of ``_gemv_prep_kernel`` (x ``[1, K]`` → its planes ``xp [PLANES, K/8]``)."""
    KW = xp.shape[1]
    return _gemv_prep_kernel, (cdiv(KW, 256),), (x, xp, KW), dict(BLOCK=256), 4


def gemv_launch(meta: dict, xp: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                bias: Tensor | None, y: Tensor, fused: bool, asm: bool, row_scale: Tensor | None = None) -> tuple:
    """``launch`` arguments of the word GEMV: ``xp`` is x itself (``fused``) or its planes; ``packed`` must
    be word-aligned (``packed.stride(0) % 4 == 0``); ``row_scale`` the token's float32 output scale or None."""
    N, KH = packed.shape
    G = scales.shape[1]
    KW = KH // 4
    chunk = _chunk_words(group_size, G)
    consts = dict(HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, HAS_RS=row_scale is not None,
                  BLOCK_N=meta["BLOCK_N"], BW=meta["BW"], CHUNK=chunk, EVEN=KW % meta["BW"] == 0, FUSED=fused, ASM=asm,
                  AHEAD=meta.get("AHEAD", False))
    args = (xp, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
            row_scale if row_scale is not None else scales, *_gemv_ints(packed, scales, group_size))
    return _gemv_kernel, (cdiv(N, meta["BLOCK_N"]),), args, consts, meta["num_warps"]


def _gemv_ints(packed: Tensor, scales: Tensor, group_size: int) -> tuple:
    """The word GEMV's integer arguments: N, KW, words per group, the strides."""
    G = scales.shape[1]
    KW = packed.shape[1] // 4
    return (packed.shape[0], KW, group_size // 8 if G > 1 else KW, packed.stride(0) // 4, scales.stride(0),
            1 if G > 1 else 0)


def _chunk_words(group_size: int, G: int) -> int:
    return 4 if G == 1 or (group_size // 8) % 4 == 0 else 1  # a thread's 4 words in one group


def codes_launch(meta: dict, a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, scales: Tensor,
                 zeros: Tensor | None, group_size: int, bias: Tensor | None, y: Tensor) -> tuple:
    """``launch`` arguments of ``_gemv_codes_kernel`` (one token of int8 codes ``a``, 4-byte aligned, into
    ``y``); ``packed`` word-aligned."""
    N, KH = packed.shape
    G = scales.shape[1]
    KW = KH // 4
    consts = dict(HAS_AZ=za is not None, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
                  BLOCK_N=meta["BLOCK_N"], BW=meta["BW"], CHUNK=_chunk_words(group_size, G), EVEN=KW % meta["BW"] == 0,
                  ASM=a.is_cuda, AHEAD=meta.get("AHEAD", False))
    args = (a, sa, za if za is not None else sa, packed, scales, zeros if zeros is not None else scales,
            bias if bias is not None else scales, y, *_gemv_ints(packed, scales, group_size))
    return _gemv_codes_kernel, (cdiv(N, meta["BLOCK_N"]),), args, consts, meta["num_warps"]


def gemv_codes(meta: dict, a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, scales: Tensor,
               zeros: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``((a − za)·sa) @ Wᵀ (+ bias)`` in ``out_dtype`` for one token of int8 codes ``a [1, K]`` (``sa``,
    ``za`` of shape [1]) in one launch: the word GEMV (``meta``: BLOCK_N, BW, num_warps, AHEAD) reads the
    codes itself as the integers ``a − za`` and scales its row sums by ``sa`` (the same sum as
    dequantizing first: ``Σ_k (a − za)·sa·ŵ = sa·Σ_k (a − za)·ŵ``).
    Needs ``_word_gemv(K, group_size, G)``."""
    N = packed.shape[0]
    if packed.data_ptr() % 4 or packed.stride(0) % 4:  # a view off word alignment: copy it
        packed = packed.clone(memory_format=torch.contiguous_format)
    if a.data_ptr() % 8:  # codes are read as 8-byte words
        a = a.clone(memory_format=torch.contiguous_format)
    y = torch.empty((1, N), dtype=out_dtype, device=a.device)
    launch(*codes_launch(meta, a, sa, za, packed, scales, zeros, group_size, bias, y))
    return y


# The one-token GEMV that quantizes the 16-bit activation itself: (BLOCK_N, num_warps, AHEAD). More rows per
# program than the codes GEMV's configurations: each program also reads the whole activation row once.
ACT_CONFIGS = ((8, 1, False), (8, 2, True), (16, 2, True), (16, 4, True), (32, 4, True))


def act_candidates() -> list[Candidate]:
    return [Candidate(f"act_gemv_n{bn}_w{warps}{'_ahead' if ahead else ''}",
                      dict(kind="act_gemv", BLOCK_N=bn, BW=128 * warps, AHEAD=ahead, num_warps=warps))
            for bn, warps, ahead in ACT_CONFIGS]


def act_launch(meta: dict, x: Tensor, bits: int, symmetric: bool, clip: float, packed: Tensor, scales: Tensor,
               zeros: Tensor | None, group_size: int, bias: Tensor | None, y: Tensor) -> tuple:
    """``launch`` arguments of ``_gemv_act_kernel`` (one token of 16-bit x, 16-byte aligned, into ``y``);
    ``packed`` word-aligned."""
    N, KH = packed.shape
    G = scales.shape[1]
    KW = KH // 4
    K = x.shape[-1]
    asm = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    consts = dict(BITS=bits, SYMMETRIC=symmetric, XB=min(triton.next_power_of_2(K), 2048),
                  HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=meta["BLOCK_N"], BW=meta["BW"],
                  CHUNK=_chunk_words(group_size, G), EVEN=KW % meta["BW"] == 0, ASM=asm,
                  AHEAD=meta.get("AHEAD", False))
    n, kw, gw, swn, ssn, ssg = _gemv_ints(packed, scales, group_size)
    args = (x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
            n, K, kw, gw, swn, ssn, ssg, float(clip))
    return _gemv_act_kernel, (cdiv(N, meta["BLOCK_N"]),), args, consts, meta["num_warps"]


def gemv_act(meta: dict, x: Tensor, bits: int, symmetric: bool, clip: float, packed: Tensor, scales: Tensor,
             zeros: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``quantize_per_token(x, bits, symmetric, clip)`` then ``linear_w4a8`` of its codes, for one token ``x
    [1, K]`` in one launch (``_gemv_act_kernel``; the same codes, so the same sum). Needs
    ``_word_gemv(K, group_size, G)``."""
    N = packed.shape[0]
    if packed.data_ptr() % 4 or packed.stride(0) % 4:  # a view off word alignment: copy it
        packed = packed.clone(memory_format=torch.contiguous_format)
    if x.data_ptr() % 16 or not x.is_contiguous():  # 16-byte loads of eight activations
        x = x.clone(memory_format=torch.contiguous_format)
    y = torch.empty((1, N), dtype=out_dtype, device=x.device)
    launch(*act_launch(meta, x, bits, symmetric, clip, packed, scales, zeros, group_size, bias, y))
    return y


def _bucket(M: int) -> int:
    return M if M <= 16 else min(1 << (M - 1).bit_length(), 8192)


def _tune_key(x: Tensor, packed: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None) -> tuple:
    M, K = x.shape
    return (_bucket(M), packed.shape[0], K, group_size, zeros is not None, bias is not None, x.dtype)


def chosen_candidate(x: Tensor, packed: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None
                     ) -> Candidate | None:
    """The tuned candidate ``linear`` runs for ``x [M, K]`` (None before its first call)."""
    family = "w4a16_decode" if x.shape[0] <= 16 else "w4a16_prefill"
    return chosen(family, _tune_key(x, packed, zeros, group_size, bias), x.device)


def linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
           bias: Tensor | None, row_scale: Tensor | None = None) -> Tensor:
    """The tuned W4A16 linear for ``x [M, K]`` (times ``row_scale [M]`` float32 before the bias, if given; the
    choice is tuned without it)."""
    M, K = x.shape
    N = packed.shape[0]
    key = _tune_key(x, packed, zeros, group_size, bias)
    family = "w4a16_decode" if M <= 16 else "w4a16_prefill"
    device = x.device
    cand = chosen(family, key, device) or choose(
        family, key, lambda: candidates(M, N, K, group_size, x.is_cuda, x.dtype),
        lambda c: run(c, x, packed, scales, zeros, group_size, bias), device,
        lambda: [lambda c, w=w: run(c, x, *w, group_size, bias) for w in copies((packed, scales, zeros), device)])
    return run(cand, x, packed, scales, zeros, group_size, bias, row_scale)
