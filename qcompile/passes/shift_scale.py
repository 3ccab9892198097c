"""shift_scale: Outlier Suppression+ (arXiv 2304.09145), channel-wise shifting and scaling.

At a site X → readers W (see ``migrate`` for the exact algebra):
    shift   z_j = (max_t X_tj + min_t X_tj)/2          X ← X − z,   b ← b + W·z   (bias created if absent)
    scale   s_j = max(1, max_j/t, −min_j/t)            X ← X/s,     W ← W·diag(s)   (on the shifted range)
The threshold t is searched on a 1-D grid from T_max = max_j max(|max_j|, |min_j|) down to ``floor``
(0.1 for RMSNorm models as the official LLaMA setting, 1.0 for LayerNorm/OPT), ``max(100, T_max/0.5)``
steps, minimizing the mean squared error of the output the quantized linears feed, computed with
per-token asymmetric activations (``a_bits``) and per-channel asymmetric weights (``w_bits``):
- attn_norm → q/k/v: the attention output softmax(QKᵀ/√d + mask)·V (after RoPE, QK-norm; as the graph has it);
- ffn_norm → gate/up: act(gate)·up (act(fc1) for a plain MLP);
- up → down (scale only; a shift cannot pass the product/activation): down's output.
o_proj's input is not migrated (as in the paper). t = T_max gives s = 1, so the search never does worse
than no scaling on its batch.

The search evaluates the *cone* of graph nodes between X and that output with the site's readers
replaced by their quantized, migrated versions; the cone's other inputs (RoPE tables, masks) are the
values recorded by one interpreter run over ``search_windows`` windows, which keeps at most one
layer's values alive. Departures from the official code, by design or simplification:
- ``shift`` is offered on RMSNorm models too (the official code shifts only OPT, whose LayerNorm has β):
  the norm gets a β as ``add(norm, β)`` and every reader a bias; exact. ``shift: false`` is the official
  LLaMA behaviour.
- Every layer's search sees the float model's inputs (the official code runs layer by layer with the
  earlier layers already quantized); min/max statistics come from all calibration windows, the search
  from the first ``search_windows``.
- MoE FFN norms are skipped (the routed cone is not evaluated), reported.
- ``coarse`` searches the official grid coarse-to-fine instead of point by point: T_max/0.5 thresholds
  are ~6000 cone evaluations at SmolLM2's massive down-projection inputs (|x| ≈ 3000).

On an ONNX Program the statistics come from onnxruntime (``calibrate.collect``) and each cone is an
onnxruntime session from X to the output (``graph.onnx_run.Cone``), fed the readers' candidate weights;
the search and the migration are the same code as on fx.
"""

from __future__ import annotations

import torch
from torch import fx
from tqdm import tqdm

from qcompile.errors import UnsafeRewriteError
from qcompile.graph.fx import _VIEWS
from qcompile.passes import migrate
from qcompile.passes.options import ShiftScaleOptions, check_can_run, history
from qcompile.passes.calibrate import collect
from qcompile.program import PassReport, Program
from qcompile.quant.formats import Granularity, QuantSpec, fake_quantize, fake_quantize_per_token

aten = torch.ops.aten


def threshold_grid(t_max: float, floor: float, max_steps: int = 0) -> torch.Tensor:
    """The official grid: ``max(100, T_max/0.5)`` thresholds from T_max down to ``floor`` (capped by max_steps)."""
    if t_max <= floor:
        return torch.tensor([t_max], dtype=torch.float64)
    steps = max(100, int(t_max / 0.5))
    if max_steps:
        steps = min(steps, max_steps)
    return torch.linspace(t_max, floor, steps, dtype=torch.float64)


def scales_for(lo: torch.Tensor, hi: torch.Tensor, t: float) -> torch.Tensor:
    """s_j = max(1, max_j/t, −min_j/t) on a (shifted) range."""
    return torch.maximum(torch.maximum(hi / t, -lo / t), torch.ones_like(hi))


def _chase_views(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


class _Cone:
    """The nodes strictly after ``start`` up to ``end`` and the outside values they read."""

    def __init__(self, gm: fx.GraphModule, start: fx.Node, end: fx.Node, readers: set[str]):
        below, stack = set(), [start]
        while stack:
            for u in stack.pop().users:
                if u not in below:
                    below.add(u)
                    stack.append(u)
        above, stack = {end}, [end]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in above:
                    above.add(a)
                    stack.append(a)
        self.start, self.end, self.gm = start, end, gm
        self.nodes = [n for n in gm.graph.nodes if n in below and n in above]
        inside = set(self.nodes) | {start}
        self.outside = {a for n in self.nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        self.readers = [n for n in self.nodes if n.name in readers]
        self.reader_names = [n.name for n in self.readers]
        if len(self.readers) != len(readers):
            raise UnsafeRewriteError(f"the search cone {start.name}→{end.name} misses readers "
                                     f"{sorted(readers - {n.name for n in self.readers})}")

    def run(self, x: torch.Tensor, values: dict, linears: dict | None = None, a_quant=None) -> torch.Tensor:
        """The end value with X = x; ``linears`` {node name: (W, b)} replace the readers' weights and
        ``a_quant`` fake-quantizes every reader's input."""
        env = {self.start: x}

        def load(a):
            if a in env:
                return env[a]
            if a.op == "get_attr":
                return migrate_attr(self.gm, a.target)
            return values[a]

        for n in self.nodes:
            args = fx.node.map_arg(n.args, load)
            kwargs = fx.node.map_arg(n.kwargs, load)
            if linears is not None and n.name in linears:
                w, b = linears[n.name]
                xin = a_quant(args[0]) if a_quant else args[0]
                env[n] = torch.nn.functional.linear(xin, w, b)
            else:
                env[n] = n.target(*args, **kwargs)
        return env[self.end]


def migrate_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Recorder(fx.Interpreter):
    """Keeps the values the cones need (and their outputs) while the graph runs, dropping nothing else early."""

    def __init__(self, gm, needed: set[fx.Node]):
        super().__init__(gm, garbage_collect_values=True)
        self.needed, self.values = needed, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.needed:
            self.values[n] = out
        return out


def _site_cone(p: Program, site: migrate.Site) -> _Cone:
    mm, gm = p.model_map, p.module
    if site.kind == "norm":
        start = p.node(migrate._norm_now(p, site.norm).node)
        b = mm.blocks[site.block]
        if site.norm.node == b.attn_norm.node:
            end = p.node(b.attention.node)
        else:
            end = _chase_views(p.node(b.ffn.down).args[0])
    else:  # up_down: X is down's input
        end = p.node(site.readers[0])
        start = end.args[0]
    return _Cone(gm, start, end, set(site.readers))


def _reader_weights(p: Program, cone, s, z, w_spec):
    """{reader: (W·diag(s) quantized, b + W·z)} in [out, in] layout, for the cone's run."""
    out = {}
    for name in cone.reader_names:
        lin = p.model_map.linears[name]
        if lin.experts:
            raise UnsafeRewriteError(f"expert reader {name} in an OS+ search")
        w = p.weight(lin.weight).detach().double().movedim((lin.out_axis, lin.in_axis), (-2, -1))
        b = p.weight(lin.bias).detach().double() if lin.bias else None
        if z is not None:
            b = (w @ z) if b is None else b + w @ z
        ws = w * s if s is not None else w
        wq = fake_quantize(ws.float(), w_spec) if w_spec else ws.float()
        out[name] = (wq, b.float() if b is not None else None)
    return out


def _onnx_cones(p: Program, plans: list, windows: torch.Tensor) -> tuple[dict, dict, Program]:
    """The search cones of an ONNX Program (``graph.onnx_run.Cone``) and their recorded start/end values.

    The cones run on a copy in which every bias-less reader of a shifted site has a zero bias (the
    ``add_bias`` edit), so the search can feed b = W·z as the fx cone computes it; the Program itself
    gets biases only where ``migrate`` puts them."""
    from qcompile.graph.onnx_run import Cone, collect_values
    from qcompile.passes import weights

    q = p.clone()
    for site, _, _, z in plans:
        for r in site.readers if z is not None else ():
            lin = q.model_map.linears[r]
            if lin.bias is None:
                weights.add_to_bias(q, lin, torch.zeros(lin.out_features, dtype=torch.float64))
    q.rematch()
    og = q.graph.opgraph()
    cones = {}
    for site, *_ in plans:
        b = q.model_map.blocks[site.block]
        if site.kind == "norm":
            start = migrate._norm_now(q, site.norm).node
            attn = site.norm.node == b.attn_norm.node
            end = b.attention.node if attn else og.skip_views_back(og.operand(b.ffn.down, 0))
        else:
            start, end = og.operand(site.readers[0], 0), site.readers[0]
        cones[site.name] = Cone(q, start, end, site.readers, windows)
    values: dict[str, list] = {}
    watch = {v: v for c in cones.values() for v in (c.start, c.end)}  # one cone's end may be the next one's start
    collect_values(q, windows, watch, lambda name, x: values.setdefault(name, []).append(x))
    return cones, {k: torch.cat(v) for k, v in values.items()}, q


def search_order(n: int, coarse: int, best_of) -> list[int]:
    """The grid indices to evaluate: all n (``coarse`` 0), or every ⌈n/coarse⌉-th one and then the
    neighbours within that stride of the best of those (``best_of(indices)`` → index). The second pass
    finds the exhaustive optimum unless the error has a valley narrower than the stride elsewhere."""
    stride = max(1, -(-n // coarse)) if coarse else 1
    first = list(range(0, n, stride))
    if stride == 1:
        return first
    b = best_of(first)
    return [i for i in range(max(0, b - stride + 1), min(n, b + stride)) if i not in first]


def _search(p, cone, values, lo, hi, z, grid, w_spec, a_bits, coarse):
    x = values[cone.start].float()
    ref = values[cone.end].float()
    xs = x - z.float() if z is not None else x
    aq = (lambda v: fake_quantize_per_token(v, a_bits, False)) if a_bits < 16 else None
    thresholds, errors = grid.tolist(), {}

    def evaluate(indices):  # → the best index so far (the first of equal errors: larger t, fewer scaled)
        for i in indices:
            s = scales_for(lo, hi, thresholds[i])
            out = cone.run(xs / s.float(), values, _reader_weights(p, cone, s, z, w_spec), aq)
            errors[i] = (out.float() - ref).square().mean().item()
        return min(sorted(errors), key=errors.get)

    i = evaluate(search_order(len(thresholds), coarse, evaluate))  # the best of every threshold tried
    return errors[i], thresholds[i], scales_for(lo, hi, thresholds[i]), len(errors)


@torch.no_grad()
def shift_scale(program: Program, options: ShiftScaleOptions | None = None, *, calibration: torch.Tensor,
                progress: bool = True, **overrides) -> Program:
    """OS+ on the norm sites (shift and/or scale) and up→down (scale), as ``ShiftScaleOptions`` (or its
    fields as keywords) say; ``floor`` 0 picks the official one for the model (1.0 with LayerNorm, else
    0.1); ``coarse`` > 0 searches the grid coarse-to-fine (``search_order``), 0 evaluates every threshold
    as the official code does."""
    opts = ShiftScaleOptions.of(options, overrides)
    check_can_run(history(program), opts)
    shift, scale, w_bits, a_bits, floor = opts.shift, opts.scale, opts.w_bits, opts.a_bits, opts.floor
    max_steps, coarse, search_windows, up_down, batch = (opts.max_steps, opts.coarse, opts.search_windows,
                                                         opts.up_down, opts.batch)
    p = program.clone()
    report = PassReport("shift_scale")
    mm = p.model_map
    floor = floor or _official_floor(program)
    kinds = ("norm",) + (("up_down",) if up_down and scale else ())
    site_list = []
    for site in migrate.sites(mm, kinds, report, p.graph.opgraph()):
        if site.kind == "norm" and any(mm.linears[r].experts for r in site.readers):
            report.skip(site.name, "MoE FFN norm: the routed experts' cone is not searched")
        else:
            site_list.append(site)
    stats = collect(p, calibration, migrate.watch_map(site_list), batch=batch, progress=False)
    w_spec = QuantSpec(w_bits, False, Granularity.CHANNEL) if w_bits < 16 else None
    plans = []
    for site in site_list:
        lo, hi = migrate.merged(stats, site, "min"), migrate.merged(stats, site, "max")
        z = (hi + lo) / 2 if shift and site.kind == "norm" else None
        if z is not None:
            lo, hi = lo - z, hi - z
        plans.append((site, lo, hi, z))
    found = {}
    if scale and plans:
        if p.ir == "onnx":
            cones, values, searched = _onnx_cones(p, plans, calibration[:search_windows])
        else:
            cones = {site.name: _site_cone(p, site) for site, *_ in plans}
            needed = {n for c in cones.values() for n in (c.outside | {c.start, c.end})}
            rec = _Recorder(p.module, needed)
            rec.run(calibration[:search_windows].to(p.device))
            values, searched = rec.values, p
        for site, lo, hi, z in tqdm(plans, desc="shift_scale search", unit="site", disable=not progress):
            cone = cones[site.name]
            t_max = float(torch.maximum(hi.abs(), lo.abs()).max())
            grid = threshold_grid(t_max, floor, max_steps)
            err, t, s, tried = _search(searched, cone, values, lo, hi, z, grid, w_spec, a_bits, coarse)
            found[site.name] = s
            report.sites.append(f"{site.name}: t = {t:.4g} of T_max {t_max:.4g}, {int((s > 1).sum())} channels "
                                f"scaled, search MSE {err:.4g} ({tried} of {len(grid)} thresholds tried)")
        del values, cones
    for site, lo, hi, z in plans:
        s = found.get(site.name)
        if s is not None and bool((s == 1).all()):
            s = None
        if s is None and z is None:
            report.count(f"unchanged {site.kind}")
            continue
        migrate.migrate(p, site, s, z, report)
    report.notes["search"] = (f"W{w_bits} per-channel asym, A{a_bits} per-token asym, floor {floor}, "
                              f"{search_windows} window(s)" if scale else "off")
    p.rematch()
    return p.done(report)


def _official_floor(program: Program) -> float:
    return 1.0 if program.model_map.final_norm.kind == "layer" or program.has_run("fold_norms") and any(
        "centred" in k for r in program.reports for k in r.counts) else 0.1


def plan(mm, options: ShiftScaleOptions | None = None) -> list[str]:
    opts = options or ShiftScaleOptions()
    shift, scale, w_bits, a_bits = opts.shift, opts.scale, opts.w_bits, opts.a_bits
    max_steps, coarse, search_windows, up_down = opts.max_steps, opts.coarse, opts.search_windows, opts.up_down
    report = PassReport("shift_scale")
    kinds = ("norm",) + (("up_down",) if up_down and scale else ())
    site_list = migrate.sites(mm, kinds, report)
    norms = [s for s in site_list if s.kind == "norm" and not any(mm.linears[r].experts for r in s.readers)]
    moe = [s for s in site_list if s.kind == "norm" and s not in norms]
    ud = [s for s in site_list if s.kind == "up_down"]
    what = " and ".join(w for w, on in (("shift", shift), ("scale", scale)) if on) or "nothing"
    lines = [f"{what} at {len(norms)} norm sites (bias created in readers that have none)"
             + (f"; scale at {len(ud)} up→down sites" if ud else "")]
    if scale:
        lines.append(f"threshold search: W{w_bits}/A{a_bits} asym, grid max(100, T_max/0.5) steps"
                     + (f" capped at {max_steps}" if max_steps else "")
                     + (f", coarse-to-fine from {coarse} points" if coarse else ", every threshold tried")
                     + f", {search_windows} window(s)")
    lines += [f"skip {s.name}: MoE FFN norm, routed cone not searched" for s in moe]
    lines += [f"skip {s}: {r}" for s, r in report.skipped]
    return lines
