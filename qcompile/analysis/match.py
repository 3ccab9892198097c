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

import dataclasses

import networkx as nx

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
        self.invariances: list[Invariance] = []
        self.linears = {}
        for n in og.nodes_of("linear"):  # a product with a computed weight is no linear of the model
            if og.attr(n, "weight") is not None:
                self.linears[n] = self._linear(n)

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
    def _core(self, m: str) -> tuple[str, float, tuple[str, ...]] | None:
        """If m = c·rsqrt(mean(c²) + ε) with c = z (RMS) or c = z − mean(z) (LayerNorm written out, each
        ``c`` its own node or shared), return (z, ε, the centring nodes)."""
        g = self.g
        if not self._is(m, "mul"):
            return None
        ops = [g.skip_views_back(o) for o in g.operands(m)]
        if len(ops) != 2:
            return None
        for i in (0, 1):
            r, c = ops[i], ops[1 - i]
            if not self._is(r, "rsqrt"):
                continue
            a = g.skip_views_back(g.operand(r, 0))
            if not self._is(a, "add"):
                continue
            mean = g.skip_views_back(g.operand(a, 0))
            if not self._is(mean, "mean"):
                continue
            p = g.skip_views_back(g.operand(mean, 0))
            if not (self._is(p, "pow") and g.attr(p, "scalar") == 2):
                continue
            c2 = g.skip_views_back(g.operand(p, 0))
            z1, centre1 = self._uncentred(c)
            z2, centre2 = self._uncentred(c2)
            if z1 == z2 and bool(centre1) == bool(centre2):
                return z1, g.attr(a, "scalar"), tuple(dict.fromkeys(centre1 + centre2))
        return None

    def _uncentred(self, c: str) -> tuple[str, tuple[str, ...]]:
        """(z, (c,)) when c = z − mean(z) over the last axis, else (c, ())."""
        g = self.g
        if self._is(c, "sub"):
            z, mean = (g.skip_views_back(o) for o in g.operands(c))
            if self._is(mean, "mean") and g.skip_views_back(g.operand(mean, 0)) == z:
                return z, (c,)
        return c, ()

    def _norm_at(self, out: str) -> tuple[Norm, str] | None:
        """(the norm whose output is ``out``, its input) — a fused norm op or RMS/LayerNorm written out,
        with γ (or γ + offset, Gemma) and an optional β; None when ``out`` is no norm's output."""
        g = self.g
        if self._is(out, "layernorm") or self._is(out, "rmsnorm"):
            kind = "layer" if g.kind(out) == "layernorm" else "rms"
            w, b = g.operand(out, 2), g.operand(out, 3)  # (x, normalized_shape, weight[, bias], eps)
            z = g.skip_views_back(g.operand(out, 0))
            return Norm(kind, out, z, g.param_of(w) if w else None, g.param_of(b) if b and kind == "layer" else None,
                        0.0, g.attr(out, "eps"), ()), z
        core = self._core(out)
        if core:
            z, eps, centre = core
            return Norm("layer" if centre else "rms", out, z, None, None, 0.0, eps, (), centre), z
        if not self._is(out, "mul"):
            return None
        ops = [g.skip_views_back(o) for o in g.operands(out)]
        for i in range(len(ops)):
            core = self._core(ops[i])
            if not core or len(ops) != 2:
                continue
            z, eps, centre = core
            scale = ops[1 - i]
            kind = "layer" if centre else "rms"
            if g.param_of(scale) and g.shape(scale) and len(g.shape(scale)) == 1:
                return Norm(kind, out, z, g.param_of(scale), None, 0.0, eps, (), centre), z
            if self._is(scale, "add") and g.param_of(g.operand(scale, 0)) and g.attr(scale, "scalar"):
                return Norm(kind, out, z, g.param_of(g.operand(scale, 0)), None, float(g.attr(scale, "scalar")), eps,
                            (), centre), z
        return None

    def _with_shift(self, norm: Norm) -> Norm:
        """A shift after the norm (OS+ on an RMSNorm model, or a LayerNorm's β written out) is its bias."""
        if norm.bias is not None:
            return norm
        users = self.g.users_through_views(norm.node)
        if len(users) == 1 and self._is(users[0][0], "add"):
            add = users[0][0]
            other = [o for o in self.g.operands(add) if self.g.skip_views_back(o) != norm.node]
            shape = self.g.shape(other[0]) if len(other) == 1 else None
            if len(other) == 1 and self.g.param_of(other[0]) and shape and len(shape) == 1:
                return dataclasses.replace(norm, node=add, bias=self.g.param_of(other[0]))
        return norm

    def _outermost(self, norm: Norm) -> Norm:
        """The norm with its γ: a bare core whose only user multiplies it by γ is that product's norm."""
        users = self.g.users_through_views(norm.node)
        if norm.weight is None and len(users) == 1:
            outer = self._norm_at(users[0][0])
            if outer and outer[1] == norm.input:
                return outer[0]
        return norm

    def _stream_readers(self, s: str, parts: list[tuple[str, str]]) -> list[Norm]:
        """The norms reading stream value s (several in GPT-NeoX's parallel block; a "none" norm for linears
        reading s directly, OLMo-2), each with its reader linears; every consumer of s must be explained."""
        g = self.g
        norms: list[Norm] = []
        explained: set[str] = set()
        direct = [u for u, src in parts if self._is(u, "linear") and g.position(u, src) == 0]
        parts = [u for u, _ in parts]
        candidates = list(dict.fromkeys(parts + [w for u in parts for w, _ in g.users_through_views(u)]))
        candidates += [w for u in candidates for w, _ in g.users_through_views(u) if w not in candidates]
        for u in candidates:
            if u in direct:
                continue
            found = self._norm_at(u)
            if not found or found[1] != s or any(n.node == u for n in norms):
                continue
            norm = self._with_shift(self._outermost(found[0]))
            if any(n.node == norm.node for n in norms):
                continue
            norms.append(dataclasses.replace(norm, readers=tuple(self._readers(norm.node))))
            explained |= ({u} | nx.ancestors(g.graph, u)) & set(parts)
        if direct:
            norms.append(Norm("none", s, s, None, None, 0.0, None, tuple(direct)))
            explained |= set(direct)
        rest = [u for u in parts if u not in explained]
        if rest or not norms:
            raise UnsafeRewriteError(
                f"the residual stream value {g.describe(s)} is read by {', '.join(g.describe(u) for u in rest or parts)}, "
                "which is not a recognized RMSNorm/LayerNorm nor a linear; rotations cannot be proved safe"
            )
        return norms

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
    def _writers(self, y: str, add: str, hidden: int, post: list | None = None) -> list[str]:
        """Linears whose outputs sum (with per-token coefficients) to y, the branch added at ``add``.

        A norm met on the way is a post-norm (Gemma-2/3, OLMo-2): it is appended to ``post`` with the writers
        it normalizes, and the walk goes on from its input."""
        g, out, stack, seen = self.g, [], [y], set()
        while stack:
            n = g.skip_views_back(stack.pop())
            if n in seen:
                continue
            seen.add(n)
            k = g.kind(n)
            if k == "linear":
                out.append(n)
            elif k == "hadamard":  # rotate's online Hadamard after a post-norm: linear in the branch
                stack.append(g.operand(n, 0))
            elif post is not None and (found := self._norm_at(n)) is not None and found[0].kind != "none":
                norm = self._outermost(found[0])
                post.append((norm, tuple(self._writers(found[1], add, hidden))))
                out.extend(post[-1][1])
            elif k in ("add", "sum") or (k == "index" and g.operand(n, 0)) or k == "slice":
                stack.extend([g.operand(n, 0)] if k in ("index", "sum", "slice") else g.operands(n))
            elif k == "mul":
                wide = [o for o in g.operands(n) if self._last_dim(o) == hidden]
                if len(wide) != 1:
                    raise self._between(n, add, "a product of two hidden-wide values")
                if any(g.param_of(o) for o in g.operands(n) if o not in wide):
                    raise self._between(n, add, "a per-channel scale")
                stack.append(wide[0])
            else:
                raise self._between(n, add, "not linear in the branch output")
        return out

    def _between(self, n: str, add: str, why: str) -> UnsafeRewriteError:
        return UnsafeRewriteError(
            f"{self.g.describe(n)} lies between a sublayer's output and the residual add {add} ({why}); "
            "a residual-stream rotation would not be exact"
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
        pure = {"view", "slice", "split"}  # a split's outputs are slices of its input
        width = v.stop - v.start  # v must be a contiguous row range of whole heads (not interleaved with q, k)
        rows = width % head_dim == 0 and width // head_dim <= n_heads and (v.linear, v.start) != (q.linear, q.start)
        self.invariances.append(
            Invariance(
                f"v_to_o:{t}",
                vk <= pure and rows,
                "only views and head expansion between v and o" if vk <= pure and rows
                else f"ops {sorted(vk - pure)} between v and o" if not vk <= pure
                else f"v is not a row range of whole heads of {v.linear} (rows {v.start}:{v.stop}: the slice that makes v is not traced to rows of it)",
            )
        )
        rope = "rope" in qk or ("cat" in qk and "neg" in qk)  # a fused rotary op, or rotate_half's cat(-x2, x1)
        return Attention(t, q, k, v, o, n_heads, n_kv, head_dim, rope=rope, qk_norm="rsqrt" in qk or "rmsnorm" in qk,
                         q_input=q_in, k_input=k_in, rope_inside=bool(g.attr(t, "rope_inside")))

    def _ffn_one(self, down: str) -> tuple[str, Proj | None, Proj, str]:
        """(kind, gate, up, act) of the FFN whose down projection is ``down``."""
        g = self.g
        x = g.skip_views_back(g.operand(down, 0))
        if self._is(x, "hadamard"):  # an online R4 already in place
            x = g.skip_views_back(g.operand(x, 0))
        ops = [g.skip_views_back(o) for o in g.operands(x)] if self._is(x, "mul") else []
        if len(ops) == 2 and any(self._is(o, "activation") for o in ops):
            a, b = ops
            act, other = (a, b) if self._is(a, "activation") else (b, a)
            gate, _ = self._proj(g.operand(act, 0), "gate", down)
            up, _ = self._proj(other, "up", down)
            return "gated", gate, up, g.attr(act, "fn")
        if self._is(x, "activation"):
            up, _ = self._proj(g.operand(x, 0), "fc1", down)
            return "mlp", None, up, g.attr(x, "fn")
        found, kinds = self._sources(x)  # an activation written out elementwise (GPT-2's and Phi-2's tanh-GELU)
        if len(found) == 1 and kinds <= {"mul", "add", "pow", "activation", "div", "sub", "neg", "view"}:
            lin, start, stop = found.pop()
            return "mlp", None, Proj(lin, start, stop), "elementwise(" + "/".join(sorted(kinds)) + ")"
        raise MatchError(f"the input of FFN down projection {g.describe(down)} is {g.describe(x)}: unknown FFN")

    def _ffn(self, writers: list[str], norm: Norm) -> FFN:
        """The FFN from its down projection(s): one (dense or routed experts), or routed experts plus one
        shared expert (the router reads the norm with E outputs, the shared expert's gate with 1)."""
        routed = [w for w in writers if self.linears[w].experts]
        dense = [w for w in writers if not self.linears[w].experts]
        if len(writers) == 1 or (len(routed) == 1 and len(dense) == 1):
            down = (routed or dense)[0]
        else:
            raise MatchError(f"an FFN with {len(writers)} down projections {writers} is not one FFN or experts plus a "
                             "shared expert")
        kind, gate, up, act = self._ffn_one(down)
        lin = self.linears[down]
        shared = None
        if len(writers) == 2:
            skind, sgate, sup, sact = self._ffn_one(dense[0])
            shared = FFN(skind, sgate, sup, dense[0], sact)
        own = {p.linear for f in filter(None, (FFN(kind, gate, up, down, act), shared)) for p in (f.gate, f.up) if p}
        rest = [r for r in norm.readers if r not in own]
        router = next((r for r in rest if lin.experts and self.linears[r].out_features == lin.experts), None)
        shared_gate = next((r for r in rest if r != router and self.linears[r].out_features == 1), None) if shared else None
        if lin.experts and router is None:
            raise MatchError(f"routed experts {lin.weight}: no router among the readers of norm {norm.node}")
        return FFN("moe" if lin.experts else kind, gate, up, down, act, router, lin.experts, shared, shared_gate)

    def _attention_kind(self, writer: str) -> str | None:
        """"sdpa" when the writer's input comes from an attention op, "eager" when from a matmul whose other
        side descends from a softmax (q·kᵀ → softmax → ·v written out), else None."""
        g = self.g
        x = g.skip_views_back(g.operand(writer, 0))
        while g.kind(x) in ("hadamard", "transform"):
            x = g.skip_views_back(g.operand(x, 0))
        if self._is(x, "attention"):
            return "sdpa"
        if self._is(x, "matmul"):
            stack, seen = [g.operand(x, 0)], set()
            while stack and len(seen) < 32:
                v = g.skip_views_back(stack.pop())
                if v in seen or self._is(v, "linear"):
                    continue
                seen.add(v)
                if self._is(v, "softmax"):
                    return "eager"
                stack.extend(g.operands(v))
        return None

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
        sublayers = []  # (norms, add, writers, post-norms)
        while True:
            users = g.users_through_views(s)
            adds = [u for u, _ in users if self._is(u, "add")]
            parts = [(u, src) for u, src in users if u not in adds]
            if len(adds) > 1:
                raise UnsafeRewriteError(f"residual stream value {g.describe(s)} feeds several adds {adds}")
            if not parts and adds and sublayers:  # s + a + b summed left to right (Cohere): one branch
                norms, _, writers, post = sublayers.pop()
            else:
                norms, writers, post = self._stream_readers(s, parts), [], ()
            if not adds:
                break
            add = adds[0]
            y = [o for o in g.operands(add) if g.skip_views_back(o) != s]
            if len(y) != 1:
                raise MatchError(f"residual add {g.describe(add)} does not add one branch to the stream")
            found: list = []
            sublayers.append((norms, add, writers + self._writers(y[0], add, hidden, found), post + tuple(found)))
            s = add
        if len(norms) != 1 or len(norms[0].readers) != 1 or norms[0].kind == "none":
            raise MatchError(f"the final stream value {s} is not read by one norm feeding one lm_head")
        norm = norms[0]
        self.invariances.append(Invariance("residual", True, "every stream reader is a norm or a residual add"))
        blocks = self._blocks(sublayers)
        kinds = {n.kind for n in [b.attn_norm for b in blocks] + [b.ffn_norm for b in blocks] + [norm]}
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

    def _blocks(self, sublayers) -> list[Block]:
        """Decoder layers from the stream's sublayers: a sublayer whose writers include both an attention
        output and FFN downs is a parallel block; otherwise an attention sublayer and the next (FFN) one."""
        blocks, i = [], 0
        while i < len(sublayers):
            norms, add, writers, post = sublayers[i]
            att = [w for w in writers if self._attention_kind(w)]
            rest = [w for w in writers if w not in att]
            if not att:
                raise MatchError(f"sublayer ending at {add} (writers {writers}) has no attention output before its FFN; "
                                 "unsupported block layout")
            if rest:  # parallel: x + attn(n₁(x)) + ffn(n₂(x)), n₁ and n₂ possibly one norm
                attn_norm = next((n for n in norms if set(n.readers) & self._attention_inputs(att[0])), norms[0])
                ffn_norm = next((n for n in norms if n is not attn_norm), attn_norm)
                blocks.append(self._block(len(blocks), attn_norm, att, add, ffn_norm, rest, add, writers, post, True))
                i += 1
                continue
            if i + 1 >= len(sublayers):
                raise MatchError(f"the residual stream ends after the attention sublayer at {add}; no FFN follows")
            norms2, add2, writers2, post2 = sublayers[i + 1]
            for ns, a in ((norms, add), (norms2, add2)):
                if len(ns) != 1:
                    raise MatchError(f"the stream value before {a} is read by {len(ns)} norms in a sequential block")
            blocks.append(self._block(len(blocks), norms[0], att, add, norms2[0], writers2, add2, writers + writers2,
                                      post + post2, False))
            i += 2
        return blocks

    def _attention_inputs(self, o: str) -> set[str]:
        """The linears upstream of attention output projection o (stopping at linears)."""
        found, _ = self._sources(self.g.operand(o, 0))
        return {f[0] for f in found} | {f[0] for v in found for f in self._sources(self.g.operand(v[0], 0))[0]}

    def _block(self, index, attn_norm, att, attn_add, ffn_norm, ffn_writers, ffn_add, writers, post, parallel) -> Block:
        """A Block; attention or FFN structure that cannot be proved is recorded in ``unmatched``."""
        unmatched, attention, ffn = [], None, None
        if len(att) != 1:
            unmatched.append((attn_add, f"{len(att)} attention output projections {att}"))
        elif self._attention_kind(att[0]) == "eager":
            unmatched.append((att[0], "eager attention (matmul, softmax, matmul; no SDPA op): q/k/v, the v→o path "
                                      "and the q/k operands are not proved (R2, R3, KV quantization need them)"))
        else:
            try:
                attention = self._attention(att[0])
            except (MatchError, UnsafeRewriteError) as e:
                unmatched.append((att[0], f"attention not matched: {e}"))
        try:
            ffn = self._ffn(ffn_writers, ffn_norm)
        except (MatchError, UnsafeRewriteError) as e:
            unmatched.append((ffn_add, f"FFN not matched: {e}"))
        return Block(index, attn_norm, attention, attn_add, ffn_norm, ffn, ffn_add, tuple(writers), parallel,
                     tuple(post), tuple(unmatched))

    def partial(self, error: Exception) -> ModelMap:
        """The map of a graph whose residual stream could not be proved: every linear, the embedding and the
        lm_head (the last linear as wide as the vocabulary), no blocks, and the reason."""
        emb, pos, scale, s = self._start()
        vocab = self.g.shape(self._param_node(emb.weight))[0]
        heads = [n for n, lin in self.linears.items() if lin.out_features == vocab and not lin.experts]
        lm_head = heads[-1] if heads else None
        self.invariances.append(Invariance("residual", False, str(error)))
        return ModelMap(
            hidden=self._last_dim(s), embedding=emb, positional=pos, embed_scale=scale, blocks=(), final_norm=None,
            lm_head=lm_head, tied=bool(lm_head) and self.linears[lm_head].weight == emb.weight, linears=self.linears,
            invariances=tuple(self.invariances), unmatched=(("residual stream", str(error)),),
        )


def match(og: OpGraph) -> ModelMap:
    """The ModelMap of a causal LM's OpGraph: what was proved, and (site, reason) for what was not.

    Only a graph without a token embedding read from the input ids is refused (MatchError); a residual
    stream that cannot be proved gives a map of the linears alone, its reason in ``unmatched``."""
    try:
        return _Matcher(og).run()
    except (MatchError, UnsafeRewriteError) as e:
        m = _Matcher(og)
        try:
            m._start()
        except MatchError:
            raise e from None
        return m.partial(e)
