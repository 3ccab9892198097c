"""kv_cache: turn a captured full-sequence graph into a decoder step with a KV cache.

The captured graph maps ``input_ids [B, S]`` to logits and attends over its own S tokens. Generation
wants one step to cost one token, so this pass gives the graph the cache as data:

    forward(input_ids [B, S], past_key_0, past_value_0, …)  →  (logits, present_key_0, present_value_0, …)

with ``past_*`` of shape ``[B, n_kv_heads, P, head_dim]`` (P ≥ 0 tokens already seen) and
``present_* = cat(past, new)`` of ``[B, n_kv_heads, P + S, head_dim]``. Three edits, each at the
attention op the matcher found, so whatever the recipe inserted before it (R3 Hadamards, K/V fake
quantization) runs on the new tokens only and the cache holds exactly the values attention reads:

1. **K and V operands.** The operand is ``[B, H, S, D]`` with every kv head repeated ``r = H / H_kv``
   times (GQA, ``head h`` reads kv head ``h // r``), so its distinct heads are ``operand[:, ::r]``.
   ``present = cat(past, operand[:, ::r])`` along the sequence, and attention reads ``present``
   repeated again (unsqueeze → expand → flatten). Per-head ops commute with the repeat, so the values
   are the ones the full-sequence graph computes.
2. **Positions.** Every ``arange(S)`` whose result reaches RoPE's ``cos``/``sin`` becomes
   ``arange(S) + P``: new token ``i`` sits at position ``P + i``.
3. **Mask.** Attention gets ``mask[i, j] = j ≤ P + i`` over the ``P + S`` keys (bottom-right causal);
   the model's own mask (built for ``P = 0``) is dropped. This is the plain causal mask: it assumes
   unpadded sequences and no sliding window (a window longer than the sequence is the same thing).

With ``P = 0`` the step is the original graph; tests check that and that decoding token by token
gives the full-sequence logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile.errors import UnsafeRewriteError
from qcompile.graph.fx import follow_input_device
from qcompile.program import PassReport, Program

aten = torch.ops.aten
_SEQ_DIM = 2


@dataclass(frozen=True)
class CacheLayout:
    """What the cache needs to know of each attention op, in graph order: its heads and head size.

    Saved with a compiled model (``artifact``), so a graph read back from disk gets its cache without
    matching it again."""

    n_heads: tuple[int, ...]
    n_kv_heads: tuple[int, ...]
    head_dim: int

    @classmethod
    def of(cls, mm) -> "CacheLayout":
        """The layout of a matched model; refuses one whose attention the matcher could not prove."""
        missing = [b.index for b in mm.blocks if b.attention is None]
        if missing or not mm.blocks:
            raise UnsafeRewriteError(f"kv_cache: attention is not matched in block(s) {missing or 'all'}; the cache "
                                     "needs every attention op's heads")
        attn = [b.attention for b in mm.blocks]
        return cls(tuple(a.n_heads for a in attn), tuple(a.n_kv_heads for a in attn), attn[0].head_dim)

    @property
    def layers(self) -> int:
        return len(self.n_heads)

    def empty(self, batch: int, dtype=torch.float32, device=None, slots: int = 0) -> list[torch.Tensor]:
        """The cache of a sequence not started yet: ``[past_key_0, past_value_0, …]`` with P = 0 (or, for a
        static cache, ``slots`` zeroed slots)."""
        return [torch.zeros(batch, h, slots, self.head_dim, dtype=dtype, device=device)
                for h in self.n_kv_heads for _ in (0, 1)]

    def to_dict(self) -> dict:
        return {"n_heads": list(self.n_heads), "n_kv_heads": list(self.n_kv_heads), "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, d: dict) -> "CacheLayout":
        return cls(tuple(d["n_heads"]), tuple(d["n_kv_heads"]), int(d["head_dim"]))


def _input_ids(graph: fx.Graph) -> fx.Node:
    for n in graph.nodes:
        if n.op == "placeholder" and n.name == "input_ids":
            return n
    raise UnsafeRewriteError("kv_cache: the graph has no input_ids placeholder")


def _seq_size(ids: fx.Node) -> fx.Node | None:
    """The ``sym_size(input_ids, 1)`` node (S), if the capture made one."""
    for n in ids.users:
        if n.op == "call_function" and n.target == aten.sym_size.int and n.args[1] == 1:
            return n
    return None


def _reaches(start: fx.Node, targets: set) -> bool:
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in targets:
            return True
        todo.extend(n.users)
    return False


def _position_aranges(graph: fx.Graph, seq: fx.Node) -> list[fx.Node]:
    """``arange(S)`` nodes whose values reach RoPE's cos/sin: the positions of the new tokens."""
    trig = {aten.cos.default, aten.sin.default}
    return [n for n in graph.nodes
            if n.op == "call_function" and n.target == aten.arange.default and n.args[:1] == (seq,)
            and _reaches(n, trig)]


def _check_heads(node: fx.Node, pos: int, heads: int, head_dim: int) -> None:
    val = node.args[pos].meta.get("val") if isinstance(node.args[pos], fx.Node) else None
    if val is None or val.dim() != 4 or val.shape[1] != heads or val.shape[3] != head_dim:
        shape = None if val is None else tuple(val.shape)
        raise UnsafeRewriteError(f"kv_cache: operand {pos} of {node.name} has shape {shape}, expected "
                                 f"[B, {heads}, S, {head_dim}]")


def add_kv_cache(program: Program) -> Program:
    """The decoder-step form of ``program`` (see the module docstring); refuses what it cannot prove. An ONNX
    Program gets the same three edits from ``graph/onnx_cache`` (onnxruntime-genai's input and output names)."""
    p = program.clone()
    layout = CacheLayout.of(p.model_map)
    report = PassReport("kv_cache")
    if p.ir == "onnx":  # the same edits on ONNX, under onnxruntime-genai's names (graph/onnx_cache)
        from qcompile.graph.onnx_cache import with_kv_cache as onnx_with_kv_cache

        onnx_with_kv_cache(p.graph, layout, [b.attention.node for b in p.model_map.blocks], report)
    else:
        with_kv_cache(p.module, layout, report)
    return p.done(report)


def with_kv_cache(gm: fx.GraphModule, layout: CacheLayout, report: PassReport | None = None,
                  static: bool = False) -> fx.GraphModule:
    """Edit ``gm`` in place into the decoder step for ``layout``; returns it.

    ``static``: the cache is preallocated instead (see ``StaticCache``): ``forward(input_ids,
    cache_position [S], key_cache_0, value_cache_0, …) → (logits,)`` writes the new K/V at
    ``cache_position`` in place (``index_copy_``) and attends over all ``M`` slots with
    ``mask[i, j] = j ≤ cache_position[i]``; every step has the same shapes, so it can be replayed as a
    CUDA graph.
    """
    report = report or PassReport("kv_cache")
    graph = gm.graph
    ids = _input_ids(graph)
    seq = _seq_size(ids)
    attn = [n for n in graph.nodes if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default]
    if len(attn) != layout.layers:
        raise UnsafeRewriteError(f"kv_cache: the graph has {len(attn)} attention ops, the layout {layout.layers}")
    if seq is None:
        raise UnsafeRewriteError("kv_cache: the graph never reads the sequence length of input_ids")
    aranges = _position_aranges(graph, seq)
    if not aranges:
        raise UnsafeRewriteError("kv_cache: no arange(S) feeds RoPE's cos/sin (positions are not RoPE); "
                                 "cannot offset the positions")

    # 1. the cache inputs, after input_ids
    caches = []
    prefix = ("key_cache", "value_cache") if static else ("past_key", "past_value")
    with graph.inserting_after(ids):
        for i in reversed(range(len(attn))):
            v = graph.placeholder(f"{prefix[1]}_{i}")
            k = graph.placeholder(f"{prefix[0]}_{i}")
            caches[:0] = [(k, v)]
        if static:
            cache_position = graph.placeholder("cache_position")
    # 2. positions: arange(S) + P, or the given cache_position
    with graph.inserting_after(seq):
        p_len = None if static else graph.call_function(aten.sym_size.int, (caches[0][0], _SEQ_DIM))
    for n in aranges:
        if static:
            n.replace_all_uses_with(cache_position)
            report.count("positions from cache_position", n.name)
            continue
        with graph.inserting_after(n):
            shifted = graph.call_function(aten.add.Tensor, (n, p_len))
        n.replace_all_uses_with(shifted, delete_user_cb=lambda u: u is not shifted)
        report.count("positions offset by P", n.name)
    # 3. K/V through the cache, and the causal mask over the cached keys
    presents = []
    mask = None
    for node, heads, kv_heads in zip(attn, layout.n_heads, layout.n_kv_heads):
        rep = heads // kv_heads
        with graph.inserting_before(node):
            for pos, cache in zip((1, 2), caches[len(presents) // 2]):
                _check_heads(node, pos, heads, layout.head_dim)
                op = node.args[pos]
                distinct = op if rep == 1 else graph.call_function(aten.slice.Tensor, (op, 1, 0, heads, rep))
                if static:
                    present = graph.call_function(aten.index_copy_.default, (cache, _SEQ_DIM, cache_position, distinct))
                else:
                    present = graph.call_function(aten.cat.default, ([cache, distinct], _SEQ_DIM))
                full = present
                if rep > 1:
                    full = graph.call_function(aten.unsqueeze.default, (present, 2))
                    full = graph.call_function(aten.expand.default, (full, [-1, -1, rep, -1, -1]))
                    full = graph.call_function(aten.flatten.using_ints, (full, 1, 2))
                node.update_arg(pos, full)
                presents.append(present)
            if mask is None:
                if static:
                    q = graph.call_function(aten.unsqueeze.default, (cache_position, 1))
                else:
                    q = graph.call_function(aten.arange.default, (seq,), {"device": _device(node)})
                    q = graph.call_function(aten.unsqueeze.default, (graph.call_function(aten.add.Tensor, (q, p_len)), 1))
                mask = _causal_mask(graph, q, presents[-1], node)
        args = list(node.args) + [None] * (4 - len(node.args))
        args[3] = mask
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "is_causal"}
        report.count("attention with cache", node.name)
    # 4. outputs: (logits, present_key_0, present_value_0, ...) or (logits,); plain positional calling convention
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = ((_logits(out),) if static else (_logits(out), *presents),)
    graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    graph.eliminate_dead_code()
    follow_input_device(gm)  # the mask's aranges were made on the capture's device
    graph.lint()
    gm.recompile()
    report.notes["cache"] = (f"{layout.layers} layers × (K, V) [B, n_kv_heads, {'M' if static else 'P'}, "
                             f"{layout.head_dim}]; mask: causal, no padding")
    return gm


def _device(node: fx.Node):
    val = node.args[0].meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None


def _causal_mask(graph: fx.Graph, q_pos: fx.Node, keys: fx.Node, anchor: fx.Node) -> fx.Node:
    """bool ``[1, 1, S, T]`` with ``mask[i, j] = j ≤ q_pos[i]`` over the ``T`` keys of ``keys`` (q_pos: ``[S, 1]``)."""
    total = graph.call_function(aten.sym_size.int, (keys, _SEQ_DIM))
    k = graph.call_function(aten.arange.default, (total,), {"device": _device(anchor)})
    mask = graph.call_function(aten.le.Tensor, (k, q_pos))
    mask = graph.call_function(aten.unsqueeze.default, (mask, 0))
    return graph.call_function(aten.unsqueeze.default, (mask, 0))


def _logits(out: fx.Node) -> fx.Node:
    """The logits node among the graph's outputs (the first tensor output of the causal LM)."""
    flat = out.args[0]
    while isinstance(flat, (tuple, list)):
        flat = flat[0]
    if not isinstance(flat, fx.Node):
        raise UnsafeRewriteError("kv_cache: the graph's first output is not a tensor (logits)")
    return flat

