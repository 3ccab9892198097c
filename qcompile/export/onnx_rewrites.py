"""Graph rewrites on the exported ONNX decoder (onnx_ir), run once after ``torch.onnx`` and before saving.

* ``fold``: constant folding and dead-node removal, with a size limit so that quantized weights stay in their
  4-bit storage (onnxruntime folds what is left when the session starts: memory, not file size).
* ``fuse_for_ort``: onnxscript's own fusions into onnxruntime's fused norms (``SimplifiedLayerNormalization``,
  ``SkipSimplifiedLayerNormalization``) after its generic simplifications: fewer, larger nodes per token.
* ``tie_lm_head``: store the embedding table once when the lm_head is a linear function of it (see below).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Outputs over this many elements are left for onnxruntime to fold at session start: every weight matrix
# (the smallest, 64×64 per head pair, is 4K elements; SmolLM2's k_proj is 110K) stays in its stored form.
FOLD_OUTPUT_LIMIT = 1 << 12
TIE_TOLERANCE = 1e-5  # ‖E·X − Lᵀ‖_F / ‖L‖_F: float32 rounding of the rewrites that untied them is ~1e-7
# onnxruntime 1.32, SmolLM2's lm_head (K 576, N 49152, M 1, 2 threads): 8-bit MatMulNBits takes 176 ms at level 0
# and 3.6 ms at level 4 (float32 MatMul 8.7 ms); 4-bit 3.9 ms at level 0
VOCAB_ACCURACY_LEVEL = {4: 0, 8: 4}


def fold(model: ir.Model, unpack_weights: bool = False) -> None:
    """Constant folding and dead-node removal only (the exporter's full optimizer adds pattern rewrites that
    took over 15 minutes on SmolLM2's 30 layers on 2 cores). Small results (shapes, the Hadamard factors,
    RoPE tables) are folded; large ones (a transposed table) are not, so the file keeps the compact form.
    ``unpack_weights``: fold everything, so that the int8 weights ``MatMulInteger`` reads are stored as such
    (onnxruntime does not fold their int4 unpacking when a session starts: measured 5.2 against 9.4 tokens/s
    on SmolLM2)."""
    from onnxscript import optimizer

    optimizer.fold_constants(model, onnx_shape_inference=False, input_size_limit=1 << 30,
                             output_size_limit=(1 << 30) if unpack_weights else FOLD_OUTPUT_LIMIT)
    optimizer.remove_unused_nodes(model)


def fuse_for_ort(model: ir.Model) -> dict[str, int]:
    """onnxscript's optimizer (shape simplification, CSE, folding within ``fold``'s size limit) and its RMS-norm
    fusions, in place; returns the fusion counts. Exact: the fused ops compute the same float32 norms."""
    import onnx_ir.passes.common as common_passes
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    def simplify():
        optimizer.optimize(model, input_size_limit=1 << 30, output_size_limit=FOLD_OUTPUT_LIMIT)

    common_passes.ShapeInferencePass()(model)
    simplify()
    fuse_rms_normalization(model)
    counts = {"skip_rms_norm": fuse_skip_rms_normalization(model), "rms_norm": _expand_plain_rms_norms(model)}
    simplify()
    return counts


def _expand_plain_rms_norms(model: ir.Model) -> int:
    """Write back as standard ops the ``SimplifiedLayerNormalization`` nodes the skip fusion did not absorb
    (the first block's input norm): onnxruntime declares that op in the ONNX domain, where ``onnx.checker``
    does not know it. ``y = x·(mean(x²) + ε)^(−½)·γ`` over the last axis. Returns how many."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "SimplifiedLayerNormalization" or node.domain != "":
            continue
        x, gamma = node.inputs[:2]
        eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1
        if axis != -1 or any(o.uses() for o in node.outputs[1:]):
            raise AssertionError(f"{node.name}: an RMS norm fused over axis {axis} or with its statistics read")

        def const(value, dtype):
            v = ir.Value(name=f"{node.name}.c{len(new)}", const_value=ir.tensor(np.asarray(value, dtype=dtype)))
            new.append(ir.node("Constant", [], attributes={"value": v.const_value}, outputs=[v]))
            return v

        new: list[ir.Node] = []
        square = ir.node("Mul", [x, x])
        mean = ir.node("ReduceMean", [square.outputs[0], const([-1], np.int64)], attributes={"keepdims": 1})
        var = ir.node("Add", [mean.outputs[0], const(eps, np.float32)])
        inv = ir.node("Reciprocal", [ir.node("Sqrt", [var.outputs[0]]).outputs[0]])
        sqrt = inv.inputs[0].producer()
        y = ir.node("Mul", [ir.node("Mul", [x, inv.outputs[0]]).outputs[0], gamma])
        normed = y.inputs[0].producer()
        new += [square, mean, var, sqrt, inv, normed, y]
        if node.outputs[0].is_graph_output():
            raise AssertionError(f"{node.name}: a fused norm is a graph output")
        graph.insert_before(node, new)
        node.outputs[0].replace_all_uses_with(y.outputs[0])
        graph.remove(node, safe=True)
        count += 1
    return count


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer of ``graph`` holding ``array``."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _embedding_gather(graph: ir.Graph) -> ir.Node | None:
    """The ``Gather`` that reads ``input_ids`` from an initializer (the token embedding table ``E [V, H]``)."""
    for node in graph:
        if node.op_type == "Gather" and node.domain == "" and len(node.inputs) == 2:
            table, ids = node.inputs
            if ids is not None and ids.name == "input_ids" and table is not None and table.const_value is not None:
                return node
    return None


def _logits_matmul(graph: ir.Graph) -> ir.Node | None:
    """The ``MatMul`` producing the ``logits`` output with a constant right operand ``L [H, V]``."""
    out = next((o for o in graph.outputs if o.name == "logits"), None)
    node = out.producer() if out is not None else None
    if node is None or node.op_type != "MatMul" or node.domain != "" or node.inputs[1].const_value is None:
        return None
    return node


def tie_lm_head(model: ir.Model) -> str:
    """Read the lm_head from the embedding table when ``L = Xᵀ·Eᵀ`` for some small ``X [H, H]``.

    Rewrites that keep a function exact can untie a tied model: folding the final norm's γ gives
    ``L = diag(γ)·R·Eᵀ``-like products, while the embedding is ``E·R``. Both are ``V×H`` tables (113 MB each in
    float32 for SmolLM2), the ``X`` relating them is ``H×H``. ``X = argmin ‖E·X − Lᵀ‖`` (least squares, float64);
    when the relative residual is below ``TIE_TOLERANCE`` the logits become ``(h·Xᵀ)·Eᵀ`` — one ``H×H`` matmul
    more per token (``H/V`` of the lm_head's work), one table less in the file. ``X = I`` (a plain tied model)
    drops the extra matmul. Returns a one-line report."""
    graph = model.graph
    gather, node = _embedding_gather(graph), _logits_matmul(graph)
    if gather is None or node is None:
        return "lm_head: no embedding Gather and constant logits MatMul pair; left as is"
    table = gather.inputs[0]
    lm = node.inputs[1]
    E = np.asarray(table.const_value.numpy(), dtype=np.float64)
    L = np.asarray(lm.const_value.numpy(), dtype=np.float64)
    if E.ndim != 2 or L.shape != (E.shape[1], E.shape[0]):
        return f"lm_head: shapes {tuple(L.shape)} and {tuple(E.shape)} do not pair; left as is"
    if lm is table:
        return "lm_head: already reads the embedding table"
    X = np.linalg.lstsq(E, L.T, rcond=None)[0]  # [H, H]
    residual = float(np.linalg.norm(E @ X - L.T) / max(np.linalg.norm(L), 1e-30))
    if not residual <= TIE_TOLERANCE:
        return f"lm_head: not a function of the embedding table (relative residual {residual:.1e}); kept separate"
    h = node.inputs[0]
    identity = np.abs(X - np.eye(X.shape[0])).max() <= TIE_TOLERANCE
    if not identity:
        xt = _initializer(graph, f"{lm.name}.tie", X.T.astype(np.float32))
        mix = ir.node("MatMul", [h, xt], name=f"{node.name}.tie")
        graph.insert_before(node, mix)
        h = mix.outputs[0]
    et = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name=f"{node.name}.table")
    graph.insert_before(node, et)
    node.replace_input_with(0, h)
    node.replace_input_with(1, et.outputs[0])
    if not lm.uses():
        graph.initializers.pop(lm.name)
    extra = "" if identity else f" after an {X.shape[0]}×{X.shape[0]} matmul"
    return f"lm_head: reads the embedding table{extra} (relative residual {residual:.1e}); one {E.shape[0]}×" \
           f"{E.shape[1]} table stored instead of two"


def _vocab_codes(table: np.ndarray, bits: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(unsigned codes [V, H] with zero point 2^(b−1), scales [V, H/32]) of a table the recipe's ``vocab``
    pass left on its grid; refuses a table whose codes do not reproduce it exactly."""
    import torch

    from qcompile.errors import ExportError
    from qcompile.passes.vocab import VOCAB_GROUP, vocab_rtn

    t = torch.from_numpy(np.array(table, dtype=np.float32))
    if t.shape[1] % VOCAB_GROUP:
        raise ExportError(f"{what}: width {t.shape[1]} is not a multiple of the vocabulary group {VOCAB_GROUP}")
    qw = vocab_rtn(t, bits)
    if not torch.equal(qw.weight, t):
        raise ExportError(f"{what}: the table is not on the recipe's {bits}-bit vocabulary grid (was it quantized "
                          "by weights.vocab_bits?)")
    return qw.codes.numpy(), qw.scales.float().reshape(t.shape[0], -1).numpy()


def _take_place(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """``new`` (one output) instead of ``old``: its output gets the old one's name, type and shape and users."""
    before, after = old.outputs[0], new.outputs[0]
    after.type, after.shape = before.type, before.shape
    graph.insert_before(old, new)
    before.replace_all_uses_with(after, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    after.name = before.name


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes, two per byte along the last axis, the first in the low nibble (onnxruntime's order)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def quantize_vocab_tables(model: ir.Model, bits: int) -> str:
    """The embedding ``Gather`` as ``GatherBlockQuantized`` and the logits ``MatMul`` as ``MatMulNBits`` (``bits``
    4 or 8, blocks of 32, symmetric: onnxruntime's default zero point 2^(b−1) is the grid's), on the codes of the
    tables the ``vocab`` pass quantized. The lm_head's ``accuracy_level`` is ``VOCAB_ACCURACY_LEVEL``: 4-bit
    tables keep the input float, as the recipe does; 8-bit ones need onnxruntime's int8 compute (its input
    quantized per block of 32), the only fast 8-bit kernel it has. Returns a one-line report."""
    from qcompile.passes.vocab import VOCAB_GROUP

    graph = model.graph
    done = []
    gather = _embedding_gather(graph)
    if gather is not None:
        table = gather.inputs[0]
        codes, scales = _vocab_codes(table.const_value.numpy(), bits, f"embedding {table.name}")
        data = codes if bits == 8 else _pack_nibbles(codes)
        new = ir.node("GatherBlockQuantized", [_initializer(graph, f"{table.name}_q{bits}", data), gather.inputs[1],
                                               _initializer(graph, f"{table.name}_scales", scales)],
                      attributes={"bits": bits, "block_size": VOCAB_GROUP, "gather_axis": 0, "quantize_axis": 1},
                      domain="com.microsoft", name=f"{gather.name}.q{bits}")
        _take_place(graph, gather, new)
        if not table.uses():
            graph.initializers.pop(table.name)
        done.append("embedding as GatherBlockQuantized")
    node = _logits_matmul(graph)
    if node is not None:
        lm = node.inputs[1]
        L = np.asarray(lm.const_value.numpy()).T  # [V, H]
        codes, scales = _vocab_codes(L, bits, f"lm_head {lm.name}")
        V, H = codes.shape
        data = codes.reshape(V, H // VOCAB_GROUP, VOCAB_GROUP)
        data = data if bits == 8 else _pack_nibbles(data)
        new = ir.node("MatMulNBits", [node.inputs[0], _initializer(graph, f"{lm.name}_q{bits}", data),
                                      _initializer(graph, f"{lm.name}_scales", scales.reshape(-1))],
                      attributes={"K": H, "N": V, "bits": bits, "block_size": VOCAB_GROUP,
                                  "accuracy_level": VOCAB_ACCURACY_LEVEL[bits]},
                      domain="com.microsoft", name=f"{node.name}.q{bits}")
        _take_place(graph, node, new)
        if not lm.uses():
            graph.initializers.pop(lm.name)
        done.append("lm_head as MatMulNBits")
    return f"vocabulary tables ({bits}-bit, g{VOCAB_GROUP}): " + (", ".join(done) or "no embedding Gather or "
                                                                  "constant logits MatMul found")
