"""fold_norms: move every norm's scale (and shift) into the linears that read it.

For a norm n(x)·γ + β read by y = (n(x)·γ + β)·Wᵀ + b:
    y = n(x)·(W·diag(γ))ᵀ + (W·β + b)
so W ← W·diag(γ), b ← b + W·β (the bias is created where the reader has none) and the norm keeps
only n(x) (γ ← 1 − offset, where the model computes γ + offset as Gemma does with 1 + γ).

LayerNorm models are first brought to RMS form: when every writer of the residual stream produces
mean-free rows (W ← W − mean_out(W), b ← b − mean(b)) and the embeddings are centred, the stream x has
mean 0 across features, so LayerNorm(x) = x / sqrt(mean(x²) + ε) is an RMSNorm, and the graph's
layer_norm is replaced by rms_norm (a LayerNorm written out loses its x − mean(x) nodes). Tied embeddings are untied first when the lm_head is a reader
(folding the final norm into it must not touch the embedding table).

Post-norms (a norm on a branch's output before the residual add: Gemma-2/3, OLMo-2) have no reader to fold
into and are left as they are; a stream read by linears directly (a "none" norm) has nothing to fold.
"""

from __future__ import annotations

import torch

from qcompile.errors import UnsafeRewriteError
from qcompile.passes import weights
from qcompile.passes.options import FoldNormsOptions, check_can_run, history
from qcompile.program import PassReport, Program


def untie_embeddings(p: Program, report: PassReport) -> None:
    """Give the token embedding its own copy of a table it shares with the lm_head."""
    mm = p.model_map
    if not mm.tied:
        return
    shared = mm.embedding.weight
    names = [a for a in p.aliases.get(shared, []) if a != shared]
    new_name = names[0] if names else shared + ".untied"
    p.add_weight(new_name, p.weight(shared).detach(), replace=True)
    p.graph.use_weight(mm.embedding.node, 0, new_name)
    report.count("untied embedding", f"{new_name} (was shared with {shared})")
    p.rematch()


def _centre_stream(p: Program, report: PassReport) -> None:
    mm = p.model_map
    for emb in filter(None, (mm.embedding, mm.positional)):
        e = weights.read(p, emb.weight)
        p.set_weight(emb.weight, e - e.mean(dim=-1, keepdim=True))
        report.count("centred embedding", emb.weight)
    for w in mm.writers:
        weights.centre_outputs(p, mm.linears[w])
        report.count("centred writer", w)


def check_stream(mm, what: str) -> None:
    """Refuse ``what`` on a map whose residual stream was not proved, with the matcher's reason."""
    if not mm.stream_matched:
        site, reason = mm.unmatched[0] if mm.unmatched else ("final norm", "not found")
        raise UnsafeRewriteError(f"{what} needs every reader and writer of the residual stream; {site}: {reason}")


def _check_centring(mm) -> set:
    kinds = {n.kind for n in mm.norms} - {"none"}
    if kinds == {"rms", "layer"}:
        node = next(n.node for n in mm.norms if n.kind == "layer")
        raise UnsafeRewriteError(f"norm {node}: a model mixing LayerNorm and RMSNorm cannot be centred exactly")
    if "layer" in kinds and any(b.post_norms for b in mm.blocks):
        raise UnsafeRewriteError("a LayerNorm model with post-norms: its writers do not write the stream directly, "
                                 "so it cannot be centred")
    return kinds


def fold_norms(program: Program, options: FoldNormsOptions | None = None) -> Program:
    check_can_run(history(program), FoldNormsOptions.of(options, {}))
    check_stream(program.model_map, "fold_norms")
    p = program.clone()
    report = PassReport("fold_norms")
    kinds = _check_centring(p.model_map)
    untie_embeddings(p, report)
    mm = p.model_map
    if "layer" in kinds:
        _centre_stream(p, report)
    for norm in mm.norms:
        if norm.kind == "none":
            continue
        gamma = weights.read(p, norm.weight) + norm.offset if norm.weight else None
        beta = weights.read(p, norm.bias) if norm.bias else None
        for r in norm.readers:
            lin = p.model_map.linears[r]
            if beta is not None and bool(beta.any()):
                if lin.experts:
                    raise UnsafeRewriteError(f"norm {norm.node} has a bias and its reader {r} is a stacked expert weight")
                w = weights.read(p, lin.weight).movedim((lin.out_axis, lin.in_axis), (-2, -1))
                weights.add_to_bias(p, lin, w @ beta.to(w.device))
                lin = p.model_map.linears[r]
            if gamma is not None:
                weights.scale_inputs(p, lin, gamma)
        if gamma is not None:
            p.set_weight(norm.weight, torch.full_like(gamma, 1.0 - norm.offset))
        if beta is not None:
            p.set_weight(norm.bias, torch.zeros_like(beta))
        for c in norm.centre:  # x − mean(x) = x on a mean-free stream
            p.graph.bypass(c)
        if norm.kind == "layer" and not norm.centre:
            p.graph.to_rms(norm.node)
        report.count("folded norm", f"{norm.node} into {len(norm.readers)} readers")
    kept = sum(len(b.post_norms) for b in mm.blocks)
    if kept:
        report.notes["post-norms"] = f"{kept} kept as they are (no reader to fold into)"
    p.graph.eliminate_dead_code()
    p.rematch()
    return p.done(report)


def plan(mm, options: FoldNormsOptions | None = None) -> list[str]:
    """What fold_norms will do to this map (refusing now what it would refuse later)."""
    check_stream(mm, "fold_norms")
    kinds = _check_centring(mm)
    lines = [f"fold {sum(n.kind != 'none' for n in mm.norms)} norms into {len(mm.readers)} readers"
             + (f" (offset γ+{mm.final_norm.offset:g})" if mm.final_norm.offset else "")]
    if mm.tied:
        lines.append(f"untie the embedding from the lm_head ({mm.embedding.weight})")
    if "layer" in kinds:
        lines.append(f"centre {len(mm.writers)} writers and the embeddings; LayerNorm → RMSNorm")
    kept = sum(len(b.post_norms) for b in mm.blocks)
    if kept:
        lines.append(f"keep {kept} post-norms (no reader to fold into)")
    return lines
