"""Backend weight layouts, each derived from the canonical packed int4 format by one function.

The Triton kernels read the canonical layout (``qcompile.quant.formats``) as it is, so there is no
``to_triton_layout``; one format fewer to save, load and test. The M = 1 GEMV reads a row as
little-endian int32 words of eight consecutive codes and unpacks each word with 12 instructions
(``triton/int4.py``), pairing them with the word's eight activations read by one 16-byte load; the
tensor-core kernels pair low and high nibbles with even and odd activations; the GEMMs interleave
nibbles in registers. A K-interleaved layout was weighed for the GEMV and not adopted: on the H200 a
Triton kernel that only streams the canonical words reaches ~4.2 TB/s (measured), so the layout is
not what limits the kernel (its arithmetic and activation traffic are).

``to_matmulnbits`` maps it onto onnxruntime's ``com.microsoft::MatMulNBits`` (contrib op):

* ``B`` uint8 ``[N, k_blocks, block_size/2]``: codes two per byte, low nibble first, along K — the
  canonical rows, padded to ``k_blocks·block_size`` columns and cut into blocks;
* ``scales`` ``[N, k_blocks]`` in the activation's dtype; ``zero_points`` uint8
  ``[N, ceil(k_blocks/2)]``, two 4-bit zero points per byte, low nibble first (absent ⇒ 8, our
  symmetric zero);
* ``block_size`` must be a power of two ≥ 16, so a canonical group ``g`` is cut into ``g/b`` blocks
  that repeat its scale and zero (``b`` = the largest power of two dividing ``g``, at most 256). A
  per-channel weight uses blocks of 128 (or the next power of two of a smaller K). A partial last
  group stays partial: its blocks past K are padded with the zero code and multiply no input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qcompile.errors import ShapeError
from qcompile.kernels.shapes import check_int4_weight


@dataclass(frozen=True, eq=False)
class MatMulNBitsWeight:
    """Initializers and attributes of one ``MatMulNBits`` node (inputs B, scales, zero_points)."""

    B: Tensor
    scales: Tensor
    zero_points: Tensor | None
    K: int
    N: int
    block_size: int
    bits: int = 4

    def attributes(self) -> dict[str, int]:
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block_size}


def matmulnbits_block_size(in_features: int, group_size: int) -> int:
    """The MatMulNBits ``block_size`` that represents canonical groups of ``group_size`` exactly."""
    if group_size >= in_features:
        return 128 if in_features >= 128 else max(16, 1 << (in_features - 1).bit_length())
    b = min(group_size & -group_size, 256)
    if b < 16:
        raise ShapeError(
            f"MatMulNBits needs a power-of-two block_size ≥ 16 dividing group_size; group_size={group_size} "
            f"has largest power-of-two divisor {b}. Quantize with a group size that is a multiple of 16."
        )
    return b


def to_matmulnbits(
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> MatMulNBitsWeight:
    """The ``MatMulNBits`` form of a canonical int4 weight (``PackedWeight`` fields); ``dtype`` is
    the activation dtype of the node (its scales must match it)."""
    K = in_features
    N = check_int4_weight("to_matmulnbits", K, packed, scales, zeros, group_size, None)
    b = matmulnbits_block_size(K, group_size)
    k_blocks = -(-K // b)
    group_of_block = torch.arange(k_blocks, device=packed.device) * b // group_size
    s = scales.index_select(1, group_of_block).to(dtype)
    # pad each row to k_blocks·b codes with the last group's zero code (dequantizes to 0)
    pad_cols = k_blocks * b // 2 - packed.shape[1]
    zq = zeros if zeros is not None else torch.full_like(scales, 8, dtype=torch.uint8)
    last_zero = zq[:, -1:]
    B = torch.cat([packed, (last_zero | (last_zero << 4)).expand(N, pad_cols)], dim=1) if pad_cols else packed
    B = B.reshape(N, k_blocks, b // 2).contiguous()
    zp = None
    if zeros is not None:
        zb = zeros.index_select(1, group_of_block)
        if k_blocks % 2:
            zb = torch.cat([zb, torch.full_like(zb[:, :1], 8)], dim=1)
        zp = (zb[:, 0::2] | (zb[:, 1::2] << 4)).contiguous()
    return MatMulNBitsWeight(B, s.contiguous(), zp, K, N, b)
