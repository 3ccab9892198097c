"""The ONNX view of a tiny model matches to the structure the fx view matches to.

Every tiny architecture is exported once as a direct translation of its capture (opset 23, no onnxscript
optimizer), and three again as a default, optimized export gives them: llama at opset 18 (attention
decomposed into MatMul/Softmax/MatMul, weights pre-transposed into generated ``val_*`` initializers),
qwen3 at opset 23 (fused RMSNormalization, RotaryEmbedding and Attention ops) and gemma at opset 18
(decomposed tanh-gelu; the optimizer folds ``1 + γ`` into new initializers). Exports are shared per case
through module-scoped caches (an export takes seconds).

Beyond equal summaries, the initializers the ONNX map names must hold the fx weights once moved to
[out, in] by ``in_axis``/``out_axis``: that proves the axes, rows of fused projections and biases.
"""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qcompile.analysis.match import match
from qcompile.errors import CaptureError
from qcompile.graph.fx import capture, to_opgraph
from qcompile.graph.onnx import export_tiny_onnx, onnx_to_opgraph
from qcompile.models import TINY_ARCHS, tiny

PLAIN = [(arch, 23, False) for arch in TINY_ARCHS]
OPTIMIZED = [("llama", 18, True), ("qwen3", 23, True), ("gemma", 18, True)]
CASES = PLAIN + OPTIMIZED
# what an optimized export changes on purpose: Gemma's norm scale 1 + γ becomes one initializer (offset 0)
EXPECTED_DIFF = {("gemma", 18, True): {"norm_offset": (1.0, 0.0)}}


def _id(case):
    arch, opset, optimize = case
    return f"{arch}-opset{opset}{'-optimized' if optimize else ''}"


@pytest.fixture(scope="module")
def fx_side():
    """arch -> (model, fx ModelMap, the model's tensors by name), built on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model = tiny(arch)
            tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
            tensors = {k: v.detach().numpy() for k, v in tensors.items()}
            cache[arch] = (model, match(to_opgraph(capture(model))), tensors)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def onnx_side(fx_side, tmp_path_factory):
    """case -> (ONNX ModelMap, the file's initializers by name), exported from the fx side's model."""
    cache = {}

    def get(case):
        if case not in cache:
            arch, opset, optimize = case
            path = tmp_path_factory.mktemp("onnx") / f"{_id(case)}.onnx"
            export_tiny_onnx(fx_side(arch)[0], path, opset=opset, optimize=optimize)
            inits = {n: v.const_value.numpy() for n, v in ir.load(path).graph.initializers.items()}
            cache[case] = (match(onnx_to_opgraph(path)), inits)
        return cache[case]

    return get


def _projections(mm):
    """(role, Linear, rows) of every weight matrix, in block order; rows (start, stop) of a fused one."""
    for b in mm.blocks:
        a, f = b.attention, b.ffn
        for role, p in (("q", a.q), ("k", a.k), ("v", a.v), ("gate", f.gate), ("up", f.up)):
            if p is not None:
                yield f"{b.index}.{role}", mm.linears[p.linear], (p.start, p.stop)
        for role, node in (("o", a.o), ("down", f.down), ("router", f.router)):
            if node is not None:
                yield f"{b.index}.{role}", mm.linears[node], None
    yield "lm_head", mm.linears[mm.lm_head], None


def _matrix(tensors, lin, rows):
    """The weight as [..., out, in], cut to the rows a role uses."""
    w = np.moveaxis(tensors[lin.weight], (lin.out_axis, lin.in_axis), (-2, -1))
    return w if rows is None else w[..., rows[0] : rows[1], :]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_summary_equals_the_fx_capture(case, fx_side, onnx_side):
    fx = fx_side(case[0])[1].summary()
    ox = onnx_side(case)[0].summary()
    assert {k: (fx[k], ox[k]) for k in fx if fx[k] != ox[k]} == EXPECTED_DIFF.get(case, {})


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_geometry_readers_and_invariances_agree_per_block(case, fx_side, onnx_side):
    fx, ox = fx_side(case[0])[1], onnx_side(case)[0]
    assert len(fx.blocks) == len(ox.blocks)
    for bf, bo in zip(fx.blocks, ox.blocks):
        geometry = ("n_heads", "n_kv_heads", "head_dim", "rope", "qk_norm")
        assert [getattr(bf.attention, k) for k in geometry] == [getattr(bo.attention, k) for k in geometry]
        for nf, no in ((bf.attn_norm, bo.attn_norm), (bf.ffn_norm, bo.ffn_norm)):
            assert (nf.kind, len(nf.readers)) == (no.kind, len(no.readers))
        assert (bf.ffn.kind, bf.ffn.act, bf.ffn.experts) == (bo.ffn.kind, bo.ffn.act, bo.ffn.experts)
    assert len(ox.final_norm.readers) == 1 and len(ox.writers) == len(fx.writers)
    assert [(i.name.split(":")[0], i.holds) for i in fx.invariances] == [
        (i.name.split(":")[0], i.holds) for i in ox.invariances]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_weights_are_initializers_holding_the_fx_weights(case, fx_side, onnx_side):
    _, fx, params = fx_side(case[0])
    ox, inits = onnx_side(case)
    pairs = list(zip(_projections(fx), _projections(ox), strict=True))
    for (role, lf, rows_f), (_, lo, rows_o) in pairs:
        assert lo.weight in inits and (lo.bias is None or lo.bias in inits), role
        assert (lf.in_features, lf.out_features, lf.experts) == (lo.in_features, lo.out_features, lo.experts), role
        np.testing.assert_array_equal(_matrix(params, lf, rows_f), _matrix(inits, lo, rows_o), err_msg=role)
        assert (lf.bias is None) == (lo.bias is None), role
        if lf.bias is not None:
            np.testing.assert_array_equal(params[lf.bias], inits[lo.bias], err_msg=role)
    np.testing.assert_array_equal(params[fx.embedding.weight], inits[ox.embedding.weight])
    for nf, no in zip(fx.norms, ox.norms, strict=True):  # the effective scale: weight + offset
        assert no.weight in inits
        np.testing.assert_allclose(params[nf.weight] + nf.offset, inits[no.weight] + no.offset, rtol=1e-6)
        if nf.bias is not None:
            np.testing.assert_array_equal(params[nf.bias], inits[no.bias])


def test_pre_transposed_weights_keep_their_generated_names(fx_side, onnx_side):
    """An optimized export stores x·Wᵀ's weight as Wᵀ under a new name: the map names it and reads [in, out]."""
    _, fx, params = fx_side("llama")
    ox, _ = onnx_side(("llama", 18, True))
    q = ox.linears[ox.blocks[0].attention.q.linear]
    assert q.weight not in params and q.weight.startswith("val_")
    assert (q.in_axis, q.out_axis) == (-2, -1)


def test_fused_projections_are_row_ranges_of_one_initializer(onnx_side):
    ox, _ = onnx_side(("phi3", 23, False))
    a, f = ox.blocks[0].attention, ox.blocks[0].ffn
    assert a.q.linear == a.k.linear == a.v.linear and [(p.start, p.stop) for p in (a.q, a.k, a.v)] == [
        (0, 64), (64, 96), (96, 128)]
    assert f.gate.linear == f.up.linear
    assert [(f.gate.start, f.gate.stop), (f.up.start, f.up.stop)] == [(0, 96), (96, 192)]


# --- unreadable files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"this is not an ONNX model", b""], ids=["garbage", "empty"])
def test_a_corrupt_file_raises_capture_error_naming_it(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(CaptureError, match="broken.onnx"):
        onnx_to_opgraph(path)


def test_a_missing_file_raises_capture_error(tmp_path):
    with pytest.raises(CaptureError, match="FileNotFoundError"):
        onnx_to_opgraph(tmp_path / "missing.onnx")


# --- single rules on hand-made graphs ------------------------------------------------------------------------
def _graph(nodes, inits=(), out="y", shape=(2, 8)):
    """The OpGraph of a one-input graph x → ... → out built from onnx.helper nodes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    tensors = [helper.make_tensor(n, TensorProto.FLOAT, np.shape(v), np.ravel(v)) for n, v in inits]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=tensors)
    return onnx_to_opgraph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def _one(og, kind):
    (node,) = og.nodes_of(kind)
    return node


def test_matmul_add_is_one_linear_with_bias_and_initializer_axes():
    w, b = np.ones((8, 4)), np.ones(4)  # [in, out], as exporters pre-transpose
    og = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["b", "h"], ["y"])],
                [("w", w), ("b", b)])
    lin = _one(og, "linear")
    assert lin == "y" and og.operands(lin) == ["x", "w", "b"]
    assert {k: og.attr(lin, k) for k in ("weight", "bias", "in_axis", "out_axis")} == {
        "weight": "w", "bias": "b", "in_axis": -2, "out_axis": -1}


def test_gemm_trans_b_reads_the_weight_as_out_in():
    og = _graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [("w", np.ones((4, 8)))])
    lin = _one(og, "linear")
    assert (og.attr(lin, "in_axis"), og.attr(lin, "out_axis")) == (-1, -2)


def test_erf_gelu_and_sigmoid_silu_are_activations():
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["t"]),
        helper.make_node("Erf", ["t"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["x", "p"], ["xp"]),
        helper.make_node("Mul", ["half", "xp"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Mul", ["g", "s"], ["y"]),
    ]
    og = _graph(nodes, [("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5)])
    acts = {n: og.attr(n, "fn") for n in og.nodes_of("activation")}
    assert acts == {"g": "gelu", "y": "silu"} and og.operands("g") == ["x"] and og.operands("y") == ["g"]


def test_division_by_a_square_root_is_a_product_with_rsqrt():
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["m"]),
        helper.make_node("Add", ["eps", "m"], ["a"]),
        helper.make_node("Sqrt", ["a"], ["r"]),
        helper.make_node("Div", ["x", "r"], ["y"]),
    ]
    axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("c", TensorProto.INT64, [1], [-1]))
    og = _graph([axes] + nodes, [("eps", 1e-6)])
    r = _one(og, "rsqrt")
    assert og.kind("y") == "mul" and og.operands("y") == ["x", r]
    assert og.operands(r) == ["a"] and og.attr("a", "scalar") == pytest.approx(1e-6) and og.operands("a") == ["m"]
    assert og.kind("m") == "mean"


def test_unknown_ops_and_reversed_operands_stay_other_with_their_op_type():
    nodes = [
        helper.make_node("Hardmax", ["x"], ["h"]),
        helper.make_node("Sub", ["one", "h"], ["s"]),
        helper.make_node("Custom", ["s"], ["y"], domain="com.example"),
    ]
    og = _graph(nodes, [("one", 1.0)])
    assert [(og.kind(n), og.attr(n, "op")) for n in ("h", "s", "y")] == [
        ("other", "Hardmax"), ("other", "Sub"), ("other", "Custom")]


def test_shape_computations_are_not_nodes():
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Reshape", ["x", "shp"], ["y"]),
    ]
    og = _graph(nodes)
    assert sorted(og.graph.nodes) == ["output", "x", "y"] and og.operands("y") == ["x"]


def test_an_onnx_model_proto_is_accepted():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert isinstance(model, onnx.ModelProto)
    assert onnx_to_opgraph(model).attr("y", "fn") == "relu"
