"""Per-token activation quantization without a rotation, written in torch ops that Inductor fuses.

At decode, ``quantize_per_token(x, b, sym, clip)`` is its own launch (a custom op is opaque to Inductor),
128 of them in a 32-layer W4A8 step. Where the quantization has no online rotation (``rotate=False``: the
inputs of q|k|v and gate|up after RMSNorm, of down after SiLU·mul, of o after attention, R1/R2 fused
offline), ``inline_activation_quant`` replaces the op in the graph the backend compiles by
``quantize_per_token_inline``: the same arithmetic as the reference (``reference.quantize_per_token``,
``formats.compute_qparams`` / ``quantize``), so Inductor fuses it into the kernel that produces x
(RMSNorm+residual, SiLU·mul) and the codes GEMV reads codes. A rotated quantization keeps the fused
rotate-quantize kernel.

Bit-exactness with the op (the codes, scales and zeros are the op's, bit for bit) rests on four points:

- **x as stored.** Inductor computes 16-bit intermediates in float32 and drops a ``.to(bfloat16)`` inside a
  fused kernel, so x is read through its bits: ``bits(x_bf16) << 16`` viewed as float32 is x's exact value,
  and the bitcast forces the rounding to bfloat16 that the op's input buffer had (the same single rounding
  Inductor applies when it stores x). float32 x is used as it is; float16 x keeps the op (no such trick).
  The backend also compiles with ``emulate_precision_casts``, which keeps that rounding; the bit read keeps
  this function exact under any Inductor settings.
- **IEEE divisions.** ``x / scale`` and ``−lo / full`` are float32 divisions: the backend compiles with
  Inductor's ``eager_numerics.division_rounding`` (``INDUCTOR_PATCHES``; Triton's ``/`` is otherwise the
  approximate ``div.full``), so they are correctly rounded as in eager and in ``rotate_quant``.
- **division by 2^p − 1.** Inductor turns a division by a constant into a multiplication by its reciprocal.
  ``scale = clip·max|x| / (2^(b−1) − 1)`` and ``full = (hi − lo)/(2^b − 1)`` are therefore computed as
  ``float32(float64(y) · float64(1/d))`` for d = 2^p − 1 (p = 3, 4, 7, 8): y/d of a 24-bit y has a binary
  expansion periodic with period p past its integer part, so it is never within 2^-52 (relative) of a
  float32 rounding midpoint unless it is exact; the float64 product (error ≤ 2^-52) thus rounds to
  float32 exactly as the correctly rounded float32 quotient does (checked over every float32 mantissa in
  ``tests/kernels/test_quant_inline.py``).
- **rounding.** ``torch.round`` (half to even) is ``nearbyint`` in Inductor's Triton and C++ code; codes,
  zero points and clamps are small integers, exact in float32; ``max|x| = max(−min(x, 0), max(x, 0))``.

On by default in the backend; ``QCOMPILE_INLINE_QUANT=0`` keeps the op (A/B timings).
"""

from __future__ import annotations

import operator
import os

import torch
from torch import Tensor, fx

import qcompile.kernels.ops  # noqa: F401 - registers the ops

__all__ = ["INDUCTOR_PATCHES", "enabled", "inline_activation_quant", "quantize_per_token_inline"]

INDUCTOR_PATCHES = {"eager_numerics.division_rounding": True}  # float32 x / y as div_rn in Triton
_TINY = torch.finfo(torch.float32).tiny


def enabled() -> bool:
    """Whether the backend inlines unrotated per-token quantization (unless ``QCOMPILE_INLINE_QUANT=0``)."""
    return os.environ.get("QCOMPILE_INLINE_QUANT", "1") != "0"


def _exact_float(x: Tensor) -> Tensor:
    """x's values in float32, read from its 16-bit pattern for bfloat16 (see the module docstring)."""
    if x.dtype == torch.bfloat16:
        return torch.bitwise_left_shift(x.view(torch.int16).to(torch.int32), 16).view(torch.float32)
    return x.float()


def _div_mersenne(y: Tensor, d: int) -> Tensor:
    """float32 ``y / d`` correctly rounded, for ``d = 2^p − 1``, as ``float32(float64(y) · (1/d))``."""
    return (y.double() * (1.0 / d)).float()


def quantize_per_token_inline(x: Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_per_token(x, bits, symmetric, clip_ratio)`` (no rotation) in torch ops: the same
    ``(codes int8, scales float32 [..., 1], zeros int8 [..., 1])`` bit for bit, for bfloat16 or float32 x."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"quantize_per_token_inline: x must be bfloat16 or float32, got {x.dtype}")
    xf = _exact_float(x)
    qmax, shift = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        m = xf.abs().amax(-1, keepdim=True)  # = max(−min(x, 0), max(x, 0))
        scale = _div_mersenne(m * clip_ratio, shift - 1).clamp(min=_TINY)
        zero = torch.full_like(scale, float(shift))
    else:
        lo = xf.amin(-1, keepdim=True).clamp(max=0)
        hi = xf.amax(-1, keepdim=True).clamp(min=0)
        full = _div_mersenne(hi - lo, qmax).clamp(min=_TINY)
        zero = torch.round(-lo / full).clamp(0, qmax)
        scale = (full * clip_ratio).clamp(min=_TINY)
    codes = ((torch.round(xf / scale) + zero).clamp(0, qmax) - shift).to(torch.int8)
    return codes, scale, (zero - shift).to(torch.int8)


def _args(node: fx.Node) -> tuple:
    names = ("x", "bits", "symmetric", "clip_ratio", "rotate", "block")
    given = dict(zip(names, node.args))
    given.update(node.kwargs)
    defaults = {"clip_ratio": 1.0, "rotate": False, "block": 0}
    return tuple(given.get(n, defaults.get(n)) for n in names)


def _dtype(node) -> torch.dtype | None:
    value = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def inline_activation_quant(gm: fx.GraphModule) -> int:
    """Replace every unrotated ``quantize_per_token`` of bfloat16 or float32 x by ``quantize_per_token_inline``
    in place (its tuple items keep their users); returns how many were replaced."""
    ops = (torch.ops.qcompile.quantize_per_token.default, torch.ops.qcompile.quantize_per_token)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ops:
            continue
        x, bits, symmetric, clip, rotate, _ = _args(node)
        if rotate or _dtype(x) not in (torch.bfloat16, torch.float32):
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            continue
        node.target = quantize_per_token_inline
        node.args, node.kwargs = (x, bits, symmetric, float(clip)), {}
        done += 1
    if done:
        gm.recompile()
    return done
