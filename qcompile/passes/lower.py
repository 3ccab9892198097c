"""lower: replace fake-quantized linears by INT4 ops on packed weights (``GraphEdit.lower_linear``).

For each linear whose weight the quantize pass left on a 4-bit affine grid (``program.quantized``):
- input in float (no activation fake-quant before it): ``linear_w4a16(x, packed, scales, zeros, g, bias)``;
- input ``fake_quant(x, a, sym, clip)``: ``quantize_per_token(x, a, sym, clip)`` → int8 codes + scales,
  then ``linear_w4a8`` (a = 8) or ``linear_w4a4`` (a = 4); when x is itself an online
  ``hadamard(x, block)`` (R4), the rotation is fused into the quantizer (``rotate=True``), one pass.
Weights are packed in the canonical format of ``quant/formats.py`` and stored under their source name
with a suffix (``<weight>_packed``, ``_scales``, ``_zeros``) so every packed tensor traces back to its
source. The math is the fake-quant graph's: the reference ops dequantize with the same grids, so the
lowered program matches the fake-quantized one to float32 rounding (tests state the tolerance).
Routed experts (a stacked ``[E, out, in]`` weight run by a grouped matmul over rows sorted by expert, ``offs``
their cumulative counts) become one ``grouped_linear_w4a16(x, offs, packed [E, N, ·], scales, zeros, g)``: one
node in the graph, one int4 linear per expert inside the op (measured against one node per expert in
``benchmarks/moe_lowering.py``); on a fake-quantized input, ``quantize_per_token`` over all rows (per-token
codes do not depend on the expert) then ``grouped_linear_w4a8``/``w4a4``.
Anything else (codebooks, other bit widths) stays fake-quantized and is reported.
On an ONNX graph the same ops are ``kernels/ort``'s translations (MatMulNBits; per-token int8 codes and
MatMulInteger), the ones the ONNX export writes; routed experts stay fake-quantized there (reported).
"""

from __future__ import annotations

import torch

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.graph.fx_edit import per_token_codes, quantized_input
from qcompile.program import PassReport, Program


def _skip_reason(lin, qw, ir: str) -> str | None:
    if qw.codebook is not None:
        return "non-uniform codebook (no INT4 affine kernel)"
    if qw.spec.bits != 4:
        return f"{qw.spec.bits}-bit weights (kernels are INT4)"
    if lin.experts and ir != "fx":
        return f"stacked expert weights (no grouped INT4 op on {ir} graphs yet)"
    return None


def _lower_experts(p: Program, node, lin, qw, report: PassReport) -> None:
    """grouped_mm(x, Wᵀ, offs) → grouped_linear_w4a16(x, offs, packed [E, N, ·], scales, zeros, g), or, on a
    fake-quantized input, quantize_per_token → grouped_linear_w4a8/w4a4."""
    from qcompile.passes.experts import offsets_of

    qops = torch.ops.qcompile
    graph = p.module.graph
    packed = qw.pack()
    e, n = lin.experts, lin.out_features
    w_packed, w_scales, w_zeros = p.graph.add_packed(lin.weight, packed, (e, n))
    x, offs = node.args[0], offsets_of(node)
    fq = quantized_input(x)
    with graph.inserting_before(node):
        if fq:
            codes, scales, zeros = per_token_codes(graph, fq)
            _, bits, symmetric, _, rotate, _ = fq
            op = qops.grouped_linear_w4a8.default if bits > 4 else qops.grouped_linear_w4a4.default
            new = graph.call_function(op, (codes, scales, None if symmetric else zeros, offs, w_packed, w_scales,
                                           w_zeros, packed.group_size, node.meta["val"].dtype))
            report.count(f"W4A{bits} grouped experts" + (" (fused R4)" if rotate else ""), lin.weight)
        else:
            new = graph.call_function(qops.grouped_linear_w4a16.default,
                                      (x, offs, w_packed, w_scales, w_zeros, packed.group_size))
            report.count("W4A16 grouped experts", lin.weight)
    new.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def lower(program: Program) -> Program:
    p = program.clone()
    report = PassReport("lower")
    for node_name, lin in p.model_map.linears.items():
        qw = p.quantized.get(lin.weight)
        if qw is None:
            continue
        reason = _skip_reason(lin, qw, p.ir)
        if reason:
            report.skip(lin.weight, reason)
            continue
        if lin.experts:
            _lower_experts(p, p.node(node_name), lin, qw, report)
            continue
        report.count(p.graph.lower_linear(node_name, lin.weight, qw.pack()), lin.weight)
    p.graph.eliminate_dead_code()
    for w in p.quantized:  # float weights that no node reads any more (their packed form replaced them)
        if p.graph.has_weight(w) and not p.graph.readers_of_weight(w):
            p.graph.drop_weight(w)
    report.notes["lowered"] = "the ModelMap describes the graph before lowering"
    return p.done(report)
