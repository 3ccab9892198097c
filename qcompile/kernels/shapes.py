"""Up-front shape and dtype checks of the kernel ops, shared by the typed wrappers, the real
implementations and the fake (meta) implementations, so a bad call fails the same way on a CPU, on a
GPU and while ``torch.export`` traces it. Every message names the op, the argument and the constraint.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile.errors import ShapeError
from qcompile.quant.hadamard import has_hadamard

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _desc(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def check_hadamard_size(op: str, n: int, block_size: int) -> int:
    """The size of the Hadamard blocks applied over a last dim of ``n`` (``block_size`` 0: all of n)."""
    if block_size < 0:
        raise ShapeError(f"{op}: block_size must be 0 (whole last dim) or a positive divisor of it, got {block_size}")
    b = n if block_size == 0 else block_size
    if n % b:
        raise ShapeError(f"{op}: Hadamard block_size={b} must divide the last dim {n}")
    if not has_hadamard(b):
        raise ShapeError(
            f"{op}: no Hadamard matrix of size {b} (n = m·2^k needs a constructible order m); "
            "choose a block_size that has one (qcompile.quant.hadamard.largest_hadamard_block)"
        )
    return b


def check_hadamard(x: Tensor, block_size: int) -> None:
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise ShapeError(f"hadamard: x must be a float16/bfloat16/float32 tensor [..., n], got {_desc(x)}")
    check_hadamard_size("hadamard", x.shape[-1], block_size)


def check_quantize_per_token(
    x: Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool, block_size: int
) -> None:
    op = "quantize_per_token"
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1 or x.shape[-1] < 1:
        raise ShapeError(f"{op}: x must be a float16/bfloat16/float32 tensor [..., K>0], got {_desc(x)}")
    if not 2 <= bits <= 8:
        raise ShapeError(f"{op}: bits must be in 2..8 (codes are stored in int8), got {bits}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ShapeError(f"{op}: clip_ratio must be in (0, 1], got {clip_ratio}")
    if rotate:
        check_hadamard_size(op, x.shape[-1], block_size)
    elif block_size != 0:
        raise ShapeError(f"{op}: block_size={block_size} is only meaningful with rotate=True")


def check_int4_weight(
    op: str, k: int, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None
) -> int:
    """Checks the canonical int4 weight (``formats.PackedWeight``) against ``K = k``; returns N."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (k + 1) // 2:
        raise ShapeError(
            f"{op}: packed_weight must be uint8 [N, ceil(K/2)] = [N, {(k + 1) // 2}] for K={k} "
            f"(the last dim of the activations), got {_desc(packed)}"
        )
    n = packed.shape[0]
    if not 1 <= group_size <= k:
        raise ShapeError(f"{op}: group_size must be in 1..K={k} (K for per-channel), got {group_size}")
    g = -(-k // group_size)
    if scales.dim() != 2 or tuple(scales.shape) != (n, g) or scales.dtype not in FLOAT_DTYPES:
        raise ShapeError(
            f"{op}: scales must be float [N, ceil(K/group_size)] = [{n}, {g}] (K={k}, group_size={group_size}), "
            f"got {_desc(scales)}"
        )
    if zeros is not None and (tuple(zeros.shape) != (n, g) or zeros.dtype != torch.uint8):
        raise ShapeError(f"{op}: zeros must be None (symmetric) or uint8 [{n}, {g}], got {_desc(zeros)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype not in FLOAT_DTYPES):
        raise ShapeError(f"{op}: bias must be None or float [N] = [{n}], got {_desc(bias)}")
    return n


def check_linear_w4a16(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None
) -> None:
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1 or x.shape[-1] < 1:
        raise ShapeError(f"linear_w4a16: x must be a float16/bfloat16/float32 tensor [..., K>0], got {_desc(x)}")
    check_int4_weight("linear_w4a16", x.shape[-1], packed, scales, zeros, group_size, bias)


def check_linear_w4ax(
    op: str,
    x_codes: Tensor,
    x_scales: Tensor,
    x_zeros: Tensor | None,
    packed: Tensor,
    w_scales: Tensor,
    w_zeros: Tensor | None,
    group_size: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> None:
    if x_codes.dtype != torch.int8 or x_codes.dim() < 1 or x_codes.shape[-1] < 1:
        raise ShapeError(f"{op}: x_codes must be int8 [..., K>0] (from quantize_per_token), got {_desc(x_codes)}")
    tok = (*x_codes.shape[:-1], 1)
    if tuple(x_scales.shape) != tok or x_scales.dtype != torch.float32:
        raise ShapeError(f"{op}: x_scales must be float32 {list(tok)} (one per token), got {_desc(x_scales)}")
    if x_zeros is not None and (tuple(x_zeros.shape) != tok or x_zeros.dtype != torch.int8):
        raise ShapeError(f"{op}: x_zeros must be None (symmetric) or int8 {list(tok)}, got {_desc(x_zeros)}")
    if out_dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_int4_weight(op, x_codes.shape[-1], packed, w_scales, w_zeros, group_size, bias)


def check_linear_w4ax_dynamic(x: Tensor, bits: int, symmetric: bool, clip_ratio: float, packed: Tensor,
                              w_scales: Tensor, w_zeros: Tensor | None, group_size: int, bias: Tensor | None,
                              out_dtype: torch.dtype) -> None:
    op = "linear_w4ax_dynamic"
    check_quantize_per_token(x, bits, symmetric, clip_ratio, False, 0)
    if out_dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_int4_weight(op, x.shape[-1], packed, w_scales, w_zeros, group_size, bias)


def check_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> None:
    op = "decode_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"{op}: q, k, v must be [batch, heads, seq, head_dim], got {_desc(q)}, {_desc(k)}, {_desc(v)}")
    if k.shape != v.shape:
        raise ShapeError(f"{op}: k and v must have one shape, got {_desc(k)} and {_desc(v)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ShapeError(f"{op}: q {_desc(q)} and k {_desc(k)} must share batch and head_dim, with query heads a "
                         "multiple of key/value heads")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(f"{op}: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask.dtype != torch.bool or mask.dim() > 4:
        raise ShapeError(f"{op}: mask must be bool with at most 4 dims, got {_desc(mask)}")
    try:
        torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    except RuntimeError:
        raise ShapeError(f"{op}: mask {_desc(mask)} does not broadcast to [batch, q heads, queries, keys] = "
                         f"{[q.shape[0], q.shape[1], q.shape[2], k.shape[2]]}") from None
