"""Launch plans: the decode-time calls of the INT4 ops with everything but the activation fixed.

Why: an eager decode call of a ``qcompile`` op runs a 6–15 µs kernel, and the generic path re-derives on
every call what cannot change between two calls on the same weight — the argument checks, the autotuner's
choice, the candidate's launch arguments (constexprs, grid, strides, the weight's derived layouts) and the
launcher's specialization key. A plan is built once per ``(weight, activation signature)`` after the
generic path has run (checked, tuned, compiled) and holds the result as a ``launch.Bound`` per kernel
and the weights' addresses; a call allocates the output, reads the activation's address and launches.

Validity. A plan is keyed on ``id`` of the packed weight (dropped by a finalizer when that tensor dies, so
a live key always names the same tensor) and the activation's shape and dtype; a call also requires the
very same scale/zero/bias tensor objects, the packed weight's version counter unchanged (an in-place write
or ``set_`` bumps it: the addresses and derived layouts would be stale) and the activation contiguous and
16-byte aligned (a W4A16 plan built with a row scale: the call's row scale float32, one per row,
contiguous and aligned; its address is passed per call). Anything else returns None and the caller takes
the generic path (which checks the arguments and raises the op's own errors). The activation's values are
never looked at, so plans are used inside CUDA-graph capture as well.

Plans exist for the decode candidates only: W4A16 word GEMV (fused or with its prep launch) and
tensor-core GEMV (M ≤ 16), W4A8/W4A4 ``codes_gemv`` (M = 1, one launch), ``linear_w4ax_dynamic``'s GEMV that
quantizes the 16-bit token itself (M = 1, one launch), and per-token quantization (any rows) when it is
one launch. The prefill strategies keep the generic path: their kernels run hundreds of µs.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
from torch import Tensor

from qcompile.kernels.hadamard_plan import plan_unit
from qcompile.kernels.triton import mma_gemv, rotate_quant, w4a16
from qcompile.kernels.triton.launch import Bound, bind

Plan = Callable[..., object]
_NONE = object()  # "no plan for this key": the generic path runs without trying again

_linear: dict = {}  # (id(packed), x.shape, x.dtype, group_size, extra...) -> LinearPlan | _NONE
_quant: dict = {}  # (x.shape, x.dtype, bits, symmetric, clip, unit) -> QuantPlan | _NONE


def _forget(table: dict, key) -> None:
    table.pop(key, None)


def _bound(args: tuple) -> Bound | None:
    """The compiled specialization for ``launch`` arguments ``args`` (the generic path compiled it)."""
    return bind(*args)


class LinearPlan:
    """One weight's decode launch sequence (see the module docstring); ``__call__`` gives the output or
    None when this call does not fit the plan."""

    __slots__ = ("scales", "zeros", "bias", "version", "steps", "out_shape", "out_dtype", "tmp_shape", "cast",
                 "keep")

    def matches(self, scales, zeros, bias, packed: Tensor) -> bool:
        return (self.scales is scales and self.zeros is zeros and self.bias is bias
                and packed._version == self.version)


class W4A16Plan(LinearPlan):
    # prep: Bound or None; mid: the gemv's values after x and before y; rs: the row-scale stand-in's address
    # (a plan built without a row scale) or None (the call's row scale, checked, goes there)
    __slots__ = ("prep", "gemv", "mid", "rs")

    def __call__(self, x: Tensor, row_scale: Tensor | None = None) -> Tensor | None:
        px = x.data_ptr()
        if px & 15 or not x.is_contiguous():
            return None
        pr = self.rs
        if pr is None:  # float32, one per row, 16-byte aligned (as the kernel was specialized)
            if (row_scale.dtype != torch.float32 or not row_scale.is_contiguous()
                    or row_scale.numel() * self.out_shape[-1] != math.prod(self.out_shape)):
                return None
            pr = row_scale.data_ptr()
            if pr & 15:
                return None
        if self.cast:  # split-K: float32 partials, zeroed, cast after
            y = x.new_zeros(self.out_shape, dtype=torch.float32)
        else:
            y = x.new_empty(self.out_shape)
        if self.prep is not None:  # the activation's planes first
            xp = x.new_empty(self.tmp_shape, dtype=torch.float32)
            pp = xp.data_ptr()
            self.prep(px, pp, self.tmp_shape[1])
            px = pp
        self.gemv(px, *self.mid, y.data_ptr(), pr, *self.steps)
        return y.to(x.dtype) if self.cast else y


class CodesPlan(LinearPlan):
    """W4A8/W4A4 at one token: the word GEMV reading the codes (one launch) into ``out_dtype``."""

    __slots__ = ("gemv", "mid", "has_az")

    def __call__(self, a: Tensor, sa: Tensor, za: Tensor | None) -> Tensor | None:
        pa = a.data_ptr()
        if pa & 15 or not (a.is_contiguous() and sa.is_contiguous()):
            return None
        ps = sa.data_ptr()
        pz = za.data_ptr() if self.has_az else ps
        if (ps | pz) & 15:  # the kernel was specialized on aligned scale and zero pointers
            return None
        y = a.new_empty(self.out_shape, dtype=self.out_dtype)
        self.gemv(pa, ps, pz, *self.mid, y.data_ptr(), *self.steps)
        return y


def _weight_values(args: tuple, first: int, count: int) -> tuple:
    return tuple(a.data_ptr() if isinstance(a, Tensor) else a for a in args[first:first + count])


def _finish(plan: LinearPlan, key, packed: Tensor, scales, zeros, bias) -> LinearPlan:
    plan.scales, plan.zeros, plan.bias, plan.version = scales, zeros, bias, packed._version
    _linear[key] = plan
    weakref.finalize(packed, _forget, _linear, key)
    return plan


def _remember(key, make, packed: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None) -> None:
    """Store ``make()``'s plan for ``key``, or that there is none (also when making it raised: the generic path
    stays the one that runs), forgotten when ``packed`` is freed."""
    plan = _NONE
    try:
        plan = make() or _NONE
    finally:
        if plan is _NONE:
            _linear[key] = _NONE
            weakref.finalize(packed, _forget, _linear, key)
        else:
            _finish(plan, key, packed, scales, zeros, bias)


def w4a16_key(x: Tensor, packed: Tensor, group_size: int, row_scale: Tensor | None = None) -> tuple:
    return (id(packed), x.shape, x.dtype, group_size) + (() if row_scale is None else ("row_scale",))


def build_w4a16(key, cand, x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                bias: Tensor | None, row_scale: Tensor | None = None) -> None:
    """After the generic path ran ``cand`` on these arguments: remember a plan for ``key`` (or that there
    is none). ``x`` is the caller's activation (any leading dims, K last); ``row_scale`` the generic path's
    float32 ``[rows]`` row scale (its address is the call's, not the plan's)."""
    _remember(key, lambda: _make_w4a16(cand, x, packed, scales, zeros, group_size, bias, row_scale), packed, scales,
              zeros, bias)


def _make_w4a16(cand, x, packed, scales, zeros, group_size, bias, row_scale=None) -> W4A16Plan | None:
    meta = cand.meta
    kind = meta["kind"]
    if kind not in ("gemv", "mma_gemv") or not x.is_contiguous() or x.data_ptr() & 15:
        return None
    if not (packed.is_contiguous() and scales.is_contiguous() and (zeros is None or zeros.is_contiguous())
            and (bias is None or bias.is_contiguous())):
        return None
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], packed.shape[0]
    plan = W4A16Plan()
    plan.out_shape = (*x.shape[:-1], N)
    plan.cast = False
    plan.prep = None
    plan.tmp_shape = None
    y = x2.new_empty((M, N))
    if row_scale is not None and (row_scale.dtype != torch.float32 or row_scale.data_ptr() & 15
                                  or not row_scale.is_contiguous()):
        return None
    if kind == "gemv":
        if packed.data_ptr() % 4 or packed.stride(0) % 4:
            return None
        fused = meta["FUSED"]
        xp = x2
        if not fused:
            xp = torch.empty((w4a16.PLANES, packed.shape[1] // 4), dtype=torch.float32, device=x.device)
            plan.prep = _bound(w4a16.prep_launch(x2, xp))
            plan.tmp_shape = tuple(xp.shape)
            if plan.prep is None:
                return None
        args = w4a16.gemv_launch(meta, xp, packed, scales, zeros, group_size, bias, y, fused, meta["ASM"], row_scale)
    else:
        if meta["SPLIT_K"] > 1:  # split-K: float32 partials, zeroed, cast after
            y = x2.new_zeros((M, N), dtype=torch.float32)
            plan.cast = True
        if x2.stride(0) % 8:
            return None
        tiles = mma_gemv.tiles_of(packed, K)
        args = mma_gemv.launch_args(x2, tiles, scales, zeros, group_size, bias, y, cand.meta, row_scale)
    plan.gemv = _bound(args)
    if plan.gemv is None:
        return None
    # (x, weight…, y, row scale, ints…): x at 0, y at 5, the row scale at 6 in both kernels
    kernel_args = args[2]
    plan.mid = _weight_values(kernel_args, 1, 4)
    plan.rs = None if row_scale is not None else kernel_args[6].data_ptr()
    plan.steps = tuple(kernel_args[7:])
    # the tensor-core GEMV's tiles stay alive with the plan (never the packed weight: it would never die)
    plan.keep = kernel_args[1] if kind == "mma_gemv" else None
    return plan


def call_w4a16(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
               bias: Tensor | None, row_scale: Tensor | None = None) -> Tensor | None:
    """The planned call, or None (no plan, or one that does not fit: take the generic path)."""
    plan = _linear.get(w4a16_key(x, packed, group_size, row_scale))
    if plan is None or plan is _NONE or not plan.matches(scales, zeros, bias, packed):
        return None
    return plan(x, row_scale)


def w4ax_key(a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, group_size: int, out_dtype, act_bits: int
             ) -> tuple:
    return (id(packed), a.shape, a.dtype, sa.shape, sa.dtype, None if za is None else (za.shape, za.dtype),
            group_size, out_dtype, act_bits)


def build_w4ax(key, cand, a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, sw: Tensor,
               zw: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> None:
    _remember(key, lambda: _make_codes(cand, a, sa, za, packed, sw, zw, group_size, bias, out_dtype), packed, sw, zw,
              bias)


def _make_codes(cand, a, sa, za, packed, sw, zw, group_size, bias, out_dtype) -> CodesPlan | None:
    meta = cand.meta
    if meta.get("kind") != "codes_gemv" or a.numel() != a.shape[-1] or not a.is_contiguous() or a.data_ptr() & 15:
        return None
    if not (packed.is_contiguous() and sw.is_contiguous() and (zw is None or zw.is_contiguous())
            and (bias is None or bias.is_contiguous()) and sa.is_contiguous()
            and (za is None or za.is_contiguous())) or packed.data_ptr() % 4:
        return None
    N = packed.shape[0]
    a2, sa1 = a.reshape(1, -1), sa.reshape(-1)
    za1 = None if za is None else za.reshape(-1)
    y = torch.empty((1, N), dtype=out_dtype, device=a.device)
    plan = CodesPlan()
    args = w4a16.codes_launch(meta, a2, sa1, za1, packed, sw, zw, group_size, bias, y)
    plan.gemv = _bound(args)
    if plan.gemv is None:
        return None
    plan.has_az = za is not None
    plan.out_shape = (*a.shape[:-1], N)
    plan.out_dtype = out_dtype
    kernel_args = args[2]  # (a, sa, za, weight…, y, ints…)
    plan.mid = _weight_values(kernel_args, 3, 4)
    plan.steps = tuple(kernel_args[8:])
    return plan


def call_w4ax(a: Tensor, sa: Tensor, za: Tensor | None, packed: Tensor, sw: Tensor, zw: Tensor | None, group_size: int,
         bias: Tensor | None, out_dtype: torch.dtype, act_bits: int) -> Tensor | None:
    plan = _linear.get(w4ax_key(a, sa, za, packed, group_size, out_dtype, act_bits))
    if plan is None or plan is _NONE or not plan.matches(sw, zw, bias, packed):
        return None
    return plan(a, sa, za)


class DynamicPlan(LinearPlan):
    """One token of 16-bit x quantized inside the word GEMV (``w4a16._gemv_act_kernel``): one launch."""

    __slots__ = ("gemv", "mid")

    def __call__(self, x: Tensor) -> Tensor | None:
        px = x.data_ptr()
        if px & 15 or not x.is_contiguous():
            return None
        y = x.new_empty(self.out_shape, dtype=self.out_dtype)
        self.gemv(px, *self.mid, y.data_ptr(), *self.steps)
        return y


def dynamic_key(x: Tensor, bits: int, symmetric: bool, clip: float, packed: Tensor, group_size: int, out_dtype
                ) -> tuple:
    return (id(packed), x.shape, x.dtype, "dynamic", bits, symmetric, clip, group_size, out_dtype)


def build_dynamic(key, cand, x: Tensor, bits: int, symmetric: bool, clip: float, packed: Tensor, sw: Tensor,
                  zw: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> None:
    _remember(key, lambda: _make_dynamic(cand, x, bits, symmetric, clip, packed, sw, zw, group_size, bias, out_dtype),
              packed, sw, zw, bias)


def _make_dynamic(cand, x, bits, symmetric, clip, packed, sw, zw, group_size, bias, out_dtype) -> DynamicPlan | None:
    if cand.meta.get("kind") != "act_gemv" or x.numel() != x.shape[-1] or not x.is_contiguous() or x.data_ptr() & 15:
        return None
    if not (packed.is_contiguous() and sw.is_contiguous() and (zw is None or zw.is_contiguous())
            and (bias is None or bias.is_contiguous())) or packed.data_ptr() % 4:
        return None
    N = packed.shape[0]
    y = torch.empty((1, N), dtype=out_dtype, device=x.device)
    args = w4a16.act_launch(cand.meta, x.reshape(1, -1), bits, symmetric, clip, packed, sw, zw, group_size, bias, y)
    plan = DynamicPlan()
    plan.gemv = _bound(args)
    if plan.gemv is None:
        return None
    plan.out_shape = (*x.shape[:-1], N)
    plan.out_dtype = out_dtype
    kernel_args = args[2]  # (x, weight…, y, ints…, clip)
    plan.mid = _weight_values(kernel_args, 1, 4)
    plan.steps = tuple(kernel_args[6:])
    return plan


def call_dynamic(x: Tensor, bits: int, symmetric: bool, clip: float, packed: Tensor, sw: Tensor, zw: Tensor | None,
                 group_size: int, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor | None:
    plan = _linear.get((id(packed), x.shape, x.dtype, "dynamic", bits, symmetric, clip, group_size, out_dtype))
    if plan is None or plan is _NONE or not plan.matches(sw, zw, bias, packed):
        return None
    return plan(x)


class QuantPlan:
    """Per-token quantization in one launch: codes, scales and zeros allocated, one kernel."""

    __slots__ = ("bound", "steps", "keep", "shape", "lead")

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        px = x.data_ptr()
        if px & 15 or not x.is_contiguous():
            return None
        codes = x.new_empty(self.shape, dtype=torch.int8)
        scales = x.new_empty(self.lead, dtype=torch.float32)
        zeros = x.new_empty(self.lead, dtype=torch.int8)
        self.bound(px, codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), *self.steps)
        return codes, scales, zeros


def quant_key(x: Tensor, bits: int, symmetric: bool, clip: float, rotate: bool, block: int) -> tuple:
    return (x.shape, x.dtype, bits, symmetric, clip, rotate, block)


def build_quant(key, x: Tensor, bits: int, symmetric: bool, clip: float, unit: int | None) -> None:
    """After the generic path quantized ``x`` once: a plan when that was one launch of the fused kernel
    (no rotation, or a rotation the kernel applies to enough rows at once)."""
    plan = _NONE
    try:
        plan = _make_quant(x, bits, symmetric, clip, unit) or _NONE
    finally:
        _quant[key] = plan


def _make_quant(x, bits, symmetric, clip, unit) -> QuantPlan | None:
    if not x.is_contiguous() or x.data_ptr() & 15 or x.numel() == 0:
        return None
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    R = x2.shape[0]
    if unit is not None and (not rotate_quant.supports(unit) or (unit < n and R < rotate_quant.SPLIT_ROWS)):
        return None
    cand = rotate_quant.chosen_candidate(x2, bits, symmetric, unit)
    if cand is None:
        return None
    up = None if unit is None else plan_unit(unit)
    codes = torch.empty((R, n), dtype=torch.int8, device=x.device)
    scales = torch.empty((R,), dtype=torch.float32, device=x.device)
    zeros = torch.empty((R,), dtype=torch.int8, device=x.device)
    args = rotate_quant.launch_args(cand, x2, codes, scales, zeros, up, n, unit or n, True, bits, symmetric, clip, 2)
    bound = _bound(args)
    if bound is None:
        return None
    plan = QuantPlan()
    plan.bound = bound
    kernel_args = args[2]  # (x, codes, scales, zeros, factors…, ints…)
    plan.steps = tuple(a.data_ptr() if isinstance(a, Tensor) else a for a in kernel_args[4:])
    plan.keep = kernel_args[4:7]  # the factor matrices, kept alive
    plan.shape = tuple(x.shape)
    plan.lead = (*x.shape[:-1], 1)
    return plan


def call_quantize(x: Tensor, bits: int, symmetric: bool, clip: float, rotate: bool, block: int
             ) -> tuple[Tensor, Tensor, Tensor] | None:
    plan = _quant.get((x.shape, x.dtype, bits, symmetric, clip, rotate, block))
    if plan is None or plan is _NONE:
        return None
    return plan(x)

