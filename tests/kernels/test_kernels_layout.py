"""``to_matmulnbits``: one onnxruntime session with a single ``com.microsoft::MatMulNBits`` node must
compute what the reference ``linear_w4a16`` computes from the canonical weight."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import ShapeError
from qcompile.kernels import reference
from qcompile.kernels.layout import matmulnbits_block_size, to_matmulnbits


def _weight(n, k, g, asym, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    packed = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=gen) if asym else None
    return packed, scales, zeros


def _run_ort(mw, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    inits = [numpy_helper.from_array(mw.B.numpy(), "B"), numpy_helper.from_array(mw.scales.numpy(), "scales")]
    inputs = ["A", "B", "scales"]
    if mw.zero_points is not None:
        inits.append(numpy_helper.from_array(mw.zero_points.numpy(), "zero_points"))
        inputs.append("zero_points")
    if bias is not None:
        inputs += [""] * (5 - len(inputs)) + ["bias"]  # optional g_idx left empty
        inits.append(numpy_helper.from_array(bias, "bias"))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **mw.attributes())
    graph = helper.make_graph(
        [node], "mnb",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, mw.K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, mw.N])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize(
    "n, k, g, asym, with_bias",
    [(24, 576, 128, True, False), (24, 576, 128, False, True), (16, 576, 576, True, False), (8, 96, 32, True, False),
     (12, 200, 200, False, False), (8, 384, 96, True, True), (10, 64, 16, True, False),
     (8, 77, 77, True, True), (6, 45, 16, False, False)],
)
def test_matmulnbits_matches_reference(n, k, g, asym, with_bias):
    packed, scales, zeros = _weight(n, k, g, asym)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(9))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(10)) if with_bias else None
    mw = to_matmulnbits(packed, scales, zeros, g, k)
    assert mw.B.shape == (n, -(-k // mw.block_size), mw.block_size // 2)
    assert mw.block_size >= 16 and mw.block_size & (mw.block_size - 1) == 0
    y = _run_ort(mw, x.numpy(), None if bias is None else bias.numpy())
    ref = reference.linear_w4a16(x, packed, scales, zeros, g, bias)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_block_size_rules():
    assert matmulnbits_block_size(576, 128) == 128
    assert matmulnbits_block_size(576, 576) == 128  # per-channel: blocks of 128 repeat the row's scale
    assert matmulnbits_block_size(40, 40) == 64
    assert matmulnbits_block_size(384, 96) == 32
    with pytest.raises(ShapeError, match="multiple of 16"):
        matmulnbits_block_size(576, 72)


# ------------------------------------------------------------------------------------------------
# to_mma_tiles: the tensor-core GEMV's fragment words


def _mma_emulated(tiles: torch.Tensor, x: torch.Tensor, scales, zeros, g: int, n: int) -> torch.Tensor:
    """What ``mma_gemv`` computes for ``x [M ≤ 8, K]``, written from the PTX fragment rules of
    ``mma.m16n8k16`` (A row-major: lane 4g + t holds a0 a1 = A[g][2t, 2t+1], a2 a3 = A[g+8][2t, 2t+1],
    a4 a5 = A[g][2t+8, 2t+9], a6 a7 = A[g+8][2t+8, 2t+9]; B: b0 b1 = B[2t, 2t+1][g], b2 b3 =
    B[2t+8, 2t+9][g]; C: c0 c1 = C[g][2t, 2t+1], c2 c3 = C[g+8][2t, 2t+1]) and the kernel's register
    assembly: A registers (lo b0, lo b1), (lo b2, lo b3), (hi b0, hi b1), (hi b2, hi b3); B registers =
    pairs 2j and 2j + 1 of token g's slab activations from 16t (pair p = x[g, 16t + 2p, +1])."""
    nt, slabs = tiles.shape[:2]
    M = x.shape[0]
    y = torch.zeros(M, nt * 16, dtype=torch.float64)
    words = tiles.to(torch.int64) & 0xFFFFFFFF
    for tile in range(nt):
        rows = torch.arange(tile * 16, tile * 16 + 16)
        live = rows < n
        for s in range(slabs):
            grp = (s * 64) // g
            z = torch.full((16,), 8.0, dtype=torch.float64)
            sc = torch.zeros(16, dtype=torch.float64)
            sc[live] = scales[rows[live], grp].double()
            if zeros is not None:
                z[live] = zeros[rows[live], grp].double()
            for j in range(4):
                A = torch.zeros(16, 16, dtype=torch.float64)
                B = torch.zeros(16, 8, dtype=torch.float64)
                for lane in range(32):
                    gg, t = divmod(lane, 4)
                    w = int(words[tile, s, lane, j])
                    b = [(w >> (8 * i)) & 255 for i in range(4)]
                    regs = [(b[0] & 15, b[1] & 15), (b[2] & 15, b[3] & 15), (b[0] >> 4, b[1] >> 4), (b[2] >> 4, b[3] >> 4)]
                    for (r, c), reg in zip(((gg, 2 * t), (gg + 8, 2 * t), (gg, 2 * t + 8), (gg + 8, 2 * t + 8)), regs):
                        A[r, c], A[r, c + 1] = reg
                    if gg < M:
                        xs = x[gg, s * 64 + 16 * t: s * 64 + 16 * t + 16].double()
                        B[2 * t, gg], B[2 * t + 1, gg] = xs[4 * j], xs[4 * j + 1]  # pair 2j
                        B[2 * t + 8, gg], B[2 * t + 9, gg] = xs[4 * j + 2], xs[4 * j + 3]  # pair 2j + 1
                C = (A - z[:, None]) @ B  # [16 rows, 8 tokens]
                y[:, rows] += (sc[:, None] * C)[:, :M].T
    return y[:, :n]


@pytest.mark.parametrize("n, k, g, asym", [(40, 192, 64, True), (16, 128, 128, False), (21, 64, 64, False)])
def test_mma_tiles_roundtrip_and_fragments(n, k, g, asym):
    """The derived layout is a bijection of the canonical one, and the kernel's fragment algebra on it
    (emulated from the PTX rules) is the reference linear: the permutation of k inside a slab and the
    B pairs agree."""
    from qcompile.kernels.layout import from_mma_tiles, to_mma_tiles
    packed, scales, zeros = _weight(n, k, g, asym, seed=n)
    tiles = to_mma_tiles(packed, k)
    assert tiles.shape == (-(-n // 16), k // 64, 32, 4) and tiles.dtype == torch.int32
    assert torch.equal(from_mma_tiles(tiles, n), packed)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    ref = reference.linear_w4a16(x.double(), packed, scales, zeros, g, None)
    assert torch.allclose(_mma_emulated(tiles, x, scales, zeros, g, n), ref, rtol=1e-5, atol=1e-5)  # ref: float32 math
    with pytest.raises(ShapeError, match="multiple of 64"):
        to_mma_tiles(packed[:, :16], 32)
