"""rotate: R1 on the residual stream and R2 per head between v and o, fused into the weights.

With norms folded (every norm is x/rms(x), which commutes with an orthogonal Q since ‖xQ‖ = ‖x‖),
rotating the stream x ↦ x·Q is exact when
    embeddings (token, positional)   E ← E·Q
    readers (q/k/v, gate/up, router, lm_head)   W ← W·Q          ((xQ)(WQ)ᵀ = xWᵀ)
    writers (o, down, experts' down)  W ← Qᵀ·W,  b ← b·Q          (y ↦ y·Q)
R2 rotates each v head's output by a head_dim × head_dim Q₂ and o's matching input columns by Q₂:
attention mixes tokens, not features, so softmax(·)·(V·Q₂) = (softmax(·)·V)·Q₂ per head; with GQA the
one Q₂ serves every query head that shares a kv head (the same Q₂ is used for all heads).

Post-norms (Gemma-2/3, OLMo-2: y = n(z)·γ added to the stream) do not commute with R1, but a Hadamard R1 =
diag(d)·H does pass them exactly: y·R1 = (n(z)·(γ∘d))·H, so the norm's γ takes the signs d and an online
``hadamard`` after it applies H; the writers under a post-norm are then left unrotated (n(z) is unchanged).
R2 is per block: a block whose attention or v→o path was not proved is skipped with the reason.

Which orthogonal matrix is used per size is decided by ``choose_rotation`` and shown by the plan. The weight
updates for given matrices are one pure function, ``rotated_weights`` (float64, differentiable in the
matrices; ``rotation_ops`` says which maps each weight gets), which ``fuse_rotations`` writes one weight at a
time (on ``weights.computed_on``'s device when set: the Program may stay on the host) and ``spinquant``
differentiates through to learn R1/R2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.errors import RecipeError, UnsafeRewriteError
from qcompile.graph.edit import Hadamard
from qcompile.passes import weights
from qcompile.passes.fold_norms import check_stream, untie_embeddings
from qcompile.passes.options import ROTATION_KINDS, RotateOptions, check_can_run, history
from qcompile.program import PassReport, Program
from qcompile.quant import hadamard as had


@dataclass(frozen=True)
class RotationChoice:
    """The orthogonal matrix used for one size: what it is and why."""

    size: int
    kind: str  # "hadamard", "block-hadamard" or "orthogonal"
    block: int | None
    why: str

    def matrix(self, seed: int) -> torch.Tensor:
        """The matrix, float64, seeded (random signs for Hadamards, Haar-random for orthogonal)."""
        if self.kind == "orthogonal":
            return had.random_orthogonal_matrix(self.size, seed)
        return had.random_hadamard_matrix(self.size, seed, self.block)

    def describe(self) -> str:
        if self.kind == "hadamard":
            m, p = had.hadamard_factors(self.size)
            return f"Hadamard {self.size} = {m}·{p}"
        if self.kind == "block-hadamard":
            return f"block-diagonal Hadamard, {self.size // self.block} blocks of {self.block} ({self.why})"
        return f"random orthogonal {self.size}×{self.size} ({self.why})"


def choose_rotation(n: int, requested: str = "hadamard", min_block: int = 64) -> RotationChoice:
    """A Hadamard of size n where one is constructible, else a block-diagonal one, else random orthogonal."""
    if requested not in ROTATION_KINDS:
        raise RecipeError(f"rotation kind {requested!r} is not one of {ROTATION_KINDS}")
    if requested == "orthogonal":
        return RotationChoice(n, "orthogonal", None, "requested")
    if had.has_hadamard(n):
        return RotationChoice(n, "hadamard", None, "")
    block = had.largest_hadamard_block(n, min_block)
    if block:
        return RotationChoice(n, "block-hadamard", block, f"no Hadamard of order {n}")
    return RotationChoice(n, "orthogonal", None, f"no Hadamard of order {n} nor a block ≥ {min_block}")


def rotate(program: Program, options: RotateOptions | None = None, **overrides) -> Program:
    """R1/R2 as ``RotateOptions`` (or its fields as keywords) say, fused into the weights."""
    opts = RotateOptions.of(options, overrides)
    check_can_run(history(program), opts)
    kind, seed, r1, r2 = opts.kind, opts.seed, opts.r1, opts.r2
    p = program.clone()
    report = PassReport("rotate")
    q1, q2 = prepare_rotations(p, kind, seed, r1, r2, report, per_site=True)
    fuse_rotations(p, q1, q2, report)
    if q1 is not None and post_normed(p.model_map):
        _through_post_norms(p, choose_rotation(p.model_map.hidden, kind), q1, report)
    return p.done(report)


def post_normed(mm) -> set[str]:
    """Writers whose output reaches the stream through a post-norm."""
    return {w for b in mm.blocks for _, ws in b.post_norms for w in ws}


def _check_post_norms(mm, choice: "RotationChoice") -> None:
    for b in mm.blocks:
        for norm, _ in b.post_norms:
            if choice.kind not in ("hadamard", "block-hadamard"):
                raise UnsafeRewriteError(f"post-norm {norm.node}: R1 passes a post-norm only as diag(±1)·Hadamard "
                                         f"(signs into γ, H online); {choice.describe()} cannot")
            if norm.kind != "rms" or norm.bias or norm.weight is None:
                raise UnsafeRewriteError(f"post-norm {norm.node} is not an RMSNorm with γ: R1 cannot pass it")


def _through_post_norms(p: Program, choice: "RotationChoice", q1: torch.Tensor, report: PassReport) -> None:
    """γ ← (γ + offset)∘d − offset and an online H after each post-norm, where R1 = diag(d)·H."""
    h = torch.block_diag(*[had.hadamard_matrix(choice.block or choice.size)] * (choice.size // (choice.block or
                                                                                                   choice.size)))
    d = (q1 @ h.T).diagonal()  # R1·Hᵀ = diag(d)
    mm = p.model_map
    for b in mm.blocks:
        for norm, _ in b.post_norms:
            gamma = weights.read(p, norm.weight) + norm.offset
            p.set_weight(norm.weight, gamma * d.to(gamma.device) - norm.offset)
            p.graph.insert_after(norm.node, Hadamard(choice.block or 0))
            report.count("R1 post-norm (signs into γ, online H)", norm.node)
    p.rematch()


def prepare_rotations(p: Program, kind: str, seed: int, r1: bool, r2: bool, report: PassReport, per_site: bool = False
                      ) -> tuple[torch.Tensor | None, list[torch.Tensor | None] | None]:
    """Check that R1/R2 are exact on ``p`` (untying the embeddings for R1) and return the seeded matrices:
    R1 (hidden × hidden, seed) and one R2 per block (head_dim × head_dim, seed + 1 + block index), float64.
    With ``per_site`` a block where R2 is not proved gets None and a skip in the report; else it is refused."""
    mm = p.model_map
    q1 = q2 = None
    if r1:
        check_stream(mm, "R1")
        untie_embeddings(p, report)  # the lm_head reads the stream, the embedding writes it: one Q each side
        mm = p.model_map
        check_plain_norms(p, "R1")
        choice = choose_rotation(mm.hidden, kind)
        _check_post_norms(mm, choice)
        q1 = choice.matrix(seed)
        report.notes["R1"] = choice.describe() + (", random signs" if choice.kind != "orthogonal" else "")
    if r2:
        if not per_site:
            check_v_to_o(mm)
        q2 = []
        for block in mm.blocks:
            why = r2_refusal(mm, block)
            if why:
                report.skip(f"R2 block {block.index}", why)
                q2.append(None)
                continue
            choice = choose_rotation(block.attention.head_dim, kind, min_block=1)
            q2.append(choice.matrix(seed + 1 + block.index))
            report.notes["R2"] = choice.describe() + (", random signs per layer" if choice.kind != "orthogonal" else "")
    return q1, q2


def r2_refusal(mm, block) -> str | None:
    """Why R2 cannot be fused in ``block`` (None when it can)."""
    a = block.attention
    if a is None:
        return next((r for _, r in block.unmatched if "attention" in r), "attention not matched")
    proof = mm.holds(f"v_to_o:{a.node}")
    if proof is None or not proof.holds:
        return f"R2 at attention {a.node}: {proof.reason if proof else 'not proved'}"
    return None


def check_plain_norms(p: Program, what: str) -> None:
    for norm in p.model_map.norms:
        if norm.kind == "none":
            continue
        if norm.kind != "rms" or norm.bias or (norm.weight and not _is_identity(p, norm)):
            raise UnsafeRewriteError(f"norm {norm.node} is not a plain RMSNorm after folding; "
                                     f"{what} would not be exact")


def check_v_to_o(mm) -> None:
    """Refuse R2 unless it is proved in every block (for passes that fuse R2 everywhere or nowhere)."""
    for block in mm.blocks:
        why = r2_refusal(mm, block)
        if why:
            raise UnsafeRewriteError(why if why.startswith("R2") else f"R2 in block {block.index}: {why}")


def rotation_ops(mm, q1: torch.Tensor | None, q2: list[torch.Tensor | None] | None
                 ) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    """What R1 = ``q1`` and R2 = ``q2[block]`` do to each weight (and bias) they change, by source name: the
    float64 maps to apply in order (R1 first, then R2, for v and o), each a pure function of the tensor,
    differentiable in q1/q2 (given on the device the weights are computed on). R2's block-diagonal matrices
    are built when applied, so a caller that applies the maps of a few weights builds only theirs."""
    ops: dict[str, list[Callable]] = {}

    def add(name, op):
        ops.setdefault(name, []).append(op)

    def outputs(lin, m, start=0, stop=None):  # m: a matrix, or a function making one
        mat = m if callable(m) else (lambda: m)
        add(lin.weight, lambda w: weights.outputs_transformed(w, None, lin, mat(), start, stop)[0])
        if lin.bias:
            add(lin.bias, lambda b: weights.bias_outputs_transformed(b, lin, mat(), start, stop))

    if q1 is not None:
        for emb in filter(None, (mm.embedding, mm.positional)):
            add(emb.weight, lambda e: e @ q1)
        for r in mm.readers:
            lin = mm.linears[r]
            add(lin.weight, lambda w, lin=lin: weights.inputs_transformed(w, lin, q1))
        skip = post_normed(mm)
        for w in mm.writers:
            if w not in skip:
                outputs(mm.linears[w], q1)
    if q2 is not None:
        for block, q in zip(mm.blocks, q2, strict=True):
            if q is None:
                continue
            a = block.attention
            outputs(mm.linears[a.v.linear], lambda q=q, n=a.n_kv_heads: torch.block_diag(*[q] * n), a.v.start,
                    a.v.start + a.n_kv_heads * a.head_dim)
            o = mm.linears[a.o]
            add(o.weight, lambda w, o=o, q=q, n=a.n_heads: weights.inputs_transformed(w, o, torch.block_diag(*[q] * n)))
    return ops


def _on(device, q1, q2):
    q1 = q1.to(device) if q1 is not None else None
    q2 = [q.to(device) if q is not None else None for q in q2] if q2 is not None else None
    return q1, q2


def _apply(ops, x: torch.Tensor) -> torch.Tensor:
    for op in ops:
        x = op(x)
    return x


def rotated_weights(p: Program, q1: torch.Tensor | None, q2: list[torch.Tensor] | None,
                    names=None) -> dict[str, torch.Tensor]:
    """Every weight (and bias) that R1 = ``q1`` and R2 = ``q2[block]`` change (only those in ``names`` when
    given), by source name: float64 tensors on the compute device (``weights.read``) computed from ``p``'s
    current weights, differentiable in q1/q2 (SpinQuant learns through this function; ``fuse_rotations``
    writes the same maps one weight at a time). Weights touched by both (v, o) get both, R1 first."""
    q1, q2 = _on(weights.compute_device(p, p.model_map.linears[next(iter(p.model_map.linears))].weight), q1, q2)
    return {name: _apply(ops, weights.read(p, name)) for name, ops in rotation_ops(p.model_map, q1, q2).items()
            if names is None or name in names}


def fuse_rotations(p: Program, q1: torch.Tensor | None, q2: list[torch.Tensor] | None, report: PassReport) -> None:
    """Write R1/R2 into ``p``'s weights (``prepare_rotations`` has untied and checked) and count the sites."""
    mm = p.model_map
    q1_, q2_ = _on(weights.compute_device(p, mm.linears[next(iter(mm.linears))].weight), q1, q2)
    with torch.no_grad():  # one weight at a time: read to the compute device, rotated, written back
        for name, ops in rotation_ops(mm, q1_, q2_).items():
            p.set_weight(name, _apply(ops, weights.read(p, name)))
    if q1 is not None:
        for emb in filter(None, (mm.embedding, mm.positional)):
            report.count("R1 embedding", emb.weight)
        for r in mm.readers:
            report.count("R1 reader", r)
        skip = post_normed(mm)
        for w in mm.writers:
            if w not in skip:
                report.count("R1 writer", w)
    if q2 is not None:
        for block, q in zip(mm.blocks, q2, strict=True):
            if q is None:
                continue
            a = block.attention
            report.count("R2 head pair", f"{a.v.linear}→{a.o} ({a.n_kv_heads} kv heads, {a.n_heads} heads)")


def _is_identity(p: Program, norm) -> bool:
    return bool(torch.all(p.weight(norm.weight) + norm.offset == 1))


def plan(mm, options: RotateOptions | None = None) -> list[str]:
    opts = options or RotateOptions()
    kind, seed, r1, r2 = opts.kind, opts.seed, opts.r1, opts.r2
    lines = []
    if r1:
        check_stream(mm, "R1")
        c = choose_rotation(mm.hidden, kind)
        _check_post_norms(mm, c)
        n_emb = 1 + (mm.positional is not None)
        post = sum(len(b.post_norms) for b in mm.blocks)
        lines.append(f"R1 {c.describe()} (seed {seed}): {n_emb} embedding(s), {len(mm.readers)} readers, "
                     f"{len(mm.writers) - len(post_normed(mm))} writers fused"
                     + (f", {post} post-norms passed (signs into γ, online H)" if post else ""))
    if r2:
        done = [b for b in mm.blocks if not r2_refusal(mm, b)]
        if done:
            a = done[0].attention
            c = choose_rotation(a.head_dim, kind, min_block=1)
            lines.append(f"R2 {c.describe()} per layer: {len(done)} v→o pairs fused "
                         f"({a.n_kv_heads} kv heads shared by {a.n_heads} heads)")
        lines += [f"R2 refused in block {b.index}: {r2_refusal(mm, b)}" for b in mm.blocks if r2_refusal(mm, b)]
    return lines
