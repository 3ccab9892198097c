"""calibrate: statistics of the values that flow into chosen graph nodes, over calibration windows.

One graph interpreter serves every transform that needs activation statistics (SmoothQuant's per-channel
maxima, OS+'s min/max, DuQuant's outlier channels): it runs the Program on batches of windows and
reduces the operand of each watched node over all tokens, so memory stays bounded by one batch.
An ONNX Program is run in onnxruntime instead, block by block and one window at a time, the watched
operands being extra outputs of each block's session (``graph.onnx_run.collect_values``); the node names
are the OpGraph's on both IRs, so a pass asks for the same statistics whatever the IR.
NaN or inf in a watched value is refused, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from tqdm import tqdm

from qcompile.errors import CalibrationError, QCompileError
from qcompile.graph.fx import CausalAttention
from qcompile.passes.blockwise import Segments, collect_blockwise
from qcompile.program import Program


@dataclass
class ChannelStats:
    """Per-channel (last axis) reductions over every token seen, plus the token count."""

    absmax: torch.Tensor | None = None
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None
    tokens: int = 0
    samples: list = field(default_factory=list)  # kept token rows (when asked for), float32 [t, C]

    def update(self, x: torch.Tensor, keep: int = 0) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = x.amin(0), x.amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.absmax = torch.maximum(self.max.abs(), self.min.abs())
        sq = x.square().sum(0)
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.tokens += x.shape[0]
        have = sum(s.shape[0] for s in self.samples)
        if keep > have:
            self.samples.append(x[: keep - have].clone())

    @property
    def finite(self) -> bool:
        """Whether every value seen was finite: min and max propagate NaN, and an infinity is a min or a max."""
        return bool(torch.isfinite(self.min).all()) and bool(torch.isfinite(self.max).all())

    @property
    def rms(self) -> torch.Tensor:
        return (self.sumsq / max(self.tokens, 1)).sqrt()

    def kept(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)


class _Watcher(CausalAttention, fx.Interpreter):
    def __init__(self, module: fx.GraphModule, watch: dict[str, int], stats: dict, keep: int, make):
        super().__init__(module, garbage_collect_values=True)
        self.watch, self.stats, self.keep, self.make = watch, stats, keep, make

    def run_node(self, n: fx.Node):
        pos = self.watch.get(n.name)
        if pos is not None:
            _observe(n.name, self.env[n.args[pos]], self.stats, self.keep, self.make)
        return super().run_node(n)


def _observe(name: str, value: torch.Tensor, stats: dict, keep: int, make) -> None:
    s = stats.setdefault(name, make())
    s.update(value, keep)
    if not s.finite:  # read off the running min/max: no pass of its own over the value
        raise CalibrationError(f"calibration: NaN/inf in the input of node {name}")


@torch.no_grad()
def collect(program: Program, windows: torch.Tensor, watch: dict[str, int], batch: int = 4,
            keep_tokens: int = 0, progress: bool = True, make=ChannelStats,
            device: torch.device | str | None = None, whole_graph: bool = False) -> dict[str, ChannelStats]:
    """Stats of operand ``pos`` of each watched node ``{node name: pos}`` over all windows [n, seq].

    ``keep_tokens`` > 0 also keeps that many token rows per node (for searches that need samples).
    ``make`` builds each node's accumulator: a ``ChannelStats`` subclass that reduces more (e.g. moments).
    On an ONNX Program it runs in onnxruntime (see the module docstring; ``batch`` and ``device`` unused).
    An fx graph runs block by block (``passes.blockwise``) on ``device`` (default: the Program's), the weights
    staying where they are, and only up to the last block that holds a watched node (the lm_head's logits, a
    third of SmolLM2's forward, are never computed); each node still sees the batches in order, so the
    statistics are those of the whole graph run batch by batch. A graph that cannot be cut into blocks, or
    ``whole_graph`` (the reference), runs whole on the Program's device.
    """
    stats: dict[str, ChannelStats] = {}
    if program.ir == "onnx":
        from qcompile.graph.onnx_run import collect_values

        og = program.graph.opgraph()
        values = {n: og.operand(n, pos) for n, pos in watch.items()}
        collect_values(program, windows, values, lambda n, x: _observe(n, x, stats, keep_tokens, make), progress)
        return stats
    def on_node(n, env):
        pos = watch.get(n.name)
        if pos is not None:
            _observe(n.name, env[n.args[pos]], stats, keep_tokens, make)

    try:
        segments = None if whole_graph else Segments(program.module, program.model_map)
    except QCompileError:
        segments = None
    if segments is not None and len(segments.inputs) == 1:
        collect_blockwise(program, windows, on_node, set(watch), batch=batch, device=device or program.device,
                          progress=progress, segments=segments)
        return stats
    watcher = _Watcher(program.module, watch, stats, keep_tokens, make)
    for start in tqdm(range(0, windows.shape[0], batch), desc="calibrate", unit="batch", disable=not progress):
        watcher.run(windows[start : start + batch].to(program.device))
    return stats


def linear_inputs(program: Program, nodes: list[str] | None = None) -> dict[str, int]:
    """The watch map for the inputs (operand 0) of linears (all of them by default)."""
    return {n: 0 for n in (nodes if nodes is not None else program.model_map.linears)}
