"""Routed experts: per-expert Hessians from the tokens routed to each expert, and per-expert GPTQ/LeanQuant.

transformers (5.x) stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 as stacked 3-D
parameters ``W [E, out, in]`` and runs them as one grouped matmul: the (token, expert) pairs are sorted by
expert, and ``grouped_mm(x_sorted [S, in], Wᵀ, offs [E])`` multiplies rows ``offs[e−1]:offs[e]`` by expert
e's weight (``offs`` the cumulative token counts). The capture keeps that op (a ``Linear`` with
``experts=E``), so the rows each expert reads are known at run time from ``offs``:

    X_e = x_sorted[offs[e−1] : offs[e]],   H_e = 2/n_e · X_eᵀ X_e   (n_e tokens routed to expert e)

which is exactly the Hessian of expert e's layer loss ‖X_e W_eᵀ − X_e Ŵ_eᵀ‖² (a token routed to e is one
row of X_e; its routing weight scales the expert's *output*, after the down projection, so it is not in
X_e). Each expert is then quantized on its own Hessian; an expert that no calibration token reaches has no
Hessian (n_e = 0) and is quantized by RTN, and the quantize report lists it. The per-expert results are
stacked back row-wise into one ``QuantizedWeight [E·out, in]`` (scales, zeros, codebooks are per row).

``routed_tokens`` runs the float Program over calibration windows and counts n_e per expert weight: the plan
of which experts will fall back to RTN, before any quantization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import fx

from qcompile.analysis.modelmap import Linear
from qcompile.errors import QCompileError
from qcompile.program import Program
from qcompile.quant.formats import QuantizedWeight
from qcompile.quant.gptq import HessianAccumulator

RTN_REASON = "no calibration token routed to it: RTN"


def offsets_of(node: fx.Node) -> fx.Node:
    """The ``offs`` operand (cumulative tokens per expert) of a grouped expert matmul node."""
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    if not isinstance(offs, fx.Node):
        raise QCompileError(f"expert matmul {node.name} ({node.target}) has no offsets operand; cannot tell which "
                            "rows each expert reads")
    return offs


def expert_site(weight: str, e: int) -> str:
    """How a report names expert e of a stacked weight."""
    return f"{weight}[{e}]"


class ExpertHessians:
    """One Hessian per expert: ``add(x_sorted, offs)`` splits the rows by expert (see the module docstring).

    Memory: an accumulator ``[in, in]`` exists only for an expert that got rows, and is dropped by ``release``
    once that expert is quantized. ``from_rows`` keeps the rows of one run instead (views of its input, which is
    in memory anyway) and forms each H_e when asked, so quantizing expert after expert holds one H_e at a time.
    """

    def __init__(self, lin: Linear, device=None):
        if (lin.in_axis % 3, lin.out_axis % 3) != (2, 1):
            raise QCompileError(f"expert weight {lin.weight}: expected the [E, out, in] layout, got in_axis "
                                f"{lin.in_axis}, out_axis {lin.out_axis}")
        self.lin, self.device = lin, device
        self.acc: list[HessianAccumulator | None] = [None] * lin.experts
        self.rows: list[torch.Tensor | None] | None = None
        self._tokens = [0] * lin.experts

    @classmethod
    def from_rows(cls, lin: Linear, x: torch.Tensor, offs: torch.Tensor) -> "ExpertHessians":
        h = cls(lin, device=x.device)
        h.rows = list(h._split(x, offs))
        h._tokens = [r.shape[0] for r in h.rows]
        return h

    def _split(self, x: torch.Tensor, offs: torch.Tensor):
        x = x.detach().reshape(-1, self.lin.in_features)
        ends = offs.tolist()
        if len(ends) != self.lin.experts:
            raise QCompileError(f"{self.lin.weight}: {len(ends)} expert offsets for {self.lin.experts} experts")
        return (x[a:b] for a, b in zip([0] + ends[:-1], ends))

    def _accumulator(self, e: int) -> HessianAccumulator:
        return HessianAccumulator(self.lin.in_features, name=expert_site(self.lin.weight, e), device=self.device)

    def add(self, x: torch.Tensor, offs: torch.Tensor) -> None:
        for e, rows in enumerate(self._split(x, offs)):
            if rows.shape[0]:
                if self.acc[e] is None:
                    self.acc[e] = self._accumulator(e)
                self.acc[e].add(rows)
                self._tokens[e] += rows.shape[0]

    @property
    def tokens(self) -> list[int]:
        """Calibration rows (tokens) routed to each expert."""
        return list(self._tokens)

    def hessian(self, e: int) -> torch.Tensor | None:
        """H_e, or None when no token was routed to expert e."""
        if not self._tokens[e]:
            return None
        if self.rows is not None:
            acc = self._accumulator(e)
            acc.add(self.rows[e])
            return acc.hessian()
        return self.acc[e].hessian()

    def release(self, e: int) -> None:
        """Drop what holds expert e's Hessian (its accumulator or its rows)."""
        self.acc[e] = None
        if self.rows is not None:
            self.rows[e] = None


def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """One QuantizedWeight [Σ rows, K] from per-expert ones (every field but the spec is per row)."""
    first = parts[0]
    cat = {f.name: torch.cat([getattr(q, f.name) for q in parts]) for f in dataclasses.fields(first)
           if isinstance(getattr(first, f.name), torch.Tensor)}
    return dataclasses.replace(first, **cat)


def as_codebook(qw: QuantizedWeight, dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """A per-channel affine QuantizedWeight as a codebook one (codebook[r, c] = (c − z_r)·s_r), so that an
    RTN expert can be stacked with LeanQuant's non-uniform experts."""
    levels = torch.arange(1 << qw.spec.bits, dtype=torch.float32, device=qw.codes.device)
    zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, float(1 << (qw.spec.bits - 1)))
    codebook = ((levels - zeros[:, :1]) * qw.scales[:, :1]).to(dtype).float()
    weight = codebook.gather(1, qw.codes.long())
    return QuantizedWeight(weight, qw.codes, qw.spec, codebook=codebook)


def quantize_experts(w: torch.Tensor, hessians: ExpertHessians,
                     quantize_one: Callable[[torch.Tensor, torch.Tensor | None, str], QuantizedWeight]
                     ) -> tuple[QuantizedWeight, list[int]]:
    """(the stacked QuantizedWeight of ``w [E, out, in]``, the experts quantized without a Hessian).

    ``quantize_one(w_e, H_e or None, site)`` quantizes one expert: GPTQ/LeanQuant with H_e, RTN with None."""
    parts, fallback = [], []
    for e in range(w.shape[0]):
        H = hessians.hessian(e)
        if H is None:
            fallback.append(e)
        parts.append(quantize_one(w[e], H, expert_site(hessians.lin.weight, e)))
        del H
        hessians.release(e)
    if any(q.codebook is not None for q in parts):
        parts = [q if q.codebook is not None else as_codebook(q) for q in parts]
    return stack(parts), fallback


class _Counter(fx.Interpreter):
    def __init__(self, p: Program, experts: dict[str, Linear]):
        super().__init__(p.module, garbage_collect_values=True)
        self.hessians = {n: ExpertHessians(lin, device=p.device) for n, lin in experts.items()}

    def run_node(self, n: fx.Node):
        h = self.hessians.get(n.name)
        if h is not None:
            h.add(self.env[n.args[0]], self.env[offsets_of(n)])
        return super().run_node(n)


@torch.no_grad()
def expert_hessians(program: Program, calibration: torch.Tensor, nodes: list[str] | None = None,
                    batch: int = 4) -> dict[str, ExpertHessians]:
    """Per-expert Hessians of the routed expert linears ``nodes`` (default: all) of ``program`` as it is, over
    the calibration windows [n, seq] run in batches of ``batch``."""
    mm = program.model_map
    experts = {n: mm.linears[n] for n in (nodes if nodes is not None else mm.linears) if mm.linears[n].experts}
    counter = _Counter(program, experts)
    for start in range(0, calibration.shape[0], batch):
        counter.run(calibration[start : start + batch].to(program.device))
    return counter.hessians


def routed_tokens(program: Program, calibration: torch.Tensor, batch: int = 4) -> dict[str, list[int]]:
    """{expert weight: calibration tokens routed to each expert} on the float Program."""
    return {h.lin.weight: h.tokens for h in expert_hessians(program, calibration, batch=batch).values()}


def plan_lines(counts: dict[str, list[int]]) -> list[str]:
    """The plan for routed experts: tokens per expert, and which fall back to RTN."""
    lines = []
    for weight, tokens in counts.items():
        starved = [e for e, t in enumerate(tokens) if t == 0]
        lines.append(f"{weight}: tokens per expert {tokens}" + (
            f"; RTN for expert(s) {starved} ({RTN_REASON.split(':')[0]})" if starved else ""))
    return lines


@torch.no_grad()
def quantize_blockwise(program: Program, targets: dict[str, Linear],
                       quantize_linear: Callable[[Linear, ExpertHessians], None], calibration: torch.Tensor,
                       device=None, batch: int = 4) -> None:
    """The routed expert linears ``targets`` quantized block by block on ``device`` (``passes.blockwise``'s
    runner), after the dense linears: for each block, in graph order, the block runs up to each expert matmul
    over every batch, its per-expert Hessians are summed and ``quantize_linear(lin, hessians)`` quantizes it;
    then the block runs once more to carry its output forward. The experts of a block see every dense linear
    quantized (those of later blocks too, which whole-graph GPTQ quantizes after them)."""
    from qcompile.passes.blockwise import BlockRunner, codes_home

    runner = BlockRunner(program, device)
    segs = runner.segments
    todo = {k: [n for n in seg if n.name in targets] for k, seg in enumerate(segs.nodes)}
    last = max((k for k, ns in todo.items() if ns), default=-1)
    envs = runner.start(calibration, batch)
    for k in range(last + 1):
        weights = {targets[n.name].weight for n in todo[k]}
        lazy = {w for w in weights if w in program.lazy}
        with runner.weights_on_device(k, changed=weights):  # the block's other weights stay as they were (lazy)
            for node in todo[k]:
                lin = targets[node.name]
                hessians = ExpertHessians(lin, device=runner.device)

                def observe(n, env, node=node, hessians=hessians):
                    if n is node:
                        hessians.add(env[n.args[0]], env[offsets_of(n)])

                runner.on_node = observe
                runner.run_segment(k, envs, until=node, consume=lambda v: None)
                runner.on_node = None
                quantize_linear(lin, hessians)
            if k < last:
                envs = runner.run_segment(k, envs)
        for node in todo[k]:
            codes_home(program, targets[node.name].weight, targets[node.name].weight in lazy)
