"""Activation max |x| and kurtosis at every quantized linear's input, before and after a recipe's transforms.

Rotations and smoothing exist to make the tensors that a per-token quantizer rounds easy to round: no
channel far above the others (max |x|) and light tails (kurtosis). This module measures both where it
matters: on the tensor that actually reaches each linear, i.e. *after* any online op a pass inserted
(R3/R4 Hadamards, DuQuant's online transforms), because that is what the activation quantizer sees.

One input per kind of site and layer: ``qkv`` (q/k/v read one norm output), ``o``, ``up`` (gate/up read
one norm output), ``down``. "After" runs the recipe with quantization off (``Recipe.without_quantization``).

Kurtosis is Pearson's, κ = E[(x − μ)⁴] / σ⁴ over *all values* of the tensor (every token and channel;
Gaussian 3, uniform 1.8), the activation kurtosis SpinQuant reports (hundreds before rotation, ≈ 3
after). It is accumulated from float64 power sums, so memory stays one batch whatever the token count.
Max |x| is in the units the linear reads: where ``fold_norms`` moves a norm's γ into the readers' weights,
the q/k/v and gate/up inputs lose γ's scale, so their max may rise while the (scale-free) kurtosis falls;
compare maxima within one input, and kurtosis across transforms.
The statistics come from ``passes.calibrate.collect`` (the collector the transforms themselves use), on
seeded wikitext2_valid windows (random token ids for a model without a tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qcompile.errors import QCompileError
from qcompile.eval import data
from qcompile.passes.calibrate import ChannelStats, collect
from qcompile.pipeline import needs_calibration, plan, run_passes
from qcompile.program import Program
from qcompile.recipe import Recipe

ROLES = ("qkv", "o", "up", "down")  # up: the input gate and up share


def kurtosis_from_sums(n: int, sums: torch.Tensor) -> float:
    """Pearson kurtosis from n and the float64 power sums [Σx, Σx², Σx³, Σx⁴] (0 for a constant tensor)."""
    m1, m2, m3, m4 = (sums / n).tolist()
    var = m2 - m1 * m1
    if var <= 0:
        return 0.0
    central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
    return central4 / var ** 2


def power_sums(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1).double()
    x2 = x * x
    return torch.stack([x.sum(), x2.sum(), (x2 * x).sum(), (x2 * x2).sum()])


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis of all values of ``x``."""
    return kurtosis_from_sums(x.numel(), power_sums(x))


@dataclass
class Moments(ChannelStats):
    """``ChannelStats`` plus the power sums of all values, for the kurtosis."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    count: int = 0

    def update(self, x: torch.Tensor, keep: int = 0) -> None:
        super().update(x, keep)
        self.sums += power_sums(x)
        self.count += x.numel()

    @property
    def kurtosis(self) -> float:
        return kurtosis_from_sums(self.count, self.sums)


@dataclass(frozen=True)
class Site:
    """One quantized linear's input: layer, role and the linear node that reads it in a given Program."""

    layer: int
    role: str
    node: str

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.role}"


@dataclass
class SiteStats:
    site: Site
    max: float
    kurtosis: float
    channel_max: torch.Tensor  # per-channel max |x|, [C]
    tokens: torch.Tensor | None = None  # |x| of the first kept token rows, [t, C]


def sites(program: Program) -> list[Site]:
    """The four linear inputs of every block (roles in ``ROLES``), named by this Program's linear nodes."""
    out = []
    for b in program.model_map.blocks:
        a, f = b.attention, b.ffn
        nodes = (a.q.linear, a.o, (f.gate or f.up).linear, f.down)
        out += [Site(b.index, role, node) for role, node in zip(ROLES, nodes)]
    return out


def measure(program: Program, windows: torch.Tensor, batch: int = 4, keep_tokens: int = 0,
            progress: bool = True) -> list[SiteStats]:
    """Max |x|, kurtosis and per-channel max |x| of every site's input over ``windows`` [n, seq];
    ``keep_tokens`` > 0 also keeps |x| of that many first token rows (for the surface plots)."""
    ss = sites(program)
    stats = collect(program, windows, {s.node: 0 for s in ss}, batch=batch, keep_tokens=keep_tokens,
                    progress=progress, make=Moments)
    return [SiteStats(s, float(stats[s.node].absmax.max()), stats[s.node].kurtosis, stats[s.node].absmax,
                      stats[s.node].kept().abs() if keep_tokens else None) for s in ss]


def check_keys(program: Program, keys: list[str]) -> dict[str, Site]:
    """{key: Site} for site keys "LAYER:ROLE"; a key naming no site is refused with the valid range."""
    by_key = {s.key: s for s in sites(program)}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise QCompileError(f"no site {', '.join(unknown)}: a site is LAYER:ROLE with LAYER in "
                            f"0..{len(program.model_map.blocks) - 1} and ROLE one of {', '.join(ROLES)}")
    return by_key


def windows(tokenizer, vocab_size: int, samples: int, seq: int, seed: int) -> torch.Tensor:
    """``samples`` × ``seq`` seeded wikitext2_valid windows; seeded random ids when there is no tokenizer."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (samples, seq), generator=torch.Generator().manual_seed(seed))
    return data.calibration_windows(data.token_ids(tokenizer, data.VALID), samples, seq, seed)


@dataclass
class Comparison:
    """Statistics of every site before and after a recipe's transforms, and the two Programs measured."""

    recipe: str
    samples: int
    seq: int
    seed: int
    before: list[SiteStats]
    after: list[SiteStats]
    passes: list[str]  # the transforms' report lines
    data: str  # "wikitext2_valid", or "random ids" for a model without a tokenizer
    programs: tuple[Program, Program]
    plots: list[str] = field(default_factory=list)

    def rows(self):
        return list(zip(self.before, self.after))

    def worst(self, role: str | None = None) -> dict:
        """Largest max and largest kurtosis over layers (of one role, or all), before and after."""
        pairs = [(b, a) for b, a in self.rows() if role is None or b.site.role == role]
        return {"max_before": max(b.max for b, _ in pairs), "max_after": max(a.max for _, a in pairs),
                "kurtosis_before": max(b.kurtosis for b, _ in pairs),
                "kurtosis_after": max(a.kurtosis for _, a in pairs)}

    def largest(self, role: str | None = None) -> str:
        """The site (of one role, or any) whose input has the largest max |x| before the transforms."""
        return max((s for s in self.before if role in (None, s.site.role)), key=lambda s: s.max).site.key

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "windows": {"samples": self.samples, "seq": self.seq, "seed": self.seed, "data": self.data},
            "kurtosis": "pearson over all values (gaussian 3)",
            "passes": self.passes,
            "sites": [{"layer": b.site.layer, "role": b.site.role, "node_before": b.site.node,
                       "node_after": a.site.node, "max_before": b.max, "max_after": a.max,
                       "kurtosis_before": b.kurtosis, "kurtosis_after": a.kurtosis} for b, a in self.rows()],
            "summary": {r: self.worst(r) for r in ROLES} | {"all": self.worst()},
            "plots": self.plots,
        }

    def lines(self) -> list[str]:
        out = [f"recipe {self.recipe} (quantization off); statistics on {self.samples} × {self.seq} tokens of "
               f"{self.data}, seed {self.seed}; kurtosis: Pearson over all values (Gaussian 3)"]
        out += [f"  {line}" for line in self.passes]
        out.append(f"{'layer':>5}  {'input':<5} {'max|x| before':>14} {'after':>10}  {'kurtosis before':>16} "
                   f"{'after':>10}")
        out += [f"{b.site.layer:>5}  {b.site.role:<5} {b.max:>14.3f} {a.max:>10.3f}  {b.kurtosis:>16.2f} "
                f"{a.kurtosis:>10.2f}" for b, a in self.rows()]
        out.append("largest over layers:")
        for role in (*ROLES, "all"):
            w = self.worst(None if role == "all" else role)
            out.append(f"{'':>5}  {role:<5} {w['max_before']:>14.3f} {w['max_after']:>10.3f}  "
                       f"{w['kurtosis_before']:>16.2f} {w['kurtosis_after']:>10.2f}")
        out += [f"plot: {p}" for p in self.plots]
        return out


def compare(program: Program, recipe: Recipe, tokenizer=None, samples: int = 4, seq: int = 512, seed: int = 1,
            keep_tokens: int = 0, progress: bool = True) -> Comparison:
    """Measure every site of ``program``, run ``recipe``'s transforms (quantization off), measure again.

    Passes that calibrate get the recipe's calibration windows (``recipe.calibration``); the statistics
    are measured on ``samples`` × ``seq`` windows drawn with ``seed``, by default other windows than
    the ones the transforms were fitted on. ``keep_tokens``: see ``measure``.
    """
    recipe = recipe.without_quantization()
    plan(program.model_map, recipe)  # refuse before measuring anything
    vocab = program.model_map.linears[program.model_map.lm_head].out_features
    measure_ids = windows(tokenizer, vocab, samples, seq, seed)
    before = measure(program, measure_ids, keep_tokens=keep_tokens, progress=progress)
    calib = None
    if needs_calibration(recipe):
        c = recipe.calibration
        calib = windows(tokenizer, vocab, c.samples, c.seq, c.seed)
    transformed = run_passes(program, recipe, calib)
    after = measure(transformed, measure_ids, keep_tokens=keep_tokens, progress=progress)
    passes = [line for r in transformed.reports for line in r.lines()]
    source = "wikitext2_valid" if tokenizer is not None else "random ids"
    return Comparison(recipe.name, samples, seq, seed, before, after, passes, source, (program, transformed))
