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
    """A norm on the residual stream (its readers are linears), or a post-norm on a branch (no readers).

    ``kind`` "none" stands for a stream value read by linears directly (OLMo-2 has no pre-norm): node is
    the stream value itself, nothing to fold. ``centre`` names the ``x − mean(x)`` nodes of a LayerNorm
    written out in elementwise ops (Cohere), which ``fold_norms`` removes once the stream is mean-free.
    """

    kind: str  # "rms", "layer" or "none"
    node: str  # the norm's output (the readers read it)
    input: str  # the residual-stream value it normalizes
    weight: str | None
    bias: str | None
    offset: float  # the effective scale is weight + offset (Gemma: 1)
    eps: float | None
    readers: tuple[str, ...]  # Linear nodes fed by the norm
    centre: tuple[str, ...] = ()


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
    rope_inside: bool = False  # RoPE applied inside the attention op (GroupQueryAttention do_rotary): no R3 site


@dataclass(frozen=True)
class FFN:
    kind: str  # "gated" (act(gate)·up), "mlp" (act(fc1)), "moe" (routed gated experts)
    gate: Proj | None
    up: Proj
    down: str
    act: str
    router: str | None = None
    experts: int | None = None
    shared: "FFN | None" = None  # a shared expert next to the routed ones (Qwen2-MoE, DeepSeek)
    shared_gate: str | None = None  # the linear whose sigmoid scales the shared expert per token


@dataclass(frozen=True)
class Block:
    """One decoder layer. ``attention``/``ffn`` are None where the matcher could not prove their structure
    (the reason is in ``unmatched``); their norms, writers and residual adds are always known.

    A parallel block (Phi-2, Falcon, GPT-NeoX, Cohere) has one residual add for both branches
    (``attn_add == ffn_add``); its two norms may be one. ``post_norms`` are norms on a branch's output
    before the residual add (Gemma-2/3, OLMo-2), each with the writers it normalizes.
    """

    index: int
    attn_norm: Norm
    attention: Attention | None
    attn_add: str
    ffn_norm: Norm
    ffn: FFN | None
    ffn_add: str
    writers: tuple[str, ...] = ()
    parallel: bool = False
    post_norms: tuple[tuple[Norm, tuple[str, ...]], ...] = ()
    unmatched: tuple[tuple[str, str], ...] = ()  # (site, reason)

    @property
    def downs(self) -> tuple[str, ...]:
        """The FFN's down projections (routed experts' and a shared expert's)."""
        if self.ffn is None:
            return ()
        return (self.ffn.down,) + ((self.ffn.shared.down,) if self.ffn.shared else ())


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
    final_norm: Norm | None
    lm_head: str | None
    tied: bool
    linears: dict = field(default_factory=dict)  # node -> Linear
    invariances: tuple[Invariance, ...] = ()
    unmatched: tuple[tuple[str, str], ...] = ()  # (site, reason): the residual stream itself was not proved

    @property
    def stream_matched(self) -> bool:
        """Whether every reader and writer of the residual stream is known (what R1 and fold need)."""
        return not self.unmatched and self.final_norm is not None

    @property
    def complete(self) -> bool:
        """Whether every block is a sequential pre-norm block with attention and FFN matched (no parallel
        branches, post-norms, shared experts or bare stream readers): the layout every pass supports."""
        return self.stream_matched and all(
            b.attention is not None and b.ffn is not None and not b.parallel and not b.post_norms
            and not b.unmatched and b.ffn.shared is None and b.attn_norm.kind != "none" and b.ffn_norm.kind != "none"
            for b in self.blocks)

    def gaps(self) -> list[tuple[str, str]]:
        """Every (site, reason) the matcher could not prove, model-level first."""
        return list(self.unmatched) + [u for b in self.blocks for u in b.unmatched]

    @property
    def norms(self) -> tuple[Norm, ...]:
        """The stream's norms (each once; a parallel block's shared norm is one), the final norm last."""
        out: dict[str, Norm] = {}
        for b in self.blocks:
            out.setdefault(b.attn_norm.node, b.attn_norm)
            out.setdefault(b.ffn_norm.node, b.ffn_norm)
        if self.final_norm is not None:
            out.setdefault(self.final_norm.node, self.final_norm)
        return tuple(out.values())

    @property
    def writers(self) -> tuple[str, ...]:
        """Linear nodes whose outputs are added into the residual stream."""
        return tuple(w for b in self.blocks for w in (b.writers or (b.attention.o, b.ffn.down)))

    @property
    def readers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for n in self.norms for r in n.readers))

    def holds(self, name: str) -> Invariance | None:
        return next((i for i in self.invariances if i.name == name), None)

    def summary(self) -> dict:
        """Roles, counts and head geometry: what must agree between the fx and ONNX captures."""
        if not self.blocks or self.blocks[0].attention is None or self.blocks[0].ffn is None:
            return {"hidden": self.hidden, "layers": len(self.blocks), "linears": len(self.linears),
                    "lm_head": self.lm_head, "unmatched": len(self.gaps()), "tied": self.tied}
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
            "parallel": self.blocks[0].parallel,
            "post_norms": sum(len(b.post_norms) for b in self.blocks),
            "shared_expert": f.shared is not None,
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
