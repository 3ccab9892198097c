"""Fold per-token activation quantization into the INT4 linear that consumes it.

The lowering writes an A8/A4 linear as ``codes, scales, zeros = quantize_per_token(x, b, sym, clip)`` followed
by ``linear_w4a8/w4a4(codes, scales, zeros or None, W…)``. At one token those are two launches with the codes
written to memory and read back; ``linear_w4ax_dynamic(x, b, sym, clip, W…)`` is the same computation as one
op, whose CUDA kernel quantizes x itself (``triton/w4a16._gemv_act_kernel``). This pass rewrites every such
linear of a graph into that op, where it is the same computation by definition:

- the quantization has no rotation (``rotate=False``; a rotated one is left as it is);
- the linear reads the quantization's codes and scales, and its zeros or (symmetric only: they are 0) None.

Each linear gets its own op (a quantization shared by several linears is computed by each: at one token that
is a read of x from L2 inside each GEMV); the quantization node is removed once nothing else reads it. Run on
the graph a backend compiles (``export/backend.py``), not on the Program: exported artifacts keep the two ops.

Off unless ``QCOMPILE_ACT_GEMV=1`` (``enabled``): on the H200 (2026-11-30, ``kernels-h200.md``) the one-launch
kernel was slower than quantize-then-codes-GEMV at 22016×4096 and 4096×4096 (each program reduces the whole row
before its first weight load) and gave 3 results off by about one code in ~40 checks at 22016×4096 only,
not yet explained; without it the folded op is the two launches plus host time.
"""

from __future__ import annotations

import operator
import os

import torch
from torch import fx

import qcompile.kernels.ops  # noqa: F401 - registers the ops

__all__ = ["enabled", "fold_activation_quant"]


def enabled() -> bool:
    """Whether the backend folds and the tuner offers the GEMV that quantizes x itself (``QCOMPILE_ACT_GEMV=1``)."""
    return os.environ.get("QCOMPILE_ACT_GEMV", "0") == "1"


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _item(node, q: fx.Node, i: int) -> bool:
    return _is(node, operator.getitem) and node.args[0] is q and node.args[1] == i


def fold_activation_quant(gm: fx.GraphModule) -> int:
    """Rewrite ``linear_w4a8/w4a4(quantize_per_token(x))`` into ``linear_w4ax_dynamic(x)`` in place (see the
    module docstring); returns how many linears were rewritten."""
    qops = torch.ops.qcompile
    quant = (qops.quantize_per_token.default, qops.quantize_per_token)
    linears = (qops.linear_w4a8.default, qops.linear_w4a4.default, qops.linear_w4a8, qops.linear_w4a4)
    graph = gm.graph
    folded = 0
    for lin in list(graph.nodes):
        if not _is(lin, *linears):
            continue
        args = dict(zip(("x_codes", "x_scales", "x_zeros", "packed_weight", "w_scales", "w_zeros", "group_size",
                         "bias", "out_dtype"), lin.args))
        args.update(lin.kwargs)
        codes = args["x_codes"]
        if not _is(codes, operator.getitem) or not _is(codes.args[0], *quant):
            continue
        q = codes.args[0]
        x, bits, symmetric, clip, rotate, block = (list(q.args) + [False, 0])[:6]
        if rotate or not _item(codes, q, 0) or not _item(args["x_scales"], q, 1):
            continue
        zeros = args["x_zeros"]
        if not (_item(zeros, q, 2) or (zeros is None and symmetric)):
            continue
        with graph.inserting_before(lin):
            new = graph.call_function(qops.linear_w4ax_dynamic.default, (
                x, bits, symmetric, clip, args["packed_weight"], args["w_scales"], args["w_zeros"],
                args["group_size"], args.get("bias"), args.get("out_dtype", torch.bfloat16)))
        new.meta.update(lin.meta)
        lin.replace_all_uses_with(new)
        graph.erase_node(lin)
        folded += 1
        _drop_if_unread(q)
    if folded:
        gm.recompile()
    return folded


def _drop_if_unread(q: fx.Node) -> None:
    """Erase the quantization and its tuple items once nothing reads them (only these nodes: a general dead-code
    pass could drop the graph's in-place cache writes)."""
    for item in list(q.users):
        if _is(item, operator.getitem) and not item.users:
            q.graph.erase_node(item)
    if not q.users:
        q.graph.erase_node(q)
