"""OpGraph: the IR-neutral view the matcher reads, a ``networkx.DiGraph`` of normalized op kinds.

Each IR adapter (``graph/fx.py``, ``graph/onnx.py``) turns its graph into one of these, so that the
structure of a transformer is matched once, whatever IR it came from. A node carries:

- ``kind``: one of ``KINDS``; ops the matcher does not know keep kind ``other`` and their ``op`` name,
  so that a refusal can name them;
- ``op``: the IR's own op name; ``shape``: the output shape where known (ints, or None for symbolic);
- ``param``: the weight's source name on ``param`` nodes (its identity everywhere in qcompile);
- ``scalar``: a constant operand of an elementwise op (``mul(x, 0.125)``), ``attrs``: op-specific
  facts the adapter resolved (slice dim/start/stop, linear weight axes, ...).
Edges run producer → consumer with ``pos``, the operand position in the consumer.

Views, casts, dropout at inference and other value-preserving ops have kind ``view``; they and the
per-token fake quantization (kind ``quant``) are *transparent*: the matcher sees through them with
``skip_views_back`` and ``users_through_views``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

KINDS = (
    "input",
    "param",
    "output",
    "linear",  # attrs: weight (param node), bias (param node or None), in_axis, out_axis of the weight
    "embedding",  # operand 0: the table (param), operand 1: the ids
    "attention",  # scaled-dot-product attention: operands q, k, v, [mask]
    "matmul",  # a product of two activations (eager attention's q·kᵀ and p·v)
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "mean",
    "rsqrt",
    "sqrt",
    "reciprocal",
    "softmax",
    "activation",  # attrs: fn (silu, gelu, relu, ...)
    "layernorm",  # operands: x, weight, bias; attrs: eps
    "rmsnorm",  # operands: x, weight; attrs: eps
    "view",  # value-preserving: reshape, transpose, cast, expand, dropout(eval), ...
    "slice",  # attrs: dim, start, stop
    "index",  # gathers rows (tokens) by index
    "cat",
    "split",  # a multi-output op (chunk/split); its outputs are ``getitem`` nodes of kind slice
    "sum",
    "hadamard",  # qcompile's online Hadamard over the last dim; attrs: block
    "rope",  # a fused rotary embedding (ONNX RotaryEmbedding): operands x, cos, sin; unfused RoPE is cat/neg/mul/add
    "quant",  # qcompile's per-token fake quantization: per-token, so structure-transparent
    "transform",  # an online orthogonal transform over the last axis (DuQuant's R·P·R), weights pre-transformed
    "other",
)

TRANSPARENT = ("view", "quant", "transform")


@dataclass
class OpGraph:
    """A DiGraph of op kinds plus the IR's output node; built by an IR adapter."""

    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    source: str = "fx"

    def add(self, name: str, kind: str, op: str, shape=None, **attrs) -> None:
        assert kind in KINDS, kind
        self.graph.add_node(name, kind=kind, op=op, shape=shape, **attrs)

    def connect(self, src: str, dst: str, pos: int) -> None:
        self.graph.add_edge(src, dst, pos=pos)

    # --- queries -------------------------------------------------------------------------------------------
    def kind(self, n: str) -> str:
        return self.graph.nodes[n]["kind"]

    def attr(self, n: str, key: str, default=None):
        return self.graph.nodes[n].get(key, default)

    def shape(self, n: str):
        return self.graph.nodes[n].get("shape")

    def operands(self, n: str) -> list[str]:
        """Producers of n ordered by operand position."""
        preds = [(d["pos"], p) for p, _, d in self.graph.in_edges(n, data=True)]
        return [p for _, p in sorted(preds)]

    def operand(self, n: str, pos: int) -> str | None:
        for p, _, d in self.graph.in_edges(n, data=True):
            if d["pos"] == pos:
                return p
        return None

    def users(self, n: str) -> list[str]:
        return list(self.graph.successors(n))

    def nodes_of(self, kind: str) -> list[str]:
        return [n for n, d in self.graph.nodes(data=True) if d["kind"] == kind]

    def skip_views_back(self, n: str) -> str:
        """The first producer of n that is not transparent (n itself if it is none)."""
        while self.kind(n) in TRANSPARENT:
            ops = self.operands(n)
            if not ops:
                return n
            n = ops[0]
        return n

    def users_through_views(self, n: str) -> list[tuple[str, str]]:
        """(consumer, the value it reads) for every non-view consumer reachable from n through views."""
        out, stack = [], [n]
        while stack:
            v = stack.pop()
            for u in self.users(v):
                if self.kind(u) in TRANSPARENT and self.operand(u, 0) == v:
                    stack.append(u)
                elif self.kind(u) not in TRANSPARENT:
                    out.append((u, v))
        return out

    def position(self, consumer: str, producer: str) -> int:
        return self.graph.edges[producer, consumer]["pos"]

    def param_of(self, n: str) -> str | None:
        """The weight's source name when n is (a view of) a param node."""
        n = self.skip_views_back(n)
        return self.attr(n, "param") if self.kind(n) == "param" else None

    def describe(self, n: str) -> str:
        d = self.graph.nodes[n]
        return f"{n} ({d['op']}{', shape ' + str(tuple(d['shape'])) if d.get('shape') else ''})"
