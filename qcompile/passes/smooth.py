"""smooth: SmoothQuant's per-channel migration of activation outliers into the weights.

For a site (a producer of X and the linears reading X, see ``migrate``) and each input channel j:
    s_j = max_t|X_tj|^α / max_i|W_ij|^(1−α)          (maxima over calibration tokens, and over every reader)
    X ← X/s (folded into the producer),   W ← W·diag(s)
so X·Wᵀ is unchanged while X's per-channel range is flattened (by α) at the cost of W's. Both maxima are
clamped at 1e-5 and s at 1e-5, as the official code does. Sites:
- ``norms``: attn_norm → q/k/v and ffn_norm → gate/up(/router), through the norm's γ (the official
  SmoothQuant's only sites for LLaMA/OPT);
- ``v_o``: v's rows per kv head → o_proj's columns of every query head sharing it (GQA: s reduced over
  the group's query heads, so one s serves all of them);
- ``up_down``: up's rows → down_proj's columns (gated FFN; ReLU MLP through fc1).
α = 0.5 by default (DuQuant runs 0.6). Runs after ``fold_norms`` (the effective γ is then 1/s, which
folding again would undo: see ``migrate``). Exact in float: only the floating-point rounding changes.
"""

from __future__ import annotations

import torch

from qcompile.passes import migrate
from qcompile.passes.options import SmoothOptions, check_can_run, history
from qcompile.passes.calibrate import collect
from qcompile.program import PassReport, Program


def _kinds(norms: bool, v_o: bool, up_down: bool) -> tuple[str, ...]:
    return tuple(k for k, on in (("norm", norms), ("v_o", v_o), ("up_down", up_down)) if on)


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1−α), as the official ``smooth_ln_fcs`` computes it (float64)."""
    a = act_absmax.double().clamp(min=1e-5)
    w = w_absmax.double().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def smooth(program: Program, options: SmoothOptions | None = None, *, calibration: torch.Tensor,
           **overrides) -> Program:
    """SmoothQuant on every site enabled (``SmoothOptions``, or its fields as keywords); ``calibration`` is
    token windows [n, seq]."""
    opts = SmoothOptions.of(options, overrides)
    check_can_run(history(program), opts)
    alpha = opts.alpha
    p = program.clone()
    report = PassReport("smooth")
    site_list = migrate.sites(p.model_map, _kinds(opts.norms, opts.v_o, opts.up_down), report, p.graph.opgraph())
    stats = collect(p, calibration, migrate.watch_map(site_list), batch=opts.batch, progress=False)
    for site in site_list:
        act = migrate.reduce_heads(site, migrate.merged(stats, site, "absmax"))
        s = smoothing_scales(act, migrate.weight_absmax(p, site), alpha)
        migrate.migrate(p, site, s, None, report)
    report.notes["alpha"] = alpha
    report.notes["calibration"] = f"{calibration.shape[0]} windows × {calibration.shape[1]} tokens"
    p.rematch()
    return p.done(report)


def plan(mm, options: SmoothOptions | None = None) -> list[str]:
    opts = options or SmoothOptions()
    alpha = opts.alpha
    report = PassReport("smooth")
    site_list = migrate.sites(mm, _kinds(opts.norms, opts.v_o, opts.up_down), report)
    counts = {}
    for s in site_list:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    lines = [f"α = {alpha}: " + ", ".join(f"{n} {k} sites" for k, n in counts.items())
             + " migrated from calibration maxima"]
    lines += [f"skip {s}: {r}" for s, r in report.skipped]
    return lines
