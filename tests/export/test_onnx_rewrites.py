"""Rewrites of the exported ONNX graph: the lm_head tied back to the embedding table exactly when it is a linear
function of it, and left alone otherwise; plain RMS norms written back as standard ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.export.onnx_rewrites import _expand_plain_rms_norms, tie_lm_head

V, H = 50, 8


def _decoder_tail(E: np.ndarray, L: np.ndarray) -> ir.Model:
    """input_ids → Gather(E) → Tanh → MatMul(·, L) → logits: the two ends of a decoder."""
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h0"]), helper.make_node("Tanh", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "L"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tail", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", V])],
        initializer=[numpy_helper.from_array(E, "E"), numpy_helper.from_array(L, "L")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids})[0]


@pytest.mark.parametrize("relation", ["mixed", "same"])
def test_lm_head_tied_when_a_function_of_the_table(relation):
    rng = np.random.default_rng(0)
    E = rng.standard_normal((V, H)).astype(np.float32)
    X = rng.standard_normal((H, H)).astype(np.float32) if relation == "mixed" else np.eye(H, dtype=np.float32)
    L = (X.T.astype(np.float64) @ E.T.astype(np.float64)).astype(np.float32)  # [H, V]
    ids = rng.integers(0, V, (1, 7))
    model = _decoder_tail(E, L)
    before = _run(model, ids)
    report = tie_lm_head(model)
    assert "reads the embedding table" in report and ("matmul" in report) == (relation == "mixed"), report
    assert list(model.graph.initializers) == (["E", "L.tie"] if relation == "mixed" else ["E"])
    np.testing.assert_allclose(_run(model, ids), before, rtol=1e-5, atol=1e-5)


def test_lm_head_kept_when_not_a_function_of_the_table():
    rng = np.random.default_rng(1)
    model = _decoder_tail(rng.standard_normal((V, H)).astype(np.float32),
                          rng.standard_normal((H, V)).astype(np.float32))
    report = tie_lm_head(model)
    assert "not a function of the embedding table" in report
    assert sorted(model.graph.initializers) == ["E", "L"]


def test_plain_rms_norm_written_as_standard_ops():
    rng = np.random.default_rng(2)
    gamma = rng.standard_normal(H).astype(np.float32)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)
    graph = helper.make_graph([node], "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, H])],
                              initializer=[numpy_helper.from_array(gamma, "g")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    x = rng.standard_normal((3, H)).astype(np.float32)
    fused = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = fused.run(None, {"x": x})[0]
    # a norm feeding the graph output directly cannot be rewired here: refused, not silently dropped
    with pytest.raises(AssertionError, match="graph output"):
        _expand_plain_rms_norms(model)
    ident = helper.make_node("Identity", ["y0"], ["y"])
    node.output[0] = "y0"
    graph = helper.make_graph([node, ident], "rms", list(graph.input), list(graph.output),
                              initializer=list(graph.initializer))
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert _expand_plain_rms_norms(model) == 1
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    assert "SimplifiedLayerNormalization" not in {n.op_type for n in proto.graph.node}
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
