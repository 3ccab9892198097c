"""fuse_linears: one INT4 op for the linears that read the same input (q|k|v, gate|up).

After ``lower`` every linear is its own ``linear_w4a*`` op, and each A8/A4 linear quantizes its input anew.
Linears that read the same activation with the same quantization compute rows of one matrix product:

    [y_1 | … | y_n] = x · [W_1; …; W_n]ᵀ        (row-wise: packed, scales and zeros are [N, ·] per row)

so they become one op on the weights concatenated along N, whose output is split back. The result is the same
per output element (only the matmul's blocking may change float rounding); a decode step makes one kernel
launch (or one ``MatMulNBits``) where it made n, over a wider N that fills the GPU better.

First, identical pure online ops (``hadamard``, ``fake_quant``, ``quantize_per_token`` and their tuple items)
on the same operands are merged, so q, k and v share one activation quantization. Linears are grouped only when
the op, the activation arguments, the group size, the zero-point presence, the output dtype and the bias
presence all agree; the fused weights are named after their sources
(``…self_attn.q_proj_k_proj_v_proj.weight_packed``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.graph.fx_edit import FxGraph
from qcompile.program import PassReport, Program

qops = torch.ops.qcompile
_PURE = (qops.hadamard.default, qops.fake_quant.default, qops.quantize_per_token.default, operator.getitem)
# op → (index of the first weight argument, number of activation arguments before it)
_LINEARS = {qops.linear_w4a16.default: 1, qops.linear_w4a8.default: 3, qops.linear_w4a4.default: 3}


def merge_duplicate_ops(graph: fx.Graph) -> int:
    """Merge calls of the same pure op on the same arguments (graph order: the first one stays)."""
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _PURE:
            continue
        key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
        try:
            first = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument (a list): leave the node alone
            continue
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    return merged


def _fused_name(names: list[str]) -> str:
    """``a.b.q_proj.weight``, ``a.b.k_proj.weight`` → ``a.b.q_proj_k_proj.weight``: the parts that differ,
    joined, between the common prefix and suffix."""
    parts = [n.split(".") for n in names]
    if len({len(p) for p in parts}) != 1:
        return "_".join(n.replace(".", "_") for n in names)
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    lo, hi = differ[0], differ[-1] + 1
    middle = "_".join(".".join(p[lo:hi]).replace(".", "_") for p in parts)
    return ".".join(parts[0][:lo] + [middle] + parts[0][hi:])


def _group_key(node: fx.Node):
    first_w = _LINEARS[node.target]
    packed, scales, zeros, group, bias = node.args[first_w:first_w + 5]
    if not all(a is None or a.op == "get_attr" for a in (packed, scales, zeros, bias)):
        return None
    rest = node.args[first_w + 5:]  # out_dtype for W4A8/W4A4
    return (node.target, node.args[:first_w], group, zeros is None, bias is None, rest)


def fuse_shared_input_linears(gm: fx.GraphModule, report: PassReport | None = None) -> int:
    """Fuse, in place, the INT4 linears of ``gm`` that share their input (see the module docstring); returns
    how many ops the fused ones replaced."""
    graph, edit = gm.graph, FxGraph(gm)
    merged = merge_duplicate_ops(graph)
    groups: dict = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _LINEARS:
            key = _group_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
    replaced, sources = 0, []
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first_w = _LINEARS[nodes[0].target]
        packed_names = [n.args[first_w].target for n in nodes]
        sources += [a.target for n in nodes for a in n.args[first_w:first_w + 5] if isinstance(a, fx.Node)]
        base = _fused_name([name.removesuffix("_packed") for name in packed_names])
        tensors = [[None if a is None else edit.weight(a.target) for a in n.args[first_w:first_w + 3]] + [
            None if n.args[first_w + 4] is None else edit.weight(n.args[first_w + 4].target)] for n in nodes]
        sizes = [t[0].shape[0] for t in tensors]
        fused = []
        for i, suffix in enumerate(("_packed", "_scales", "_zeros", "_bias")):
            if tensors[0][i] is None:
                fused.append(None)
                continue
            fused.append(edit.add_weight(base + suffix, torch.cat([t[i] for t in tensors], dim=0)))
        args = list(nodes[0].args)
        args[first_w:first_w + 3] = fused[:3]
        args[first_w + 4] = fused[3]
        with graph.inserting_before(nodes[0]):
            new = graph.call_function(nodes[0].target, tuple(args))
            parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (new, sizes, -1))
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        vals = [n.meta.get("val") for n in nodes]
        if all(v is not None for v in vals):
            new.meta["val"] = torch.cat(vals, dim=-1)
            parts.meta["val"] = list(vals)
        for node, out, val in zip(nodes, outs, vals):
            out.meta["val"] = val
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        replaced += len(nodes)
        if report is not None:
            report.count(f"{len(nodes)} linears → 1", base)
    graph.eliminate_dead_code()
    for name in dict.fromkeys(sources):  # the per-linear weights no node reads any more
        if not edit.readers_of_weight(name):
            edit.drop_weight(name)
    gm.recompile()
    if report is not None and merged:
        report.count("duplicate online ops merged", n=merged)
    return replaced


def fuse_linears(program: Program) -> Program:
    """The Program with its shared-input INT4 linears fused (fx graphs; a lowered program)."""
    p = program.clone()
    report = PassReport("fuse_linears")
    if p.ir != "fx":
        report.skip("graph", f"{p.ir} graphs: onnxruntime's own fusions apply there")
        return p.done(report)
    fuse_shared_input_linears(p.module, report)
    return p.done(report)
