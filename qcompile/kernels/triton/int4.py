"""Triton helpers that turn canonical int4 weights into numbers: the one dequantization front end
of every INT4 kernel (``w4a16.py`` and ``w4ax.py``).

Canonical layout (``qcompile.quant.formats``): byte ``j`` of a row holds code ``k = 2j`` in its low
and ``k = 2j + 1`` in its high nibble; read as a little-endian int32 word, word ``w`` holds the eight
codes ``k = 8w + i`` at bits ``4i .. 4i + 3``.

Codes become floats without an integer→float conversion (a quarter-rate instruction) by writing the
nibble into the mantissa of a power of two ("magic number"): with ``OFFSET = 2^e`` whose mantissa
unit is 1, ``bits(OFFSET) | q`` *is* the float ``OFFSET + q``, exactly. The offset is taken off
after the multiply-accumulate, once per group: ``Σ x·(OFFSET + q) − (OFFSET + z)·Σ x = Σ x·(q − z)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack(w, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Bytes ``w [ROWS, COLS/2]`` → codes ``[ROWS, COLS]`` (uint8) in K order: the low and high
    nibbles joined along a new last axis that stays inside each thread, so the reshape is free."""
    return tl.reshape(tl.join(w & 15, w >> 4), (ROWS, COLS))


@triton.jit
def offset_codes(n, dt: tl.constexpr):
    """Codes ``n`` (integers < 16) as ``OFFSET + n`` in ``dt`` (bfloat16: 128 = 0x4300, float16:
    1024 = 0x6400, float32: 2^23 = 0x4B000000): one bitwise op per code."""
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
def offset_codes_asm(w, dt: tl.constexpr):
    """``(offset_codes(w & 15, dt), offset_codes(w >> 4, dt))`` for 16-bit dt, four bytes at a time
    (PTX, CUDA only): ``prmt`` spreads two bytes into the halves of a word, one ``lop3`` masks a
    nibble into each half and ORs in OFFSET — two codes per instruction."""
    if dt == tl.bfloat16:
        return tl.inline_asm_elementwise(_PAIRS_BF16, "=r,=r,=r,=r,r", [w],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(_PAIRS_F16, "=r,=r,=r,=r,r", [w],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


# Word → eight float32 codes. Byte b moves to bits 15..22 (one shift), then one lop3 per nibble keeps
# bits 15..18 (the low nibble) or 19..22 (the high one) and ORs in a power of two whose mantissa unit
# sits at the nibble's lowest bit: 256.0 = 0x43800000 (bit 15 worth 1) and 16.0 = 0x41800000 (bit 19
# worth 1). So even codes read 256 + q and odd codes 16 + q, exactly, and pair with x as it is:
# Σ_i c_i·x_i = Σ_i q_i·x_i + 256·Σ_even x + 16·Σ_odd x.
_WORD_ASM = tl.constexpr("""
{
.reg .b32 b0, b1, b2, b3, m0, m1, k0, k1;
mov.b32 m0, 0x00078000;
mov.b32 m1, 0x00780000;
mov.b32 k0, 0x43800000;
mov.b32 k1, 0x41800000;
shl.b32 b0, $8, 15;
shl.b32 b1, $8, 7;
shr.b32 b2, $8, 1;
shr.b32 b3, $8, 9;
lop3.b32 $0, b0, m0, k0, 0xEA;
lop3.b32 $1, b0, m1, k1, 0xEA;
lop3.b32 $2, b1, m0, k0, 0xEA;
lop3.b32 $3, b1, m1, k1, 0xEA;
lop3.b32 $4, b2, m0, k0, 0xEA;
lop3.b32 $5, b2, m1, k1, 0xEA;
lop3.b32 $6, b3, m0, k0, 0xEA;
lop3.b32 $7, b3, m1, k1, 0xEA;
}
""")
EVEN_OFFSET = tl.constexpr(256.0)  # what word_codes adds to an even code
ODD_OFFSET = tl.constexpr(16.0)  # … and to an odd one


@triton.jit
def _word_code(w, SHIFT: tl.constexpr, MASK: tl.constexpr, MAGIC: tl.constexpr):
    if SHIFT > 0:
        v = w << SHIFT
    else:
        v = w >> (-SHIFT)  # arithmetic shift: the copied sign bits land above the mask
    return ((v & MASK) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def word_codes(w, ASM: tl.constexpr):
    """An int32 word of eight canonical codes → eight float32 tiles ``EVEN_OFFSET + q_i`` (even i)
    and ``ODD_OFFSET + q_i`` (odd i). ASM: the same in 12 PTX instructions."""
    if ASM:
        return tl.inline_asm_elementwise(_WORD_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    return (_word_code(w, 15, 0x78000, 0x43800000), _word_code(w, 15, 0x780000, 0x41800000),
            _word_code(w, 7, 0x78000, 0x43800000), _word_code(w, 7, 0x780000, 0x41800000),
            _word_code(w, -1, 0x78000, 0x43800000), _word_code(w, -1, 0x780000, 0x41800000),
            _word_code(w, -9, 0x78000, 0x43800000), _word_code(w, -9, 0x780000, 0x41800000))


# Eight 16-bit activations ``x[8w … 8w + 7]`` (16 bytes, 16-byte aligned) → eight float32, loaded by
# the thread that holds word w: one vector load, then one instruction per value (bfloat16: its bits
# shifted into the high half of a float32; float16: a conversion). In PTX because Triton gives eight
# stride-8 loads ``x[8w + i]`` a layout of their own and converts them through shared memory; an
# elementwise asm stays in its operand's layout. Marked pure: x is read-only while a kernel runs.
_XWORD_BF16 = tl.constexpr("""
{
.reg .b32 a, b, c, d;
ld.global.v4.b32 {a, b, c, d}, [$8];
shl.b32 $0, a, 16;
and.b32 $1, a, 0xFFFF0000;
shl.b32 $2, b, 16;
and.b32 $3, b, 0xFFFF0000;
shl.b32 $4, c, 16;
and.b32 $5, c, 0xFFFF0000;
shl.b32 $6, d, 16;
and.b32 $7, d, 0xFFFF0000;
}
""")
_XWORD_F16 = tl.constexpr("""
{
.reg .b32 a, b, c, d;
.reg .b16 l, h;
ld.global.v4.b32 {a, b, c, d}, [$8];
mov.b32 {l, h}, a;
cvt.f32.f16 $0, l;
cvt.f32.f16 $1, h;
mov.b32 {l, h}, b;
cvt.f32.f16 $2, l;
cvt.f32.f16 $3, h;
mov.b32 {l, h}, c;
cvt.f32.f16 $4, l;
cvt.f32.f16 $5, h;
mov.b32 {l, h}, d;
cvt.f32.f16 $6, l;
cvt.f32.f16 $7, h;
}
""")


@triton.jit
def word_activations(ptr, dt: tl.constexpr):
    """``x[8w + i]`` for i = 0 … 7 as float32 tiles, from a tile of 16-byte aligned pointers
    ``x + 8w`` (PTX, CUDA only): one 16-byte load per word, in the caller's layout."""
    addr = ptr.to(tl.uint64, bitcast=True)
    if dt == tl.bfloat16:
        return tl.inline_asm_elementwise(_XWORD_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,l", [addr],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_XWORD_F16, "=r,=r,=r,=r,=r,=r,=r,=r,l", [addr],
                                     dtype=(tl.float32,) * 8, is_pure=True, pack=1)


# Eight int8 activation codes ``a[8w … 8w + 7]`` (8 bytes, 8-byte aligned) → eight float32 ``2^23 + 128 + a``,
# exact: one 8-byte load by the thread that holds word w, then per code one shift and one lop3 that keeps
# the byte, flips its sign bit (``a + 128`` in [0, 255]) and puts it in the mantissa of 2^23.
_XCODES = tl.constexpr("""
{
.reg .b32 a, b, t;
ld.global.v2.b32 {a, b}, [$8];
lop3.b32 $0, a, 0xFF, 0x4B000080, 0x6A;
shr.b32 t, a, 8;
lop3.b32 $1, t, 0xFF, 0x4B000080, 0x6A;
shr.b32 t, a, 16;
lop3.b32 $2, t, 0xFF, 0x4B000080, 0x6A;
shr.b32 t, a, 24;
lop3.b32 $3, t, 0xFF, 0x4B000080, 0x6A;
lop3.b32 $4, b, 0xFF, 0x4B000080, 0x6A;
shr.b32 t, b, 8;
lop3.b32 $5, t, 0xFF, 0x4B000080, 0x6A;
shr.b32 t, b, 16;
lop3.b32 $6, t, 0xFF, 0x4B000080, 0x6A;
shr.b32 t, b, 24;
lop3.b32 $7, t, 0xFF, 0x4B000080, 0x6A;
}
""")


@triton.jit
def word_codes8(ptr):
    """``2^23 + 128 + a[8w + i]`` for i = 0 … 7 as float32 tiles, from a tile of 8-byte aligned int8 pointers
    ``a + 8w`` (PTX, CUDA only): one 8-byte load per word, in the caller's layout."""
    addr = ptr.to(tl.uint64, bitcast=True)
    return tl.inline_asm_elementwise(_XCODES, "=r,=r,=r,=r,=r,=r,=r,=r,l", [addr], dtype=(tl.float32,) * 8,
                                     is_pure=True, pack=1)
