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
