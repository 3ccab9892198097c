"""Match a causal LM's structure on an OpGraph, from the graph alone (never from names).

The walk follows the residual stream: it starts at the token embedding (plus a positional embedding
or a scalar scale), and at each stream value s expects exactly two kinds of reader: a norm (whose
outputs must feed only linears: the *readers*) and one residual ``add(s, y)``, where y must be a sum
of linear outputs (the *writers*) scaled at most by per-token coefficients (MoE routing weights).
A stream value read only by a norm is the final one, and that norm's single reader is the lm_head.

Each sublayer is then classified from its writers: an attention output projection (its input comes
from a scaled-dot-product attention) or an FFN down projection. Attention q/k/v are traced back from
the attention op's operands to linears (through views, GQA expansion, RoPE, QK-norm and slices of a
fused qkv), FFN gate/up from the down projection's input.

Invariances that rewrites rely on are proved here and recorded on the map:
- ``residual``: every stream reader is a norm or a residual add, every writer a linear (R1, fold);
- ``rms``: every norm is RMS-type, or LayerNorm that ``fold_norms`` can centre;
- ``v_to_o`` per block: only views, head expansion and attention lie between v and o (R2);
- ``head_dim_rotatable``: q and k enter attention after RoPE with head_dim as the last axis (R3).
A structure that does not fit raises ``MatchError``/``UnsafeRewriteError`` naming the node.
"""

from __future__ import annotations

from qcompile.analysis.modelmap import (
    FFN,
    Attention,
    Block,
    Embedding,
    Invariance,
    Linear,
    ModelMap,
    Norm,
    Proj,
)
from qcompile.errors import MatchError, UnsafeRewriteError
from qcompile.graph.opgraph import OpGraph


class _Matcher:
    def __init__(self, og: OpGraph):
        self.g = og
        self.linears = {n: self._linear(n) for n in og.nodes_of("linear")}
        self.invariances: list[Invariance] = []

    # --- leaves --------------------------------------------------------------------------------------------
    def _linear(self, n: str) -> Linear:
        g = self.g
        w = g.attr(n, "weight")
        if w is None:
            raise MatchError(f"linear {g.describe(n)} has a weight that is not a parameter; cannot rewrite it")
        wshape = g.shape(self._param_node(w))
        return Linear(
            node=n,
            weight=w,
            bias=g.attr(n, "bias"),
            in_features=wshape[g.attr(n, "in_axis")],
            out_features=wshape[g.attr(n, "out_axis")],
            in_axis=g.attr(n, "in_axis"),
            out_axis=g.attr(n, "out_axis"),
            experts=g.attr(n, "experts"),
        )

    def _param_node(self, name: str) -> str:
        for n in self.g.nodes_of("param"):
            if self.g.attr(n, "param") == name:
                return n
        raise MatchError(f"no parameter node for {name}")

    def _is(self, n: str | None, kind: str) -> bool:
        return n is not None and self.g.kind(n) == kind

    def _last_dim(self, n: str):
        s = self.g.shape(n)
        return s[-1] if s else None

    # --- norms ---------------------------------------------------------------------------------------------
    def _rms_core(self, s: str, m: str) -> tuple[str, float] | None:
        """If m = mul(s, rsqrt(add(mean(pow(s, 2)), eps))) return (m, eps)."""
        g = self.g
        if not self._is(m, "mul"):
            return None
        ops = [g.skip_views_back(o) for o in g.operands(m)]
        if len(ops) != 2 or s not in ops:
            return None
        r = ops[1 - ops.index(s)]
        if not self._is(r, "rsqrt"):
            return None
        a = g.skip_views_back(g.operand(r, 0))
        if not self._is(a, "add"):
            return None
        mean = g.skip_views_back(g.operand(a, 0))
        if not self._is(mean, "mean"):
            return None
        p = g.skip_views_back(g.operand(mean, 0))
        if not (self._is(p, "pow") and g.attr(p, "scalar") == 2 and g.skip_views_back(g.operand(p, 0)) == s):
            return None
        return m, g.attr(a, "scalar")

    def _norm(self, s: str, parts: list[str]) -> Norm:
        """The norm that reads stream value s, given the consumers of s that belong to it."""
        g = self.g
        for u in parts:
            if self._is(u, "layernorm") or self._is(u, "rmsnorm"):
                kind = "layer" if g.kind(u) == "layernorm" else "rms"
                w, b = g.operand(u, 2), g.operand(u, 3)  # (x, normalized_shape, weight[, bias], eps)
                weight = g.param_of(w) if w else None
                bias = g.param_of(b) if b and kind == "layer" else None
                return self._finish_norm(kind, u, s, weight, bias, 0.0, g.attr(u, "eps"))
        for u in parts:
            core = self._rms_core(s, u)
            if core:
                m, eps = core
                users = g.users_through_views(m)
                if len(users) == 1 and self._is(users[0][0], "mul"):
                    gm = users[0][0]
                    other = [o for o in g.operands(gm) if g.skip_views_back(o) != m]
                    if len(other) == 1:
                        scale = g.skip_views_back(other[0])
                        if g.param_of(scale) and g.shape(scale) and len(g.shape(scale)) == 1:
                            return self._finish_norm("rms", gm, s, g.param_of(scale), None, 0.0, eps)
                        if self._is(scale, "add") and g.param_of(g.operand(scale, 0)) and g.attr(scale, "scalar"):
                            offset = float(g.attr(scale, "scalar"))
                            return self._finish_norm("rms", gm, s, g.param_of(g.operand(scale, 0)), None, offset, eps)
                return self._finish_norm("rms", m, s, None, None, 0.0, eps)
        raise UnsafeRewriteError(
            f"the residual stream value {g.describe(s)} is read by {', '.join(g.describe(u) for u in parts)}, "
            "which is not a recognized RMSNorm/LayerNorm; rotations cannot be proved safe"
        )

    def _finish_norm(self, kind, node, s, weight, bias, offset, eps) -> Norm:
        if bias is None:  # a shift after the norm (OS+ on an RMSNorm model): add(norm, β[hidden]) is its bias
            users = self.g.users_through_views(node)
            if len(users) == 1 and self._is(users[0][0], "add"):
                add = users[0][0]
                other = [o for o in self.g.operands(add) if self.g.skip_views_back(o) != node]
                shape = self.g.shape(other[0]) if len(other) == 1 else None
                if len(other) == 1 and self.g.param_of(other[0]) and shape and len(shape) == 1:
                    node, bias = add, self.g.param_of(other[0])
        return Norm(kind, node, s, weight, bias, offset, eps, tuple(self._readers(node)))

    def _readers(self, norm_out: str) -> list[str]:
        """Linears fed by a norm's output, through views and token gathers (MoE dispatch)."""
        g, out, stack = self.g, [], [norm_out]
        while stack:
            v = stack.pop()
            for u, src in g.users_through_views(v):
                if self._is(u, "linear") and g.position(u, src) == 0:
                    out.append(u)
                elif self._is(u, "index") and g.position(u, src) == 0:
                    stack.append(u)
                else:
                    raise UnsafeRewriteError(
                        f"{g.describe(u)} reads the output of norm {norm_out} and is not a linear; "
                        "the norm cannot be folded into its readers"
                    )
        return sorted(set(out), key=list(g.graph.nodes).index)

    # --- branches ------------------------------------------------------------------------------------------
    def _writers(self, y: str, add: str, hidden: int) -> list[str]:
        """Linears whose outputs sum (with per-token coefficients) to y, the branch added at ``add``."""
        g, out, stack, seen = self.g, [], [y], set()
        while stack:
            n = g.skip_views_back(stack.pop())
            if n in seen:
                continue
            seen.add(n)
            k = g.kind(n)
            if k == "linear":
                out.append(n)
            elif k in ("add", "sum") or (k == "index" and g.operand(n, 0)) or k == "slice":
                stack.extend([g.operand(n, 0)] if k in ("index", "sum", "slice") else g.operands(n))
            elif k == "mul":
                wide = [o for o in g.operands(n) if self._last_dim(o) == hidden]
                if len(wide) != 1:
                    raise self._between(n, add, "a product of two hidden-wide values")
                if any(g.param_of(o) for o in g.operands(n) if o not in wide):
                    raise self._between(n, add, "a per-channel scale (a post-norm?)")
                stack.append(wide[0])
            else:
                raise self._between(n, add, "not linear in the branch output")
        return out

    def _between(self, n: str, add: str, why: str) -> UnsafeRewriteError:
        return UnsafeRewriteError(
            f"{self.g.describe(n)} lies between a sublayer's output and the residual add {add} ({why}); "
            "a residual-stream rotation would not be exact (e.g. a post-norm as in Gemma-2/3)"
        )

    def _sources(self, n: str) -> tuple[set[tuple[str, int, int]], set[str]]:
        """Linear sources (linear, rows) of value n and the kinds of ops passed on the way."""
        g, found, kinds, stack, seen = self.g, set(), set(), [(n, None)], set()
        while stack:
            v, rows = stack.pop()
            if (v, rows) in seen:
                continue
            seen.add((v, rows))
            k = g.kind(v)
            if k == "linear":
                lin = self.linears[v]
                found.add((v,) + (rows or (0, lin.out_features)))
                continue
            if k in ("param", "input", "attention", "other"):
                continue
            kinds.add(k)
            if k == "slice" and g.attr(v, "dim") == -1:
                src = g.operand(v, 0)
                if self._is(src, "split"):  # a chunk's output: a slice of the split's input
                    src = g.operand(src, 0)
                if self._is(src, "linear") and g.shape(src)[-1] == self.linears[src].out_features:
                    stop = g.attr(v, "stop")
                    out = self.linears[src].out_features
                    stack.append((src, (g.attr(v, "start"), out if stop is None else min(stop, out))))
                    continue
            stack.extend((o, rows) for o in g.operands(v))
        return found, kinds

    def _proj(self, n: str, role: str, at: str) -> tuple[Proj, set[str]]:
        found, kinds = self._sources(n)
        if len(found) != 1:
            raise MatchError(f"{role} of {self.g.describe(at)} does not come from exactly one linear: {sorted(found)}")
        lin, start, stop = found.pop()
        return Proj(lin, start, stop), kinds

    def _attention(self, o: str) -> Attention:
        g = self.g
        t = g.skip_views_back(g.operand(o, 0))
        q_in, k_in, v_in = (g.operand(t, i) for i in range(3))
        q, qk = self._proj(q_in, "q", t)
        k, kk = self._proj(k_in, "k", t)
        v, vk = self._proj(v_in, "v", t)
        qs = g.shape(q_in)
        n_heads, head_dim = qs[1], qs[-1]
        n_kv = (v.stop - v.start) // head_dim
        pure = {"view", "slice"}
        self.invariances.append(
            Invariance(
                f"v_to_o:{t}",
                vk <= pure,
                "only views and head expansion between v and o" if vk <= pure
                else f"ops {sorted(vk - pure)} between v and o",
            )
        )
        rope = "rope" in qk or ("cat" in qk and "neg" in qk)  # a fused rotary op, or rotate_half's cat(-x2, x1)
        return Attention(t, q, k, v, o, n_heads, n_kv, head_dim, rope=rope, qk_norm="rsqrt" in qk or "rmsnorm" in qk,
                         q_input=q_in, k_input=k_in)

    def _ffn(self, writers: list[str], norm: Norm) -> FFN:
        g = self.g
        if len(writers) != 1:
            raise MatchError(f"an FFN with {len(writers)} down projections {writers} is not supported")
        down = writers[0]
        x = g.skip_views_back(g.operand(down, 0))
        if self._is(x, "hadamard"):  # an online R4 already in place
            x = g.skip_views_back(g.operand(x, 0))
        lin = self.linears[down]
        if self._is(x, "mul"):
            a, b = (g.skip_views_back(o) for o in g.operands(x))
            act, other = (a, b) if self._is(a, "activation") else (b, a)
            if not self._is(act, "activation"):
                raise MatchError(f"FFN input {g.describe(x)} is a product without an activation")
            gate, _ = self._proj(g.operand(act, 0), "gate", down)
            up, _ = self._proj(other, "up", down)
            router = [r for r in norm.readers if r not in (gate.linear, up.linear)]
            kind = "moe" if lin.experts else "gated"
            return FFN(kind, gate, up, down, g.attr(act, "fn"), router[0] if router else None, lin.experts)
        if self._is(x, "activation"):
            up, _ = self._proj(g.operand(x, 0), "fc1", down)
            return FFN("mlp", None, up, down, g.attr(x, "fn"))
        raise MatchError(f"the input of FFN down projection {g.describe(down)} is {g.describe(x)}: unknown FFN")

    # --- the walk ------------------------------------------------------------------------------------------
    def _start(self) -> tuple[Embedding, Embedding | None, str | None, str]:
        g = self.g
        embs = [e for e in g.nodes_of("embedding") if self._is(g.skip_views_back(g.operand(e, 1)), "input")]
        if len(embs) != 1:
            raise MatchError(f"expected one token embedding read from the input ids, found {embs}")
        e = embs[0]
        emb = Embedding(e, g.param_of(g.operand(e, 0)))
        pos, scale, s = None, None, e
        while True:
            users = g.users_through_views(s)
            if len(users) != 1:
                return emb, pos, scale, s
            u = users[0][0]
            others = [g.skip_views_back(o) for o in g.operands(u) if g.skip_views_back(o) != s]
            if self._is(u, "mul") and (not others or (g.shape(others[0]) in ((), (1,)))):
                scale, s = u, u
            elif self._is(u, "add") and len(others) == 1 and self._is(others[0], "embedding"):
                p = others[0]
                pos, s = Embedding(p, g.param_of(g.operand(p, 0))), u
            else:
                return emb, pos, scale, s

    def run(self) -> ModelMap:
        g = self.g
        emb, pos, scale, s = self._start()
        hidden = self._last_dim(s)
        sublayers = []  # (norm, add, writers)
        while True:
            users = g.users_through_views(s)
            adds = [u for u, _ in users if self._is(u, "add")]
            parts = [u for u, _ in users if u not in adds]
            if len(adds) > 1:
                raise UnsafeRewriteError(f"residual stream value {g.describe(s)} feeds several adds {adds}")
            norm = self._norm(s, parts)
            if not adds:
                break
            add = adds[0]
            y = [o for o in g.operands(add) if g.skip_views_back(o) != s]
            if len(y) != 1:
                raise MatchError(f"residual add {g.describe(add)} does not add one branch to the stream")
            sublayers.append((norm, add, self._writers(y[0], add, hidden)))
            s = add
        if len(norm.readers) != 1:
            raise MatchError(f"the final norm {norm.node} feeds {len(norm.readers)} linears, expected one lm_head")
        self.invariances.append(Invariance("residual", True, "every stream reader is a norm or a residual add"))
        blocks = []
        for i in range(0, len(sublayers) - 1, 2):
            (n1, a1, w1), (n2, a2, w2) = sublayers[i], sublayers[i + 1]
            if len(w1) != 1 or not self._is(g.skip_views_back(g.operand(w1[0], 0)), "attention"):
                raise MatchError(f"sublayer ending at {a1} is not attention (writers {w1}); unsupported block layout")
            blocks.append(Block(len(blocks), n1, self._attention(w1[0]), a1, n2, self._ffn(w2, n2), a2))
        if len(sublayers) % 2:
            raise MatchError("the residual stream has an odd number of sublayers; unsupported block layout")
        norms = [b.attn_norm for b in blocks] + [b.ffn_norm for b in blocks] + [norm]
        kinds = {n.kind for n in norms}
        self.invariances.append(Invariance("rms", True, f"norm kinds {sorted(kinds)}; LayerNorm is centred by fold_norms"))
        lm_head = norm.readers[0]
        return ModelMap(
            hidden=hidden,
            embedding=emb,
            positional=pos,
            embed_scale=scale,
            blocks=tuple(blocks),
            final_norm=norm,
            lm_head=lm_head,
            tied=self.linears[lm_head].weight == emb.weight,
            linears=self.linears,
            invariances=tuple(self.invariances),
        )


def match(og: OpGraph) -> ModelMap:
    """The ModelMap of a causal LM's OpGraph, or a MatchError/UnsafeRewriteError naming the node."""
    return _Matcher(og).run()
