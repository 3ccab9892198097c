"""W4A8 / W4A4 Triton kernel: int4 weights × per-token int8 (or int4-in-int8) activation codes.

Hopper has no int4 tensor cores, so both go through the int8 ``tl.dot`` (int32 accumulation); an
int4 activation is simply an int8 code in ``[−8, 7]``.

Inputs: ``a`` int8 codes ``[M, K]`` with per-token ``sa`` float32 ``[M]`` and optional ``za`` int8
``[M]`` (``quantize_per_token``'s shifted-code convention: ``x ≈ (a − za)·sa``); the canonical int4
weight (``packed uint8 [N, ceil(K/2)]``, ``sw [N, G]``, ``zw`` uint8 ``[N, G]`` or None ⇒ 8).

Algebra. With ``ŵ = q − zw ∈ [−15, 15]`` (an exact int8, made in registers from the nibbles):

    y[m, n] = sa[m] · Σ_g sw[n, g] · ( Σ_{k∈g} a[m,k]·ŵ[n,k]  −  za[m] · Σ_{k∈g} ŵ[n,k] )

The inner sums are int8 dots into int32 (exact). Per-channel weights (G = 1) accumulate the whole K
in int32 and apply both scales once in the epilogue — the fast path, and QuaRot's W4A4 setup. With
groups, each K tile lies inside one group (``group_size % BLOCK_K == 0``) and its int32 partial is
scaled into a float32 accumulator. The activation-zero correction needs the weight's code sums
``Σ ŵ``, reduced from the same registers (only when ``za`` is given). Everything after the dot —
scales, zero correction, bias, cast to bf16/fp16/fp32 — is fused into the epilogue. Split-K (for
decode-sized M) adds float32 partials atomically; the epilogue is linear, so each split applies it.

For large M with per-channel weights two more strategies compete in the autotuner: unpack ŵ once to a
dense int8 ``[N, K]`` (plus its row sums), run cuBLAS's ``torch._int_mm``, and apply the same
epilogue in one pass over the int32 result — the unpack costs one read of the int4 weight and one
write of N·K bytes, small beside an M ≥ 128 product; and, for W4A4 (codes in [−8, 7]) with symmetric
activations, the same unpack to float8 e4m3 and cuBLASLt's FP8 GEMM with the scales in its epilogue
(``unpack_fp8_mm``: the operands are small integers, exact in FP8, and Hopper's FP8 rate is ~1.5× its
int8 rate through cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.errors import ShapeError
from qcompile.kernels.autotune import Candidate, choose, chosen
from qcompile.kernels.triton import w4a16
from qcompile.kernels.triton.int4 import offset_codes, unpack
from qcompile.kernels.triton.launch import cdiv, launch


@triton.jit
def _w4ax_kernel(
    a_ptr, sa_ptr, za_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, KH, group_size, stride_am, stride_wn, stride_sn, stride_ym,
    HAS_AZ: tl.constexpr, HAS_WZ: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    H: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    byte = tl.arange(0, H)
    steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, steps)
    if HAS_AZ:
        za = tl.load(za_ptr + offs_m, mask=m_mask, other=0).to(tl.int32)
    if PER_CHANNEL:
        if HAS_WZ:
            zw = tl.load(z_ptr + offs_n * stride_sn, mask=n_mask, other=0).to(tl.int32)
        else:
            zw = tl.full([BLOCK_N], 8, tl.int32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        wsum = tl.zeros([BLOCK_N], dtype=tl.int32)
    else:
        accf = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(first, last):
        k = step * BLOCK_K + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
        j = step * H + byte
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + j[None, :], mask=n_mask[:, None] & (j < KH)[None, :], other=0
        )
        q = unpack(w, BLOCK_N, BLOCK_K).to(tl.int32)  # back to K order
        if not PER_CHANNEL:
            grp = (step * BLOCK_K) // group_size
            if HAS_WZ:
                zw = tl.load(z_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0).to(tl.int32)
            else:
                zw = tl.full([BLOCK_N], 8, tl.int32)
        wi = tl.where((k < K)[None, :], q - zw[:, None], 0)
        w8 = wi.to(tl.int8)
        if PER_CHANNEL:
            acc = tl.dot(a, tl.trans(w8), acc, out_dtype=tl.int32)
            if HAS_AZ:
                wsum += tl.sum(wi, axis=1)
        else:
            part = tl.dot(a, tl.trans(w8), out_dtype=tl.int32)
            if HAS_AZ:
                part -= za[:, None] * tl.sum(wi, axis=1)[None, :]
            sw = tl.load(s_ptr + offs_n * stride_sn + grp, mask=n_mask, other=0.0).to(tl.float32)
            accf += part.to(tl.float32) * sw[None, :]
    sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=0.0)
    if PER_CHANNEL:
        if HAS_AZ:
            acc -= za[:, None] * wsum[None, :]
        sw = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    else:
        out = accf * sa[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ym = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(yp, out, mask=ym)


@triton.jit
def _unpack_kernel(
    w_ptr, z_ptr, out_ptr, sum_ptr, N, K, KH, stride_wn, stride_zn, stride_on,
    HAS_WZ: tl.constexpr, HAS_SUM: tl.constexpr, BLOCK_N: tl.constexpr, H: tl.constexpr,
):
    """Per-channel ŵ = q − z as ``[N, K]`` in the output's dtype (int8, or float8 e4m3, which holds
    every integer in [−15, 15] exactly), one ``[BLOCK_N, 2H]`` tile per program; with HAS_SUM, the row
    sums ``Σ_k ŵ`` are added into the zeroed int32 ``sum [N]``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if HAS_WZ:
        zw = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.int32)
    else:
        zw = tl.full([BLOCK_N], 8, tl.int32)
    j = tl.program_id(1) * H + tl.arange(0, H)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + j[None, :], mask=n_mask[:, None] & (j < KH)[None, :], other=0)
    k = tl.program_id(1) * 2 * H + tl.arange(0, 2 * H)
    q = unpack(w, BLOCK_N, 2 * H)
    if out_ptr.dtype.element_ty == tl.int8:
        wi = tl.where((k < K)[None, :], q.to(tl.int32) - zw[:, None], 0)
        wo = wi.to(tl.int8)
    else:  # (2^23 + q) − (2^23 + z): exact, without a quarter-rate int→float conversion
        wo = (offset_codes(q, tl.float32) - (zw.to(tl.float32) + 8388608.0)[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * stride_on + k[None, :], wo, mask=n_mask[:, None] & (k < K)[None, :])
    if HAS_SUM:
        wi = tl.where((k < K)[None, :], q.to(tl.int32) - zw[:, None], 0)
        tl.atomic_add(sum_ptr + offs_n, tl.sum(wi, axis=1), mask=n_mask, sem="relaxed")


def _unpack(packed: Tensor, zw: Tensor | None, K: int, dtype: torch.dtype, with_sums: bool
            ) -> tuple[Tensor, Tensor | None]:
    """ŵ ``[N, K]`` in ``dtype`` and, if asked, its int32 row sums."""
    N, KH = packed.shape
    out = torch.empty((N, K), dtype=dtype, device=packed.device)
    sums = torch.zeros((N,), dtype=torch.int32, device=packed.device) if with_sums else None
    bn, h = 32, 256
    launch(_unpack_kernel, (cdiv(N, bn), cdiv(KH, h)),
           (packed, zw if zw is not None else packed, out, sums if sums is not None else out, N, K, KH,
            packed.stride(0), zw.stride(0) if zw is not None else 0, out.stride(0)),
           dict(HAS_WZ=zw is not None, HAS_SUM=with_sums, BLOCK_N=bn, H=h), 8)
    return out, sums


@triton.jit
def _int_mm_epilogue_kernel(
    acc_ptr, sa_ptr, za_ptr, wsum_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_am, stride_sn, stride_ym,
    HAS_AZ: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``y = (acc − za ⊗ Σŵ) · sa ⊗ sw + bias`` from ``torch._int_mm``'s int32 result, in one pass."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=mask, other=0)
    if HAS_AZ:
        za = tl.load(za_ptr + offs_m, mask=m_mask, other=0).to(tl.int32)
        acc -= za[:, None] * tl.load(wsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
    sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=0.0)
    sw = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


def unpack_int_mm(a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, sw: Tensor, zw: Tensor | None,
                  bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """The unpack → ``torch._int_mm`` → epilogue strategy (per-channel weights, M > 16, K and N % 8 == 0)."""
    M, K = a.shape
    N = packed.shape[0]
    w8, wsum = _unpack(packed, zw, K, torch.int8, za is not None)
    acc = torch._int_mm(a, w8.t())
    y = torch.empty((M, N), dtype=out_dtype, device=a.device)
    launch(_int_mm_epilogue_kernel, (cdiv(M, 64), cdiv(N, 128)),
           (acc, sa, za if za is not None else sa, wsum if wsum is not None else sa, sw,
            bias if bias is not None else sw, y, M, N, acc.stride(0),
            sw.stride(0), y.stride(0)),
           dict(HAS_AZ=za is not None, HAS_BIAS=bias is not None, BLOCK_M=64, BLOCK_N=128), 4)
    return y


@triton.jit
def _codes_to_fp8_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """int8 codes in [−8, 7] → float8 e4m3 (exact)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, a.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)


def unpack_fp8_mm(a: Tensor, sa: Tensor, packed: Tensor, sw: Tensor, zw: Tensor | None, bias: Tensor | None,
                  out_dtype: torch.dtype) -> Tensor:
    """W4A4 prefill at FP8 tensor-core rate: 4-bit activation codes (|a| ≤ 8) and ŵ = q − z (|ŵ| ≤ 15)
    are integers that float8 e4m3 holds exactly, so cuBLASLt's FP8 GEMM with a per-row × per-column
    scale epilogue (``torch._scaled_mm``, scales and bias fused, float32 accumulation) computes the
    int8 path's sums ``Σ a·ŵ`` with the products exact, at about 1.5× the int8 rate on Hopper.
    Per-channel weights, symmetric activations, bfloat16 output, K and N multiples of 16."""
    M, K = a.shape
    N, KH = packed.shape
    f8 = torch.float8_e4m3fn
    a8 = torch.empty((M, K), dtype=f8, device=a.device)
    launch(_codes_to_fp8_kernel, (cdiv(M * K, 4096),), (a, a8, M * K), dict(BLOCK=4096), 4)
    w8, _ = _unpack(packed, zw, K, f8, False)
    return torch._scaled_mm(a8, w8.t(), scale_a=sa.view(M, 1), scale_b=sw.float().view(1, N),
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)


def block_k_choices(K: int, group_size: int) -> list[int]:
    """K tiles the kernel may use: any for per-channel weights, else those dividing the group."""
    per_channel = group_size >= K
    ks = [bk for bk in (128, 64, 256, 32) if per_channel or group_size % bk == 0]
    if not ks:
        raise ShapeError(
            f"linear_w4a8/w4a4 on CUDA: group_size={group_size} must be a multiple of 32 (each int8-dot "
            "K tile must lie inside one group) or cover all of K (per-channel)"
        )
    return ks


# The one-token codes GEMV's configurations offered to the tuner: (BLOCK_N, num_warps, AHEAD), the best or
# within 3% of it at a decode shape in the H200 sweep (kernels-h200.md).
CODES_CONFIGS = ((8, 1, False), (8, 2, True), (8, 1, True), (4, 1, False))


def candidates(M: int, N: int, K: int, group_size: int, fp8: bool = False) -> list[Candidate]:
    """Variants for this shape; ``fp8`` adds the FP8 GEMM (CUDA, 4-bit symmetric activation codes,
    bfloat16 output: the caller knows). At M ≤ 16 the W4A16 GEMV on the dequantized activation competes;
    at M = 1 (K and g multiples of 8) only the word GEMV reading the codes itself, one launch (``w4a16.gemv_codes``)."""
    if M == 1 and w4a16._word_gemv(K, group_size, -(-K // group_size)):
        # one token: the codes GEMV alone. It reads the weight once at the W4A16 GEMV's rate (6.6 µs at
        # 4096×4096 on the H200, the int8-dot kernel 14.4), and do_bench once ranked an int8-dot tile first
        # at 4096×4096, which cost the W4A8 decode 3 % (kernels-h200.md, 2026-11-30 sweep)
        return [Candidate(f"codes_gemv_n{bn}_w{warps}{'_ahead' if ahead else ''}",
                          dict(kind="codes_gemv", BLOCK_N=bn, BW=128 * warps, AHEAD=ahead, num_warps=warps))
                for bn, warps, ahead in CODES_CONFIGS]
    ks = block_k_choices(K, group_size)
    if M <= 16:
        shapes = ((16, 64, 1, 4, 4), (16, 32, 1, 4, 4), (16, 64, 2, 4, 4), (16, 128, 4, 4, 3), (16, 32, 4, 2, 4))
    elif M <= 128:
        shapes = ((64, 64, 1, 4, 4), (64, 128, 1, 4, 4), (32, 64, 1, 4, 4), (128, 128, 1, 8, 3))
    else:
        shapes = ((256, 128, 1, 8, 3), (128, 128, 1, 8, 3), (128, 128, 1, 4, 4), (256, 128, 1, 8, 4),
                  (128, 256, 1, 8, 4))
    out = []
    for bk in ks[:2]:
        for bm, bn, split, warps, stages in shapes:
            out.append(Candidate(f"m{bm}_n{bn}_k{bk}_s{split}_w{warps}_st{stages}",
                                 dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=8,
                                      num_warps=warps, num_stages=stages)))
    if M > 16 and group_size >= K and K % 8 == 0 and N % 8 == 0:
        out.append(Candidate("unpack_int_mm", dict(kind="unpack_int_mm")))
    if fp8 and M > 16 and group_size >= K and K % 16 == 0 and N % 16 == 0:
        out.append(Candidate("unpack_fp8_mm", dict(kind="unpack_fp8_mm")))
    if M <= 16:
        out.append(Candidate("act_dequant_gemv", dict(kind="act_dequant_gemv")))
    return out


def act_dequant_gemv(a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, sw: Tensor, zw: Tensor | None,
                     group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Decode-sized M: the weight read is the whole cost, so dequantize the few activation rows to
    float32 exactly as the reference does (``(a − za)·sa``) and run the tuned W4A16 GEMV."""
    xf = a.float()
    if za is not None:
        xf = xf - za.float()[:, None]
    xf = xf * sa[:, None]
    return w4a16.linear(xf, packed, sw, zw, group_size, None if bias is None else bias.float()).to(out_dtype)


def run(cand: Candidate, a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, sw: Tensor,
        zw: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``a [M, K]`` int8 codes, ``sa [M]``, ``za [M]`` → ``[M, N]`` in ``out_dtype``."""
    if cand.meta.get("kind") == "unpack_int_mm":
        return unpack_int_mm(a, sa, za, packed, sw, zw, bias, out_dtype)
    if cand.meta.get("kind") == "unpack_fp8_mm":
        return unpack_fp8_mm(a, sa, packed, sw, zw, bias, out_dtype)
    if cand.meta.get("kind") == "act_dequant_gemv":
        return act_dequant_gemv(a, sa, za, packed, sw, zw, group_size, bias, out_dtype)
    if cand.meta.get("kind") == "codes_gemv":
        return w4a16.gemv_codes(cand.meta, a, sa, za, packed, sw, zw, group_size, bias, out_dtype)
    meta = cand.meta
    M, K = a.shape
    N, KH = packed.shape
    split = meta["SPLIT_K"]
    y = torch.zeros((M, N), dtype=torch.float32, device=a.device) if split > 1 else torch.empty(
        (M, N), dtype=out_dtype, device=a.device)
    consts = dict(HAS_AZ=za is not None, HAS_WZ=zw is not None, HAS_BIAS=bias is not None,
                  PER_CHANNEL=group_size >= K, BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"],
                  BLOCK_K=meta["BLOCK_K"], GROUP_M=meta["GROUP_M"], SPLIT_K=split)
    grid = (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), split)
    launch(_w4ax_kernel, grid,
           (a, sa, za if za is not None else sa, packed, sw, zw if zw is not None else sw,
            bias if bias is not None else sw, y, M, N, K, KH, group_size, a.stride(0), packed.stride(0),
            sw.stride(0), y.stride(0)), consts, meta["num_warps"], meta["num_stages"])
    return y.to(out_dtype) if split > 1 else y


def _tune_key(a: Tensor, za: Tensor | None, packed: Tensor, zw: Tensor | None, group_size: int,
              bias: Tensor | None, out_dtype: torch.dtype, act_bits: int) -> tuple:
    M, K = a.shape
    bucket = M if M <= 16 else min(1 << (M - 1).bit_length(), 8192)
    return (bucket, packed.shape[0], K, group_size, za is not None, zw is not None, bias is not None, out_dtype,
            act_bits)


def chosen_candidate(a: Tensor, za: Tensor | None, packed: Tensor, zw: Tensor | None, group_size: int,
                     bias: Tensor | None, out_dtype: torch.dtype, act_bits: int) -> Candidate | None:
    """The tuned candidate ``linear`` runs for codes ``a [M, K]`` (None before its first call)."""
    return chosen("w4ax", _tune_key(a, za, packed, zw, group_size, bias, out_dtype, act_bits), a.device)


def linear(a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, sw: Tensor, zw: Tensor | None,
           group_size: int, bias: Tensor | None, out_dtype: torch.dtype, act_bits: int = 8) -> Tensor:
    """The tuned W4A8 (``act_bits`` 8) or W4A4 (4: codes in [−8, 7], which may take the FP8 GEMM)."""
    M, K = a.shape
    N = packed.shape[0]
    key = _tune_key(a, za, packed, zw, group_size, bias, out_dtype, act_bits)
    fp8 = act_bits <= 4 and za is None and out_dtype == torch.bfloat16 and a.is_cuda
    device = a.device
    cand = chosen("w4ax", key, device) or choose(
        "w4ax", key, lambda: candidates(M, N, K, group_size, fp8),
        lambda c: run(c, a, sa, za, packed, sw, zw, group_size, bias, out_dtype), device)
    return run(cand, a, sa, za, packed, sw, zw, group_size, bias, out_dtype)


# ------------------------------------------------------------------------------------------------
# One token of 16-bit activation: quantize and multiply in one launch (``linear_w4ax_dynamic``)


def dynamic_candidates() -> list[Candidate]:
    """The two-launch way (per-token quantization, then the codes GEMV), and with ``QCOMPILE_ACT_GEMV=1``
    (``fold.enabled``: off by default, see ``kernels/fold.py`` for the H200 measurements) the one-launch GEMV
    that quantizes x itself (``w4a16.act_candidates``)."""
    from qcompile.kernels.fold import enabled

    two = [Candidate("quantize_then_linear", dict(kind="quantize_then_linear"))]
    return [*two, *w4a16.act_candidates()] if enabled() else two


def run_dynamic(cand: Candidate, x: Tensor, bits: int, symmetric: bool, clip: float, packed: Tensor, sw: Tensor,
                zw: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``x [1, K]`` (16-bit) → ``[1, N]`` in ``out_dtype``, with one candidate."""
    if cand.meta["kind"] == "act_gemv":
        return w4a16.gemv_act(cand.meta, x, bits, symmetric, clip, packed, sw, zw, group_size, bias, out_dtype)
    from qcompile.kernels.triton import rotate_quant

    a, sa, za = rotate_quant.quantize_per_token(x, bits, symmetric, clip, None)
    return linear(a, sa.reshape(-1), None if symmetric else za.reshape(-1), packed, sw, zw, group_size, bias,
                  out_dtype, bits)


def dynamic_applies(x: Tensor, group_size: int, G: int) -> bool:
    """Whether the one-token GEMV that quantizes x itself takes this call: one row of 16-bit x, K and g
    multiples of 8."""
    return (x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and w4a16._word_gemv(x.shape[1], group_size, G))


def _dynamic_key(x: Tensor, bits: int, symmetric: bool, packed: Tensor, zw: Tensor | None, group_size: int,
                 bias: Tensor | None, out_dtype: torch.dtype) -> tuple:
    return (packed.shape[0], x.shape[1], group_size, bits, symmetric, zw is not None, bias is not None, x.dtype,
            out_dtype)


def chosen_dynamic(x: Tensor, bits: int, symmetric: bool, packed: Tensor, zw: Tensor | None, group_size: int,
                   bias: Tensor | None, out_dtype: torch.dtype) -> Candidate | None:
    return chosen("w4ax_dynamic", _dynamic_key(x, bits, symmetric, packed, zw, group_size, bias, out_dtype),
                  x.device)


def dynamic_linear(x: Tensor, bits: int, symmetric: bool, clip: float, packed: Tensor, sw: Tensor, zw: Tensor | None,
                   group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """The tuned one-token ``linear_w4ax_dynamic`` (``dynamic_applies`` must hold)."""
    key = _dynamic_key(x, bits, symmetric, packed, zw, group_size, bias, out_dtype)
    cand = chosen("w4ax_dynamic", key, x.device) or choose(
        "w4ax_dynamic", key, dynamic_candidates,
        lambda c: run_dynamic(c, x, bits, symmetric, clip, packed, sw, zw, group_size, bias, out_dtype), x.device)
    return run_dynamic(cand, x, bits, symmetric, clip, packed, sw, zw, group_size, bias, out_dtype)
