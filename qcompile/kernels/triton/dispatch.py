"""CUDA implementations of the ``qcompile`` ops: flatten to 2-D, make the unit-stride views the
kernels assume, pick the kernel, restore the caller's shape. Imported only when a CUDA tensor reaches
an op, so Triton is never imported by ``import qcompile``.

Hadamard units too large for one program's registers (``rotate_quant.supports``) are rotated by the
torch reference on the GPU instead, with a warning naming the size: the result is the same, only
slower; ``qcompile.kernels.hadamard_kernel_supported`` lets a planner report it ahead of time.

Each op here ends, at decode sizes, by recording a launch plan (``plans.py``) for its arguments once the
kernel choice is tuned; the op layer (``ops.py``) tries the plan before its checks and this module.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from qcompile.kernels import reference
from qcompile.kernels.triton import plans, rotate_quant, w4a16, w4ax

_warned: set[int] = set()


def _rows(x: Tensor) -> Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _torch_rotation(unit: int) -> bool:
    if rotate_quant.supports(unit):
        return False
    if unit not in _warned:
        _warned.add(unit)
        warnings.warn(
            f"qcompile: no Triton Hadamard kernel for a unit of size {unit} (its padded tile exceeds "
            f"{rotate_quant.MAX_TILE} elements); it is applied by the torch implementation on the GPU",
            stacklevel=3,
        )
    return True


def hadamard(x: Tensor, block_size: int) -> Tensor:
    n = x.shape[-1]
    unit = n if block_size == 0 else block_size
    if x.numel() == 0:
        return torch.empty_like(x)
    if _torch_rotation(unit):
        return reference.hadamard(x, block_size)
    return rotate_quant.hadamard(_rows(x), unit).reshape(x.shape)


def quantize_per_token(x: Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool, block_size: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    lead = x.shape[:-1]
    if x.numel() == 0:
        return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
                torch.empty((*lead, 1), dtype=torch.float32, device=x.device),
                torch.empty((*lead, 1), dtype=torch.int8, device=x.device))
    unit = (n if block_size == 0 else block_size) if rotate else None
    x2 = _rows(x)
    if unit is not None and _torch_rotation(unit):
        x2 = reference.hadamard(x2.float(), block_size)  # float32, as the fused kernel keeps it
        unit = None
    codes, scales, zeros = rotate_quant.quantize_per_token(x2, bits, symmetric, clip_ratio, unit)
    key = plans.quant_key(x, bits, symmetric, clip_ratio, rotate, block_size)
    if key not in plans._quant and _may_plan(x):
        plans.build_quant(key, x, bits, symmetric, clip_ratio, unit)
    return codes.reshape(x.shape), scales.reshape(*lead, 1), zeros.reshape(*lead, 1)


_PLANS = os.environ.get("QCOMPILE_PLANS", "1") != "0"  # 0: every call takes the generic path (for comparison)


def _may_plan(x: Tensor) -> bool:
    """Plans are recorded from an eager call on the GPU, never while a CUDA graph is being captured."""
    return _PLANS and x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _weight(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def linear_w4a16(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                 bias: Tensor | None, row_scale: Tensor | None = None) -> Tensor:
    # the decode path runs in tens of µs of host time: a 2-D input takes no reshapes, and weights that
    # are already contiguous (all of them, from the lowering) are not re-checked by .contiguous()
    if x.shape[0] == 0 or x.shape[-1] == 0 or x.numel() == 0:
        return x.new_empty((*x.shape[:-1], packed.shape[0]))
    x2 = _rows(x)
    rs = None
    if row_scale is not None:  # float32 [rows], contiguous and 16-byte aligned (as the plans assume)
        rs = row_scale.reshape(-1)
        if not rs.is_contiguous() or rs.data_ptr() & 15:
            rs = rs.clone(memory_format=torch.contiguous_format)
    y = w4a16.linear(x2, _weight(packed), _weight(scales), _weight(zeros), group_size, _weight(bias), rs)
    if x2.shape[0] <= 16:
        key = plans.w4a16_key(x, packed, group_size, row_scale)
        if key not in plans._linear and _may_plan(x):
            cand = w4a16.chosen_candidate(x2, packed, zeros, group_size, bias)
            if cand is not None:
                plans.build_w4a16(key, cand, x, packed, scales, zeros, group_size, bias, rs)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], packed.shape[0])


def linear_w4ax(x_codes: Tensor, x_scales: Tensor, x_zeros: Tensor | None, packed: Tensor, w_scales: Tensor,
                w_zeros: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype,
                act_bits: int = 8) -> Tensor:
    N = packed.shape[0]
    out_shape = (*x_codes.shape[:-1], N)
    if x_codes.numel() == 0:
        return torch.empty(out_shape, dtype=out_dtype, device=x_codes.device)
    sa = x_scales.reshape(-1).contiguous()
    za = None if x_zeros is None else x_zeros.reshape(-1).contiguous()
    a = _rows(x_codes)
    y = w4ax.linear(a, sa, za, _weight(packed), _weight(w_scales), _weight(w_zeros), group_size, _weight(bias),
                    out_dtype, act_bits)
    if a.shape[0] == 1:
        key = plans.w4ax_key(x_codes, x_scales, x_zeros, packed, group_size, out_dtype, act_bits)
        if key not in plans._linear and _may_plan(x_codes):
            cand = w4ax.chosen_candidate(a, za, packed, w_zeros, group_size, bias, out_dtype, act_bits)
            if cand is not None:
                plans.build_w4ax(key, cand, x_codes, x_scales, x_zeros, packed, w_scales, w_zeros, group_size,
                                 bias, out_dtype)
    return y.reshape(out_shape)


def linear_w4ax_dynamic(x: Tensor, bits: int, symmetric: bool, clip_ratio: float, packed: Tensor, w_scales: Tensor,
                        w_zeros: Tensor | None, group_size: int, bias: Tensor | None, out_dtype: torch.dtype
                        ) -> Tensor:
    """One token of 16-bit x: the tuned one-launch GEMV that quantizes x itself (or the two ops, where the
    tuner keeps them); more rows, or float32 x: ``quantize_per_token`` then ``linear_w4ax``, as the graph
    held them before the fold."""
    N = packed.shape[0]
    out_shape = (*x.shape[:-1], N)
    x2 = _rows(x)
    if x.numel() == 0 or not w4ax.dynamic_applies(x2, group_size, w_scales.shape[1]):
        codes, scales, zeros = quantize_per_token(x, bits, symmetric, clip_ratio, False, 0)
        return linear_w4ax(codes, scales, None if symmetric else zeros, packed, w_scales, w_zeros, group_size, bias,
                           out_dtype, bits)
    y = w4ax.dynamic_linear(x2, bits, symmetric, clip_ratio, _weight(packed), _weight(w_scales), _weight(w_zeros),
                            group_size, _weight(bias), out_dtype)
    key = plans.dynamic_key(x, bits, symmetric, clip_ratio, packed, group_size, out_dtype)
    if key not in plans._linear and _may_plan(x):
        cand = w4ax.chosen_dynamic(x2, bits, symmetric, packed, w_zeros, group_size, bias, out_dtype)
        if cand is not None:
            plans.build_dynamic(key, cand, x, bits, symmetric, clip_ratio, packed, w_scales, w_zeros, group_size,
                                bias, out_dtype)
    return y.reshape(out_shape)
