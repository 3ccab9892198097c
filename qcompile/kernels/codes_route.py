"""One-token A8/A4 linears through the W4A16 GEMV on the exact codes (the backend's default for graphs on CUDA;
``QCOMPILE_CODES_W4A16=0`` turns it off).

Algebra. ``linear_w4a8(a, sa, za, W) = sa·Σ_k (a_k − za)·Ŵ[n, k] + bias``; ``a − za`` is an integer in
[−255, 255], exact in bfloat16 (8 significant bits) and float16, so ``linear_w4a16(bf16(a − za), W,
row_scale=sa, bias)`` is the same sum, scaled by the token's ``sa`` and biased in float32 inside the GEMV and
rounded once to the output dtype: the codes GEMV's numerics (the float32 summation order aside). Where the
quantization is inlined (``quant_inline``), Inductor writes ``bf16(a − za)`` instead of the int8 codes in the
kernel making x, and the GEMV is the tuned W4A16 one (word or tensor-core GEMV, whichever the tuner picked for
the shape), so the A8/A4 decode reads the weights at the W4A16 GEMV's speed. On the CPU the backend keeps the
codes GEMV: the route's other float32 summation order can flip a later layer's activation codes, and the
compiled step stays the eager lowered model's bit for bit.

Rewritten: ``linear_w4a8/w4a4`` of one row (static shapes) whose codes come from an inlined quantization.
"""

from __future__ import annotations

import operator
import os

import torch
from torch import Tensor, fx

import qcompile.kernels.ops  # noqa: F401 - registers the ops
from qcompile.kernels.quant_inline import quantize_per_token_inline

__all__ = ["enabled", "linear_codes_w4a16", "route_codes_to_w4a16"]


def enabled() -> bool:
    """Whether the backend routes one-token A8/A4 linears through the W4A16 GEMV (default; ``QCOMPILE_CODES_W4A16=0``
    keeps the codes GEMV)."""
    return os.environ.get("QCOMPILE_CODES_W4A16", "1") != "0"


def linear_codes_w4a16(x_codes: Tensor, x_scales: Tensor, x_zeros: Tensor | None, packed_weight: Tensor,
                       w_scales: Tensor, w_zeros: Tensor | None, group_size: int, bias: Tensor | None = None,
                       out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``linear_w4a8`` as ``linear_w4a16(a − za, row_scale=sa, bias)`` with x in ``out_dtype`` (see the module
    docstring)."""
    a = x_codes.float()
    if x_zeros is not None:
        a = a - x_zeros.float()
    return torch.ops.qcompile.linear_w4a16(a.to(out_dtype), packed_weight, w_scales, w_zeros, group_size, bias,
                                           x_scales)


def _rows(node) -> int | None:
    value = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    if not isinstance(value, Tensor) or any(not isinstance(s, int) for s in value.shape):
        return None
    return value.numel() // value.shape[-1]


def route_codes_to_w4a16(gm: fx.GraphModule) -> int:
    """Rewrite one-row ``linear_w4a8/w4a4`` of inlined codes into ``linear_codes_w4a16`` in place; returns how
    many."""
    q = torch.ops.qcompile
    linears = (q.linear_w4a8.default, q.linear_w4a4.default, q.linear_w4a8, q.linear_w4a4)
    done = 0
    for lin in list(gm.graph.nodes):
        if lin.op != "call_function" or lin.target not in linears:
            continue
        codes = lin.args[0] if lin.args else lin.kwargs.get("x_codes")
        if not (isinstance(codes, fx.Node) and codes.target is operator.getitem
                and codes.args[0].target is quantize_per_token_inline and _rows(codes) == 1):
            continue
        lin.target = linear_codes_w4a16
        done += 1
    if done:
        gm.recompile()
    return done
