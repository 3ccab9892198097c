"""ModelMap: what the matcher found, as pure data that names nodes and weights as the source graph does.

Nodes are OpGraph node names (fx node names, or ONNX value names); weights are source names (fx
parameter names, or ONNX initializer names, generated ones like ``val_102`` included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Linear:
    """A matmul with a weight: ``y = x·Wᵀ + b`` along the weight's ``in_axis``/``out_axis``."""

    node: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    in_axis: int = -1
    out_axis: int = -2
    experts: int | None = None  # a stacked expert weight [E, out, in]


@dataclass(frozen=True)
class Proj:
    """A role played by the output rows [start, stop) of a linear (all of them unless it is fused)."""

    linear: str
    start: int
    stop: int


@dataclass(frozen=True)
class Norm:
    kind: str  # "rms" or "layer"
    node: str  # the norm's output (the readers read it)
    input: str  # the residual-stream value it normalizes
    weight: str | None
    bias: str | None
    offset: float  # the effective scale is weight + offset (Gemma: 1)
    eps: float | None
    readers: tuple[str, ...]  # Linear nodes fed by the norm


@dataclass(frozen=True)
class Attention:
    node: str  # the scaled-dot-product attention node
    q: Proj
    k: Proj
    v: Proj
    o: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: bool
    qk_norm: bool
    q_input: str  # the values fed to the attention op as q and k (after RoPE): where R3 goes
    k_input: str


@dataclass(frozen=True)
class FFN:
    kind: str  # "gated" (act(gate)·up), "mlp" (act(fc1)), "moe" (routed gated experts)
    gate: Proj | None
    up: Proj
    down: str
    act: str
    router: str | None = None
    experts: int | None = None


@dataclass(frozen=True)
class Block:
    index: int
    attn_norm: Norm
    attention: Attention
    attn_add: str
    ffn_norm: Norm
    ffn: FFN
    ffn_add: str


@dataclass(frozen=True)
class Embedding:
    node: str
    weight: str


@dataclass(frozen=True)
class Invariance:
    """A fact a rewrite relies on, and whether the matcher proved it (with the reason when not)."""

    name: str
    holds: bool
    reason: str


@dataclass(frozen=True)
class ModelMap:
    hidden: int
    embedding: Embedding
    positional: Embedding | None
    embed_scale: str | None  # node of a scalar multiplying the embeddings (Gemma), harmless to R1
    blocks: tuple[Block, ...]
    final_norm: Norm
    lm_head: str
    tied: bool
    linears: dict = field(default_factory=dict)  # node -> Linear
    invariances: tuple[Invariance, ...] = ()

    @property
    def norms(self) -> tuple[Norm, ...]:
        return tuple(n for b in self.blocks for n in (b.attn_norm, b.ffn_norm)) + (self.final_norm,)

    @property
    def writers(self) -> tuple[str, ...]:
        """Linear nodes whose outputs are added into the residual stream."""
        return tuple(w for b in self.blocks for w in (b.attention.o, b.ffn.down))

    @property
    def readers(self) -> tuple[str, ...]:
        return tuple(r for n in self.norms for r in n.readers)

    def holds(self, name: str) -> Invariance | None:
        return next((i for i in self.invariances if i.name == name), None)

    def summary(self) -> dict:
        """Roles, counts and head geometry: what must agree between the fx and ONNX captures."""
        a = self.blocks[0].attention
        f = self.blocks[0].ffn
        return {
            "hidden": self.hidden,
            "layers": len(self.blocks),
            "n_heads": a.n_heads,
            "n_kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim,
            "rope": a.rope,
            "qk_norm": a.qk_norm,
            "norm": self.final_norm.kind,
            "norm_offset": self.final_norm.offset,
            "ffn": f.kind,
            "act": f.act,
            "experts": f.experts,
            "ffn_width": self.linears[f.down].in_features,
            "fused_qkv": a.q.linear == a.v.linear,
            "fused_gate_up": f.gate is not None and f.gate.linear == f.up.linear,
            "positional_embedding": self.positional is not None,
            "embed_scale": self.embed_scale is not None,
            "tied": self.tied,
            "linears": len(self.linears),
            "biases": sum(1 for lin in self.linears.values() if lin.bias),
            "readers": len(self.readers),
            "writers": len(self.writers),
        }

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["summary"] = self.summary()
        return d
