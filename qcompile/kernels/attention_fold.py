"""Route a decode graph's attention through ``qcompile::decode_attention``.

The ``kv_cache`` pass leaves each layer's attention as ``scaled_dot_product_attention(q, K, V, mask)`` with a
bool mask over the whole static cache, and for grouped-query models ``K = flatten(expand(unsqueeze(cache, 2),
[…, g, …]), 1, 2)`` (transformers' ``repeat_kv`` applied to the cache). Compiled as it is, Inductor writes the
repeated cache out (g copies of every key and value, each step) and runs a flash kernel with one program per
head. ``decode_attention(q, cache_k, cache_v, mask, scale)`` is the same function by definition (query head h
reads cache head ``h // g``, exactly what the repeat gives it) and reads the cache in place, split along the
keys (``triton/decode_attention.py``).

Rewritten: an SDPA call with a bool mask, no dropout, not ``is_causal``, and 4-d q/k/v of static shapes (a
static-cache step; a ``dynamic=True`` graph is left to Inductor); its k and v are
unwrapped from the repeat pattern above when they have it. Run on the graph the backend compiles
(``export/backend.py``); exported artifacts keep plain attention. ``QCOMPILE_DECODE_ATTENTION=0`` turns it
off (``enabled``), for A/B timings.
"""

from __future__ import annotations

import os

import torch
from torch import fx

import qcompile.kernels.ops  # noqa: F401 - registers the ops

__all__ = ["enabled", "fold_decode_attention"]

_aten = torch.ops.aten


def enabled() -> bool:
    """Whether the backend routes decode attention through ``decode_attention`` (unless ``QCOMPILE_DECODE_ATTENTION=0``)."""
    return os.environ.get("QCOMPILE_DECODE_ATTENTION", "1") != "0"


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _meta(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def _unrepeat(node: fx.Node) -> fx.Node:
    """The cache a ``repeat_kv`` pattern reads (``flatten(expand(unsqueeze(x, 2), …), 1, 2)``), else the node."""
    if not (_is(node, _aten.flatten.using_ints) and tuple(node.args[1:3]) == (1, 2)):
        return node
    expand = node.args[0]
    if not (_is(expand, _aten.expand.default) and len(expand.users) == 1):
        return node
    unsq = expand.args[0]
    if not (_is(unsq, _aten.unsqueeze.default) and unsq.args[1] == 2 and len(unsq.users) == 1):
        return node
    source = unsq.args[0]
    sizes = list(expand.args[1])
    meta = _meta(source)
    if len(sizes) != 5 or (meta is not None and meta.dim() != 4):
        return node
    # the repeat must keep batch, heads, keys and head_dim (-1 or their sizes) and only add the group dim
    if meta is not None and any(s not in (-1, n) for s, n in zip(sizes[:2] + sizes[3:], meta.shape)):
        return node
    return source


def fold_decode_attention(gm: fx.GraphModule) -> int:
    """Rewrite the graph's foldable ``scaled_dot_product_attention`` calls in place (see the module docstring);
    returns how many were rewritten."""
    graph = gm.graph
    folded = 0
    for node in list(graph.nodes):
        if not _is(node, _aten.scaled_dot_product_attention.default):
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        args = {**dict(zip(names, node.args)), **node.kwargs}
        q, k, v, mask = (args.get(n) for n in names[:4])
        if args.get("dropout_p", 0.0) or args.get("is_causal", False) or not isinstance(mask, fx.Node):
            continue
        metas = [_meta(x) for x in (q, k, v, mask)]
        if any(m is None for m in metas) or metas[3].dtype != torch.bool or any(m.dim() != 4 for m in metas[:3]):
            continue
        if not all(isinstance(n, int) for m in metas for n in m.shape):  # symbolic shapes: a dynamic graph
            continue
        kc, vc = _unrepeat(k), _unrepeat(v)
        if (kc is k) != (vc is v):  # one repeated and not the other: leave it
            continue
        if not args.get("enable_gqa", False) and kc is k and metas[0].shape[1] != metas[1].shape[1]:
            continue
        scale = args.get("scale")
        scale = float(metas[0].shape[-1] ** -0.5 if scale is None else scale)
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.qcompile.decode_attention.default, (q, kc, vc, mask, scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for dead in (k, v):  # the repeat, now unread
            while isinstance(dead, fx.Node) and not dead.users and dead not in (kc, vc):
                src = dead.args[0]
                graph.erase_node(dead)
                dead = src
        folded += 1
    if folded:
        graph.lint()
        gm.recompile()
    return folded
