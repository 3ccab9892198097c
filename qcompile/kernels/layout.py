"""Backend weight layouts, each derived from the canonical packed int4 format by one function.

Most Triton kernels read the canonical layout (``qcompile.quant.formats``) as it is: the word GEMV
reads a row as little-endian int32 words of eight consecutive codes, the tensor-core kernels pair low
and high nibbles with even and odd activations, the GEMMs interleave nibbles in registers.

``to_mma_tiles`` is the one derived Triton layout, for the tensor-core GEMV (``triton/mma_gemv.py``):
each lane of a warp holds, in one int32 word, exactly the eight codes of its A fragment of a
``mma.m16n8k16`` (16 rows × 16 k), so the weight goes from memory to the tensor cores with one
16-byte load per four fragments, a few bit operations and no data exchange between lanes. K is cut
into slabs of 64; in slab k-tile ``j`` (of 4), the fragment column ``κ = 2t + 8h + e`` (lane
``l = 4g + t``, h, e ∈ {0, 1}) is the slab's ``k = 16t + 4j + 2h + e`` — a permutation of k inside
the slab (the dot product does not care) that gives each lane 16 consecutive activations per slab
(two 16-byte loads) instead of eight scattered pairs. Lane l's word for k-tile j, with
``A[r][d] = code of row r at slab k = 16t + 4j + d``::

    byte 0 = A[g][0]   | A[g][2] << 4          byte 2 = A[g+8][0]   | A[g+8][2] << 4
    byte 1 = A[g][1]   | A[g][3] << 4          byte 3 = A[g+8][1]   | A[g+8][3] << 4

so the low nibbles of bytes (0, 1) and (2, 3) and the high nibbles of the same pairs are the
fragment's four 2 × 16-bit registers, and the B registers are the activation pairs ``(x[d=0], x[1])``
and ``(x[2], x[3])``. Tiles are stored ``[N/16, K/64, 32 lanes, 4 k-tiles]``: a lane's four k-tiles
are one 16-byte load, a warp's 512 bytes contiguous. Rows are padded to a multiple of 16 with code 0;
K must be a multiple of 64.

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


MMA_ROWS, MMA_STEP = 16, 64  # a fragment tile is 16 rows; a slab of K is 64 (4 k-tiles of 16)


def _slot_index(device: torch.device) -> tuple[Tensor, Tensor]:
    """Row in the tile and k in the slab of every code: ``[32 lanes, 4 k-tiles, 8 slots]`` each, slots
    in byte order (byte 0 lo, byte 0 hi, byte 1 lo, …, byte 3 hi)."""
    lane = torch.arange(32, device=device)[:, None, None]
    j = torch.arange(4, device=device)[None, :, None]
    slot = torch.arange(8, device=device)[None, None, :]
    g, t = lane // 4, lane % 4
    row = g + 8 * (slot // 4)
    d = torch.tensor([0, 2, 1, 3, 0, 2, 1, 3], device=device)[slot]
    return row.expand(32, 4, 8), (16 * t + 4 * j + d).expand(32, 4, 8)


def to_mma_tiles(packed: Tensor, in_features: int) -> Tensor:
    """Canonical ``packed uint8 [N, K/2]`` → int32 ``[ceil(N/16), K/64, 32, 4]`` fragment words (see the
    module docstring); runs on the weight's device."""
    K = in_features
    if K % MMA_STEP:
        raise ShapeError(f"to_mma_tiles: K = {K} is not a multiple of {MMA_STEP}")
    N = packed.shape[0]
    nt = -(-N // MMA_ROWS)
    codes = torch.stack((packed & 15, packed >> 4), -1).reshape(N, -1)[:, :K].to(torch.int32)
    codes = torch.nn.functional.pad(codes, (0, 0, 0, nt * MMA_ROWS - N))
    slabs = codes.reshape(nt, MMA_ROWS, K // MMA_STEP, MMA_STEP).permute(0, 2, 1, 3)  # [nt, slabs, 16, 64]
    row, col = _slot_index(packed.device)
    frag = slabs[:, :, row, col]  # [nt, slabs, 32, 4, 8]
    shifts = 4 * torch.arange(8, device=packed.device, dtype=torch.int32)
    words = (frag << shifts).sum(-1, dtype=torch.int64)  # < 2^32: the eight nibbles never overlap
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def from_mma_tiles(tiles: Tensor, out_features: int) -> Tensor:
    """The inverse of ``to_mma_tiles``: canonical ``packed uint8 [N, K/2]``."""
    nt, n_slabs = tiles.shape[:2]
    K = n_slabs * MMA_STEP
    words = tiles.to(torch.int64) & 0xFFFFFFFF
    frag = (words[..., None] >> (4 * torch.arange(8, device=tiles.device))) & 15  # [nt, slabs, 32, 4, 8]
    row, col = _slot_index(tiles.device)
    out = torch.empty(nt, n_slabs, MMA_ROWS, MMA_STEP, dtype=torch.int64, device=tiles.device)
    out[:, :, row, col] = frag
    codes = out.permute(0, 2, 1, 3).reshape(nt * MMA_ROWS, K)[:out_features].to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)
