"""migrate: per-channel scales and shifts moved from a linear's input into its producer (SmoothQuant, OS+).

A *site* is a producer P of a value X and the linears R that read X. For per-input-channel s > 0 and z,
    X' = (X − z)/s,   W_r ← W_r·diag(s),   b_r ← b_r + W_r·z     (every reader r, W_r before scaling)
keeps every reader's output: (X − z)/s·(W·s)ᵀ + b + W·z = X·Wᵀ + b. Where X' comes from:

- ``norm`` site (a norm and its readers q/k/v, gate/up/router): the norm's effective scale and shift,
  γ_eff ← γ_eff/s, β ← (β − z)/s. An RMSNorm has no β; a shift creates one as ``add(norm, β)`` right after
  the norm (the matcher reads that add as the norm's bias). Gemma's γ + 1 is handled through ``offset``.
- ``v_o`` site (v rows → o_proj columns): X is o's input, per head; v's output rows (and bias) of each kv
  head are divided by s, and o's columns of every query head sharing that kv head (GQA) multiplied by it:
  softmax(·)·(V/s) = (softmax(·)·V)/s head by head. One s per kv channel, so scales are reduced over the
  query heads of a group. No shift (a shift in V would need an o bias — not a linear's input only).
- ``up_down`` site (up rows → down columns): act(gate)·(up/s) = (act(gate)·up)/s for any act (gated
  FFN); for a plain MLP only through a positively homogeneous act (ReLU: relu(x/s) = relu(x)/s, s > 0),
  dividing fc1's rows and bias. No shift (it does not pass through the product or the activation).

Statistics are per input channel of the readers, taken from the calibration run of the Program as it is
(``calibrate.collect``); for a site with several readers the readers' inputs are the same value, so their
channel statistics are merged (max of maxima) — expert readers of an MoE see a token subset of it.
Order with ``fold_norms``: the migration writes into the norm's γ/β, so it must run *after* folding
(folding afterwards would move γ/s back into the readers, undoing it); ``fold_norms`` refuses a Program
that has been migrated. Before ``rotate``: a norm with γ ≠ 1 or a β does not commute with R1, which then
refuses (the composition smooth→rotate is not exact; rotate first, then smooth, is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.analysis.modelmap import ModelMap, Norm
from qcompile.graph.opgraph import OpGraph
from qcompile.errors import UnsafeRewriteError
from qcompile.passes import weights
from qcompile.program import PassReport, Program

POSITIVELY_HOMOGENEOUS = ("relu",)


@dataclass(frozen=True)
class Site:
    kind: str  # "norm", "v_o", "up_down"
    block: int
    name: str  # for reports: "block 3 attn_norm", ...
    readers: tuple[str, ...]  # linear nodes whose inputs are migrated
    norm: Norm | None = None
    producer: str | None = None  # the linear node whose rows produce X (v, up)
    rows: tuple[int, int] | None = None  # the producer's rows [start, stop)
    group: int = 1  # query heads per kv head (v_o)
    head_dim: int = 0

    @property
    def watch(self) -> str:
        """The linear whose operand 0 carries X for statistics (a non-expert reader if there is one)."""
        return self.readers[0]


def sites(mm: ModelMap, kinds: tuple[str, ...], report: PassReport | None = None,
          graph: OpGraph | None = None) -> list[Site]:
    """The migration sites of the map, in block order; a site that cannot be migrated is skipped with its
    reason in ``report``. ``graph`` (the Program's OpGraph, fx or ONNX) lets up_down refuse a down input
    behind an online op."""
    out = []
    for b in mm.blocks:
        a, f = b.attention, b.ffn
        if "norm" in kinds:
            for norm, where in ((b.attn_norm, "attn_norm"), (b.ffn_norm, "ffn_norm")):
                readers = sorted(norm.readers, key=lambda r: bool(mm.linears[r].experts))
                out.append(Site("norm", b.index, f"block {b.index} {where}", tuple(readers), norm=norm))
        if "v_o" in kinds:
            proof = mm.holds(f"v_to_o:{a.node}")
            if proof is None or not proof.holds:
                _skip(report, f"block {b.index} v→o", proof.reason if proof else "v→o not proved")
            else:
                out.append(Site("v_o", b.index, f"block {b.index} v→o", (a.o,), producer=a.v.linear,
                                rows=(a.v.start, a.v.stop), group=a.n_heads // a.n_kv_heads, head_dim=a.head_dim))
        if "up_down" in kinds:
            why = None
            if f.kind == "moe":
                why = "MoE experts each read their own down input; per-expert migration is not implemented"
            elif f.kind == "mlp" and f.act not in POSITIVELY_HOMOGENEOUS:
                why = f"{f.act} is not positively homogeneous: act(x/s) ≠ act(x)/s"
            elif graph is not None and _behind_online_op(graph, f.down):
                why = "down's input is behind an online transform (R4/DuQuant); migrate before it"
            if why:
                _skip(report, f"block {b.index} up→down", why)
            else:
                out.append(Site("up_down", b.index, f"block {b.index} up→down", (f.down,), producer=f.up.linear,
                                rows=(f.up.start, f.up.stop)))
    return out


def _skip(report, site, why):
    if report is not None:
        report.skip(site, why)


def _behind_online_op(graph: OpGraph, node: str) -> bool:
    """Whether ``node``'s input is (a view of) an online Hadamard or DuQuant transform's output."""
    x = graph.operand(node, 0)
    while x is not None and graph.kind(x) == "view":
        x = graph.operand(x, 0)
    return x is not None and graph.kind(x) in ("hadamard", "transform")


def watch_map(site_list: list[Site]) -> dict[str, int]:
    return {r: 0 for s in site_list for r in s.readers}


# --- statistics in the site's channel space ------------------------------------------------------------
def merged(stats: dict, site: Site, what: str) -> torch.Tensor:
    """Per-channel statistic ``what`` (absmax, max or min) of X over the site's readers, float64."""
    vals = [getattr(stats[r], what).double() for r in site.readers if r in stats]
    if not vals:
        raise UnsafeRewriteError(f"{site.name}: no calibration statistics for its readers {site.readers}")
    out = vals[0]
    for v in vals[1:]:
        out = torch.minimum(out, v) if what == "min" else torch.maximum(out, v)
    return out


def reduce_heads(site: Site, x: torch.Tensor, how: str = "max") -> torch.Tensor:
    """o-input channels [n_heads·hd] → kv channels [n_kv·hd] (max over the query heads of each group)."""
    if site.kind != "v_o" or site.group == 1:
        return x
    v = x.reshape(-1, site.group, site.head_dim)
    return v.amax(1).reshape(-1) if how == "max" else v.amin(1).reshape(-1)


def expand_heads(site: Site, s: torch.Tensor) -> torch.Tensor:
    """kv channels → o-input channels (each query head takes its kv head's scales)."""
    if site.kind != "v_o" or site.group == 1:
        return s
    return s.reshape(-1, 1, site.head_dim).expand(-1, site.group, site.head_dim).reshape(-1)


def weight_absmax(p: Program, site: Site) -> torch.Tensor:
    """max_i |W_ij| over every reader (and expert) of the site, per input channel j, float64, on the Program's
    device (where its statistics are; computed on the weights' compute device)."""
    out = None
    for r in site.readers:
        lin = p.model_map.linears[r]
        w = weights.canonical(p, lin).abs().reshape(-1, lin.in_features).amax(0)
        out = w if out is None else torch.maximum(out, w)
    return reduce_heads(site, out).to(p.device)


# --- edits ---------------------------------------------------------------------------------------------
def migrate(p: Program, site: Site, s: torch.Tensor | None, z: torch.Tensor | None, report: PassReport) -> None:
    """X ← (X − z)/s at the site (s, z in the site's channel space: kv channels for v_o), exactly."""
    if z is not None and site.kind != "norm":
        raise UnsafeRewriteError(f"{site.name}: a shift can only be migrated into a norm, not a {site.kind} site")
    mm = p.model_map
    if site.kind == "norm":
        norm = _norm_now(p, site.norm)
        if s is not None or z is not None:
            norm = _ensure_norm_weight(p, norm)
        if z is not None:
            norm = _ensure_norm_bias(p, norm)
        _rescale_norm(p, norm, s, z)
        readers = norm.readers
    else:
        lin = mm.linears[site.producer]
        weights.transform_outputs(p, lin, torch.diag(1.0 / s.double()), *site.rows)
        readers = site.readers
    for r in readers:
        lin = p.model_map.linears[r]
        if z is not None:
            if lin.experts:
                raise UnsafeRewriteError(f"{site.name}: cannot shift into the stacked expert weight {lin.weight}")
            w = weights.canonical(p, lin)
            lin = weights.add_to_bias(p, lin, w @ z.to(w.device, torch.float64))
        if s is not None:
            weights.scale_inputs(p, lin, expand_heads(site, s.double()))
    if s is not None:
        report.count(f"scaled {site.kind}", site.name)
    if z is not None:
        report.count(f"shifted {site.kind}", site.name)


def _norm_now(p: Program, norm: Norm) -> Norm:
    """The map's current record of a norm (biases created by earlier edits included)."""
    return next(n for n in p.model_map.norms if n.input == norm.input)


def _ensure_norm_weight(p: Program, norm: Norm) -> Norm:
    """Give a norm without γ (LayerNorm → rms_norm after folding drops it) a γ = 1 to divide by s."""
    if norm.weight:
        return norm
    if norm.bias:
        raise UnsafeRewriteError(f"norm {norm.node} has a bias but no scale parameter to divide by s; not supported")
    p.graph.give_norm_weight(norm.node, f"qcompile_norms.{norm.node}.weight")
    p.rematch()
    return _norm_now(p, norm)


def _ensure_norm_bias(p: Program, norm: Norm) -> Norm:
    """Give a bias-less norm a β = 0 as ``add(norm, β)``, with every reader moved behind the add."""
    if norm.bias:
        return norm
    if not norm.weight:
        raise UnsafeRewriteError(f"norm {norm.node} has no scale parameter to name a shift after; not supported")
    base = norm.weight[: -len(".weight")] if norm.weight.endswith(".weight") else norm.weight
    name = base + ".bias"
    if p.graph.has_weight(name):
        name = base + ".shift"
    ref = p.weight(norm.weight)
    p.graph.add_after(norm.node, name, torch.zeros(ref.shape[-1], dtype=ref.dtype))
    p.rematch()
    return _norm_now(p, norm)


def _rescale_norm(p: Program, norm: Norm, s: torch.Tensor | None, z: torch.Tensor | None) -> None:
    if s is not None:
        if not norm.weight:
            raise UnsafeRewriteError(f"norm {norm.node} has no scale parameter to divide by s; not supported")
        gamma = p.weight(norm.weight).detach().double() + norm.offset
        p.set_weight(norm.weight, gamma / s.double() - norm.offset)
    if norm.bias:
        beta = p.weight(norm.bias).detach().double()
        if z is not None:
            beta = beta - z.double()
        if s is not None:
            beta = beta / s.double()
        p.set_weight(norm.bias, beta)

