"""The Triton kernels, run by Triton's interpreter on CPU tensors, against the reference ops.

Shapes are fuzzed (seeded) over M, N, K, group size and odd sizes; every kernel variant the
autotuner may choose is run, since any of them can end up serving a shape on the GPU. Tolerances:
bfloat16/float16 outputs are compared at their rounding (the interpreter truncates float32 →
bfloat16 where a GPU rounds, so bf16 gets 1e-2), float32 at 1e-5; quantization codes must match
exactly without rotation and to within one step on < 0.2% of elements after a rotation (float32
summation order differs from the reference's fast Walsh–Hadamard transform).
"""

import random

import pytest
import torch

from qcompile.kernels import reference
from qcompile.kernels.hadamard_plan import plan_unit
from qcompile.kernels.triton import rotate_quant, w4a16, w4ax

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _weight(n, k, g, asym, gen):
    groups = -(-k // g)
    packed = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=gen) if asym else None
    return packed, scales, zeros


def _shape(seed, m_choices):
    rnd = random.Random(seed)
    m = rnd.choice(m_choices)
    n = rnd.randint(1, 80)
    k = rnd.choice([rnd.randint(16, 700), rnd.choice([64, 256, 576, 1536])])
    g = rnd.choice([k, 32, 64, 128, 48, 40, rnd.randint(2, k)])
    return m, n, k, min(g, k), rnd.random() < 0.5, rnd.random() < 0.5


@pytest.mark.parametrize("seed", range(14))
def test_w4a16_variants(seed):
    m, n, k, g, asym, has_bias = _shape(seed, [1, 1, 2, 5, 16, 17, 40])
    gen = torch.Generator().manual_seed(seed)
    dt = [torch.bfloat16, torch.float16, torch.float32][seed % 3]
    packed, scales, zeros = _weight(n, k, g, asym, gen)
    x = torch.randn(m, k, generator=gen).to(dt)
    bias = torch.randn(n, generator=gen).to(dt) if has_bias else None
    ref = reference.linear_w4a16(x.float(), packed, scales, zeros, g, None if bias is None else bias.float())
    cands = w4a16.candidates(m, n, k, g)
    kinds = {c.meta["kind"] for c in cands}
    word_gemv = k % 8 == 0 and (g >= k or g % 8 == 0)  # the word GEMV reads K as int32 words of 8 codes
    expect = {"gemv", "skinny"} if m == 1 and word_gemv else {"skinny"} if m <= 16 else {"gemm", "dequant_cublas"}
    assert kinds == expect
    for cand in cands:
        y = w4a16.run(cand, x, packed, scales, zeros, g, bias)
        assert y.dtype == dt and y.shape == (m, n)
        assert _rel(y, ref) < TOL[dt], (cand.name, _rel(y, ref))


@pytest.mark.parametrize("n, k, g, asym, has_bias, dt", [
    (40, 576, 128, True, True, torch.bfloat16), (33, 256, 256, False, False, torch.float32),
    (17, 320, 64, True, False, torch.float16), (9, 96, 32, False, True, torch.bfloat16),
    (5, 120, 40, True, True, torch.float32), (70, 1088, 128, False, False, torch.bfloat16)])
def test_word_gemv(n, k, g, asym, has_bias, dt):
    """The M = 1 word GEMV on shapes it serves: partial last groups, odd group counts, every dtype,
    and a weight view at an odd byte offset (copied to aligned words)."""
    gen = torch.Generator().manual_seed(k + n)
    packed, scales, zeros = _weight(n, k, g, asym, gen)
    x = torch.randn(1, k, generator=gen).to(dt)
    bias = torch.randn(n, generator=gen).to(dt) if has_bias else None
    ref = reference.linear_w4a16(x.float(), packed, scales, zeros, g, None if bias is None else bias.float())
    cands = [c for c in w4a16.candidates(1, n, k, g) if c.meta["kind"] == "gemv"]
    assert cands
    for cand in cands:
        assert _rel(w4a16.run(cand, x, packed, scales, zeros, g, bias), ref) < TOL[dt], cand.name
    for ahead in (False, True):  # scales loaded where used, or a step ahead with the words
        cand = w4a16.gemv_candidate(4, 2, False, False, ahead)
        assert _rel(w4a16.run(cand, x, packed, scales, zeros, g, bias), ref) < TOL[dt], cand.name
    shifted = torch.cat([torch.zeros(n, 1, dtype=torch.uint8), packed], dim=1)[:, 1:]
    assert shifted.data_ptr() % 4 and torch.equal(shifted, packed)
    assert _rel(w4a16.run(cands[0], x, shifted, scales, zeros, g, bias), ref) < TOL[dt]


def test_word_gemv_fused_only_for_16bit_cuda():
    """The GEMV that reads x itself (one 16-byte PTX load per word, so CUDA only, not interpretable)
    is offered only with asm and a 16-bit activation; the GPU side is checked by the benchmark's
    --quick-check, every candidate against the reference."""
    def fused(asm, dt):
        return [c.name for c in w4a16.candidates(1, 4096, 4096, 128, asm, dt) if c.meta.get("FUSED")]
    assert fused(True, torch.bfloat16) and fused(True, torch.float16)
    assert not fused(True, torch.float32) and not fused(False, torch.bfloat16)


@pytest.mark.parametrize("seed", range(10))
def test_w4ax_variants(seed):
    m, n, k, g, asym_w, has_bias = _shape(100 + seed, [1, 3, 16, 20, 64])
    if g < k and g % 32:
        g = 32 if k > 32 else k  # the int8 kernel needs groups of a multiple of 32 (checked below)
    gen = torch.Generator().manual_seed(seed)
    bits, sym_act = [(8, True), (4, False), (4, True), (8, False)][seed % 4]
    packed, scales, zeros = _weight(n, k, g, asym_w, gen)
    x = torch.randn(m, k, generator=gen)
    codes, sa, za = reference.quantize_per_token(x, bits, sym_act, 0.9)
    za = None if sym_act else za
    bias = torch.randn(n, generator=gen) if has_bias else None
    out_dtype = [torch.float32, torch.bfloat16][seed % 2]
    ref = reference.linear_w4a8(codes, sa, za, packed, scales, zeros, g, bias, torch.float32)
    for cand in w4ax.candidates(m, n, k, g):
        y = w4ax.run(cand, codes, sa.reshape(-1), None if za is None else za.reshape(-1), packed, scales, zeros, g,
                     bias, out_dtype)
        assert y.dtype == out_dtype
        assert _rel(y, ref) < (1e-5 if out_dtype == torch.float32 else 1e-2), cand.name


def test_w4ax_refuses_groups_it_cannot_tile():
    from qcompile.errors import ShapeError

    with pytest.raises(ShapeError, match="multiple of 32"):
        w4ax.candidates(4, 64, 576, 48)


@pytest.mark.parametrize(
    "rows, n, block, dt",
    [(3, 64, 0, torch.float32), (5, 576, 0, torch.bfloat16), (2, 1536, 0, torch.float16), (2, 4096, 0, torch.bfloat16),
     (3, 1024, 256, torch.float32), (17, 12, 0, torch.float32), (4, 96, 0, torch.bfloat16), (2, 5120, 0, torch.float32),
     (1, 2048, 128, torch.bfloat16)],
)
def test_hadamard_and_rotated_quantization(rows, n, block, dt):
    unit = block or n
    assert plan_unit(unit) is not None
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(rows, n, generator=gen) * 2).to(dt)
    x[:, 1] += 25.0
    y = rotate_quant.hadamard(x, unit)
    assert y.dtype == dt
    assert _rel(y, reference.hadamard(x, block)) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dt]
    for bits, sym in ((8, True), (4, False)):
        c, s, z = rotate_quant.quantize_per_token(x, bits, sym, 0.9, unit)
        rc, rs, rz = reference.quantize_per_token(x, bits, sym, 0.9, True, block)
        d = (c.int() - rc.int()).abs()
        assert d.max() <= 1 and d.float().mean() < 2e-3
        assert _rel(s, rs.reshape(-1)) < 5e-5  # the rotation is computed to ~2^-17 relative
        assert (z.int() - rz.reshape(-1).int()).abs().max() <= 1


@pytest.mark.parametrize("n", [100, 2048, 5000])
@pytest.mark.parametrize("bits, sym, clip", [(8, True, 1.0), (4, False, 0.9), (8, False, 1.0), (4, True, 0.8)])
def test_quantization_is_exact_including_ties(n, bits, sym, clip):
    gen = torch.Generator().manual_seed(n + bits)
    x = (torch.randn(6, n, generator=gen) * 3).to(torch.bfloat16)
    x[:, 0] = 127.0  # symmetric 8-bit at clip 1: scale exactly 1, so the next values are exact ties
    x[:, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5], dtype=torch.bfloat16)
    c, s, z = rotate_quant.quantize_per_token(x, bits, sym, clip, None)
    rc, rs, rz = reference.quantize_per_token(x, bits, sym, clip)
    assert torch.equal(c, rc) and torch.equal(s, rs.reshape(-1)) and torch.equal(z, rz.reshape(-1))
    if bits == 8 and sym and clip == 1.0:
        assert c[0, 1:9].tolist() == [0, 2, 2, 0, -2, -2, 4, 126]  # half to even, like torch.round


def test_plan_unit_sizes():
    assert plan_unit(4096).tile == 4096 and (plan_unit(4096).P1, plan_unit(4096).P2) == (64, 64)
    assert (plan_unit(576).MP, plan_unit(576).P2) == (64, 16)  # 36·16: m padded to 64
    assert plan_unit(12).MP == 16 and plan_unit(12).min_rows == 16  # dense unit
    assert plan_unit(14336).tile == 16384
    assert plan_unit(28672) is None  # 28·1024 pads to 32768 > MAX_TILE: torch rotates it
    assert plan_unit(11008) is None  # no Hadamard of that size at all


@pytest.mark.parametrize("asym_w, sym_act, has_bias", [(True, False, True), (False, True, False)])
def test_w4ax_unpack_int_mm_strategy(asym_w, sym_act, has_bias):
    gen = torch.Generator().manual_seed(7)
    m, n, k = 24, 40, 136
    packed, scales, zeros = _weight(n, k, k, asym_w, gen)
    codes, sa, za = reference.quantize_per_token(torch.randn(m, k, generator=gen), 4, sym_act, 0.9)
    za = None if sym_act else za
    bias = torch.randn(n, generator=gen) if has_bias else None
    cand = w4ax.candidates(m, n, k, k)[-1]
    assert cand.name == "unpack_int_mm"
    y = w4ax.run(cand, codes, sa.reshape(-1), None if za is None else za.reshape(-1), packed, scales, zeros, k, bias,
                 torch.float32)
    ref = reference.linear_w4a8(codes, sa, za, packed, scales, zeros, k, bias, torch.float32)
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("asym_w, has_bias", [(True, True), (False, False)])
def test_w4a4_unpack_fp8_mm_strategy(asym_w, has_bias):
    """4-bit codes and ŵ are exact in float8 e4m3: the FP8 GEMM matches the reference to bf16 rounding."""
    gen = torch.Generator().manual_seed(9)
    m, n, k = 24, 48, 160
    packed, scales, zeros = _weight(n, k, k, asym_w, gen)
    codes, sa, _ = reference.quantize_per_token(torch.randn(m, k, generator=gen), 4, True, 0.9)
    bias = torch.randn(n, generator=gen) if has_bias else None
    assert "unpack_fp8_mm" in {c.name for c in w4ax.candidates(m, n, k, k, fp8=True)}
    assert "unpack_fp8_mm" not in {c.name for c in w4ax.candidates(m, n, k, k)}
    y = w4ax.unpack_fp8_mm(codes, sa.reshape(-1), packed, scales, zeros, bias, torch.bfloat16)
    ref = reference.linear_w4a8(codes, sa, None, packed, scales, zeros, k, bias, torch.float32)
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < 1e-2


def test_block_diagonal_rotation_fused_path(monkeypatch):
    """Many rows take the fused two-pass kernel (few rows rotate blocks in parallel first): same codes."""
    monkeypatch.setattr(rotate_quant, "SPLIT_ROWS", 0)
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 1024, generator=gen) * 2).to(torch.bfloat16)
    for bits, sym in ((8, True), (4, False)):
        c, s, z = rotate_quant.quantize_per_token(x, bits, sym, 0.9, 256)
        rc, rs, rz = reference.quantize_per_token(x, bits, sym, 0.9, True, 256)
        d = (c.int() - rc.int()).abs()
        assert d.max() <= 1 and d.float().mean() < 2e-3
        assert _rel(s, rs.reshape(-1)) < 5e-5


def test_mma_gemv_offered_only_where_it_applies():
    """The tensor-core GEMV (PTX, so CUDA only; checked on the GPU by the benchmark's --quick-check) is
    a candidate for ≤ 16 tokens of 16-bit x with K a multiple of 64 and groups of whole 64-k slabs;
    its derived layout is made once per weight and remade after an in-place change."""
    from qcompile.kernels.triton import mma_gemv

    def offered(m, k, g, asm=True, dt=torch.bfloat16):
        return any(c.meta["kind"] == "mma_gemv" for c in w4a16.candidates(m, 4096, k, g, asm, dt))
    assert offered(1, 4096, 128) and offered(16, 576, 64) and offered(3, 4096, 4096)
    assert not offered(17, 4096, 128) and not offered(1, 4096, 32) and not offered(1, 4000, 4000)
    assert not offered(1, 4096, 128, asm=False) and not offered(1, 4096, 128, dt=torch.float32)
    packed = torch.randint(0, 256, (20, 64), dtype=torch.uint8)
    first = mma_gemv.tiles_of(packed, 128)
    assert mma_gemv.tiles_of(packed, 128) is first
    packed[0, 0] ^= 1
    again = mma_gemv.tiles_of(packed, 128)
    assert again is not first and not torch.equal(again, first)


@pytest.mark.parametrize("n, k, g, asym, has_bias, dt", [
    (40, 576, 128, True, True, torch.bfloat16), (33, 256, 256, False, False, torch.float32),
    (17, 320, 64, True, False, torch.float16)])
def test_row_scale_before_the_one_rounding(n, k, g, asym, has_bias, dt):
    """``run(..., row_scale)`` = ``(x @ Ŵᵀ)·r + bias`` rounded once: the word GEMV (scales a step
    ahead or not) scales its float32 row sums; the other kinds (the M > 1 strategies) take the float32 detour."""
    gen = torch.Generator().manual_seed(n + k)
    packed, scales, zeros = _weight(n, k, g, asym, gen)
    bias = torch.randn(n, generator=gen).to(dt) if has_bias else None
    for m in (1, 3):
        x = torch.randn(m, k, generator=gen).to(dt)
        r = torch.rand(m, generator=gen) * 4 + 0.25
        ref = reference.linear_w4a16(x.float(), packed, scales, zeros, g, None) * r[:, None]
        ref = ref if bias is None else ref + bias.float()
        cands = w4a16.candidates(m, n, k, g)
        if m == 1:
            cands.append(w4a16.gemv_candidate(4, 2, False, False, False))
        for cand in cands:
            y = w4a16.run(cand, x, packed, scales, zeros, g, bias, r)
            assert y.dtype == dt and _rel(y, ref) < TOL[dt], (cand.name, _rel(y, ref))


def test_four_slab_steps_offered_at_one_token_only():
    """The 4-slab tensor-core GEMV is an M = 1 candidate of 16-bit x on CUDA (unmeasured at M > 1); its steps fall
    back to fewer slabs where four would straddle K or more than two groups."""
    from qcompile.kernels.triton import mma_gemv

    def names(m, asm=True, dt=torch.bfloat16):
        return {c.name for c in w4a16.candidates(m, 4096, 4096, 128, asm, dt)}
    four = {w4a16.mma_candidate(*c).name for c in w4a16.MMA_M1_CONFIGS}
    assert four and four <= names(1) and not four & names(2) and not four & names(1, asm=False)
    x = torch.randn(1, 1024).bfloat16()
    y = torch.empty(1, 64).bfloat16()
    tiles = torch.zeros((4, 16, 32, 4), dtype=torch.int32)

    def slabs(g, n, k=1024):
        sc = torch.ones(64, max(1, k // g)).half()
        meta = w4a16.mma_candidate(4, n, 1, 4, True).meta
        fn, grid, args, c, warps = mma_gemv.launch_args(x, tiles[:, :k // 64], sc, None, g, None, y, meta, None)
        assert len(args) + len(c) == len(fn.arg_names)
        return c["SLABS"]
    assert slabs(128, 4) == 4 and slabs(256, 4) == 4 and slabs(1024, 4) == 4  # two groups, one, per-channel
    assert slabs(64, 4) == 1 and slabs(128, 4, k=960) == 1 and slabs(64, 2) == 1


@pytest.mark.parametrize("seed", range(5))
def test_w4ax_codes_gemv_at_one_token(seed):
    """The decode candidate where the word GEMV reads the int8 codes itself (one launch): offered at M = 1
    only, and equal to the reference for symmetric and asymmetric activations, grouped and per-channel
    weights, K a multiple of the step (seed 4) or not."""
    gen = torch.Generator().manual_seed(seed)
    n, k = 40 + seed, [256, 576, 1536, 64, 2048][seed]
    g = [k, 32, 128, 64, 128][seed]
    packed, scales, zeros = _weight(n, k, g, seed % 2 == 1, gen)
    bits, sym = [(8, True), (4, False), (4, True), (8, False), (8, False)][seed]
    codes, sa, za = reference.quantize_per_token(torch.randn(1, k, generator=gen), bits, sym, 0.9)
    za = None if sym else za
    bias = torch.randn(n, generator=gen) if seed % 2 == 0 else None
    ref = reference.linear_w4a8(codes, sa, za, packed, scales, zeros, g, bias, torch.float32)
    cands = [c for c in w4ax.candidates(1, n, k, g) if c.meta.get("kind") == "codes_gemv"]
    assert cands and not any(c.meta.get("kind") == "codes_gemv" for c in w4ax.candidates(2, n, k, g))
    for cand in cands:
        for out_dtype in (torch.float32, torch.bfloat16):
            y = w4ax.run(cand, codes, sa.reshape(-1), None if za is None else za.reshape(-1), packed, scales, zeros,
                         g, bias, out_dtype)
            assert y.dtype == out_dtype and y.shape == (1, n)
            assert _rel(y, ref) < TOL[out_dtype], cand.name


@pytest.mark.parametrize("seed", range(5))
def test_dynamic_gemv_quantizes_the_token_itself(seed):
    """``linear_w4ax_dynamic``'s one-token GEMV (it quantizes the 16-bit x in its prologue) and the two-launch
    way it replaces give the reference quantize-then-linear: symmetric and asymmetric 8/4-bit activations,
    clip, grouped and per-channel weights, K a multiple of the step or not, the row's absmax in any chunk."""
    gen = torch.Generator().manual_seed(seed)
    n, k = 24 + seed, [256, 576, 1536, 64, 2048 + 512][seed]
    g = [k, 32, 128, 64, 128][seed]
    packed, scales, zeros = _weight(n, k, g, seed % 2 == 1, gen)
    bits, sym = [(8, True), (4, False), (4, True), (8, False), (4, True)][seed]
    dt = torch.float16 if seed == 3 else torch.bfloat16
    x = torch.randn(1, k, generator=gen)
    x[0, (97 * seed) % k] = 9.0 * (-1) ** seed  # the peak in some chunk of the prologue's loop
    x = x.to(dt)
    clip = 0.9 if seed % 2 else 1.0
    codes, sa, za = reference.quantize_per_token(x, bits, sym, clip)
    bias = torch.randn(n, generator=gen) if seed % 2 == 0 else None
    ref = reference.linear_w4a8(codes, sa, None if sym else za, packed, scales, zeros, g, bias, torch.float32)
    assert w4ax.dynamic_applies(x, g, scales.shape[1])
    assert [c.name for c in w4ax.dynamic_candidates()] == ["quantize_then_linear"]  # QCOMPILE_ACT_GEMV unset
    for cand in [*w4a16.act_candidates(), *w4ax.dynamic_candidates()]:
        y = w4ax.run_dynamic(cand, x, bits, sym, clip, packed, scales, zeros, g, bias, torch.float32)
        assert y.shape == (1, n) and y.dtype == torch.float32
        assert _rel(y, ref) < 1e-5, cand.name
    assert not w4ax.dynamic_applies(torch.randn(2, k).bfloat16(), g, scales.shape[1])
    assert not w4ax.dynamic_applies(torch.randn(1, k), g, scales.shape[1])
