"""lower: replace fake-quantized linears by qcompile's INT4 ops on packed weights.

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
"""

from __future__ import annotations

import operator

import torch

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.program import PassReport, Program

qops = torch.ops.qcompile


def _is(node, op) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target == op


def _skip_reason(lin, qw) -> str | None:
    if qw.codebook is not None:
        return "non-uniform codebook (no INT4 affine kernel)"
    if qw.spec.bits != 4:
        return f"{qw.spec.bits}-bit weights (kernels are INT4)"
    return None


def _quantized_input(graph, x):
    """(src, bits, symmetric, clip, rotate, block) when x = fake_quant(src) or fake_quant(hadamard(src)), else None."""
    if not _is(x, qops.fake_quant.default):
        return None
    src, bits, symmetric, clip = x.args
    rotate, block = False, 0
    if _is(src, qops.hadamard.default):
        rotate, block, src = True, src.args[1], src.args[0]
    return src, bits, symmetric, clip, rotate, block


def _lower_experts(p: Program, node, lin, qw, report: PassReport) -> None:
    """grouped_mm(x, Wᵀ, offs) → grouped_linear_w4a16(x, offs, packed [E, N, ·], scales, zeros, g), or, on a
    fake-quantized input, quantize_per_token → grouped_linear_w4a8/w4a4."""
    from qcompile.passes.experts import offsets_of

    graph = p.module.graph
    packed = qw.pack()
    e, n = lin.experts, lin.out_features
    w_packed = p.add_weight(f"{lin.weight}_packed", packed.packed.reshape(e, n, -1))
    w_scales = p.add_weight(f"{lin.weight}_scales", packed.scales.reshape(e, n, -1))
    w_zeros = p.add_weight(f"{lin.weight}_zeros", packed.zeros.reshape(e, n, -1)) if packed.zeros is not None else None
    x, offs = node.args[0], offsets_of(node)
    fq = _quantized_input(graph, x)
    with graph.inserting_before(node):
        if fq:
            src, bits, symmetric, clip, rotate, block = fq
            q = graph.call_function(qops.quantize_per_token.default, (src, bits, symmetric, clip, rotate, block))
            codes, scales, zeros = (graph.call_function(operator.getitem, (q, i)) for i in range(3))
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
    graph = p.module.graph
    for node_name, lin in p.model_map.linears.items():
        qw = p.quantized.get(lin.weight)
        if qw is None:
            continue
        reason = _skip_reason(lin, qw)
        if reason:
            report.skip(lin.weight, reason)
            continue
        node = p.node(node_name)
        if lin.experts:
            _lower_experts(p, node, lin, qw, report)
            continue
        packed = qw.pack()
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else None
        w_packed = p.add_weight(f"{lin.weight}_packed", packed.packed)
        w_scales = p.add_weight(f"{lin.weight}_scales", packed.scales)
        w_zeros = p.add_weight(f"{lin.weight}_zeros", packed.zeros) if packed.zeros is not None else None
        out_dtype = node.meta["val"].dtype
        fq = _quantized_input(graph, x)
        with graph.inserting_before(node):
            if fq:
                src, bits, symmetric, clip, rotate, block = fq
                q = graph.call_function(qops.quantize_per_token.default, (src, bits, symmetric, clip, rotate, block))
                codes, scales, zeros = (graph.call_function(operator.getitem, (q, i)) for i in range(3))
                op = qops.linear_w4a8.default if bits > 4 else qops.linear_w4a4.default
                new = graph.call_function(op, (codes, scales, None if symmetric else zeros, w_packed, w_scales,
                                               w_zeros, packed.group_size, bias, out_dtype))
                report.count(f"W4A{bits}" + (" (fused R4)" if rotate else ""), lin.weight)
            else:
                new = graph.call_function(qops.linear_w4a16.default,
                                          (x, w_packed, w_scales, w_zeros, packed.group_size, bias))
                report.count("W4A16", lin.weight)
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    _drop_unused(p, [w for w in p.quantized if not p.users_of_weight(w)])
    report.notes["lowered"] = "the ModelMap describes the graph before lowering"
    return p.done(report)


def _drop_unused(p: Program, names: list[str]) -> None:
    """Remove float weights that no graph node reads any more (their packed form replaced them)."""
    for name in names:
        *path, leaf = name.split(".")
        mod = p.module.get_submodule(".".join(path)) if path else p.module
        if hasattr(mod, leaf):
            delattr(mod, leaf)
