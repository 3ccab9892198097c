"""Weight algebra on a Program's linears, in float64, written back in the weights' own dtype.

For a linear y = x·Wᵀ + b (W laid out [..., out, in] after moving its axes there):
- a reader whose input becomes x·M⁻ᵀ keeps y exact with W ← W·M (``transform_inputs``): a folded
  scale is M = diag(γ), a rotated stream x·Q (Q orthogonal, Q⁻ᵀ = Q) needs W ← W·Q;
- a writer whose output should become y·M takes W ← Mᵀ·W and b ← b·M (``transform_outputs``),
  on all output rows or on a range of them (one head of a fused qkv).

``inputs_transformed`` / ``outputs_transformed`` are the same algebra as pure functions of tensors (no
write-back, no detach), so a pass that learns M (SpinQuant) differentiates through exactly the update that
the in-place functions apply.

Where the algebra runs: inside ``computed_on(device)`` every weight a pass reads through ``read`` (and so
every in-place function here) is copied to ``device``, updated there in float64 and written back into the
Program's own tensor, one weight at a time. A Program kept on the host is so rotated and folded on a GPU
holding one weight (in float64, with its result and the matrix) at a time, not the model. The ops are the
same on the same values, so the weights equal the all-on-``device`` path's; ``computed_on("cpu")`` on a
host Program is the plain path itself. Outside the context the algebra runs where the weights are.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch

from qcompile.analysis.modelmap import Linear
from qcompile.graph.edit import bias_name
from qcompile.program import Program


_COMPUTE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("qcompile_compute", default=None)


@contextlib.contextmanager
def computed_on(device: torch.device | str | None):
    """Run the weight algebra of the passes called inside on ``device`` (None: where the weights are)."""
    token = _COMPUTE.set(torch.device(device) if device is not None else None)
    try:
        yield
    finally:
        _COMPUTE.reset(token)


def compute_device(p: Program, name: str | None = None) -> torch.device:
    """Where weight ``name`` (default: the Program's weights) is computed on: ``computed_on``'s device, else
    the weight's own."""
    device = _COMPUTE.get()
    if device is not None:
        return device
    return p.weight(name).device if name is not None else p.device


def read(p: Program, name: str) -> torch.Tensor:
    """Weight ``name`` as a detached float64 tensor on its compute device (a copy when it lives elsewhere;
    the conversion is exact, so where it happens does not change the value)."""
    return p.weight(name).detach().to(compute_device(p, name)).double()


def canonical(p: Program, lin: Linear) -> torch.Tensor:
    """``lin``'s weight [..., out, in] as ``read`` gives it (float64, on its compute device)."""
    return read(p, lin.weight).movedim((lin.out_axis, lin.in_axis), (-2, -1))


def _store(p: Program, lin: Linear, w: torch.Tensor) -> None:
    p.set_weight(lin.weight, w.movedim((-2, -1), (lin.out_axis, lin.in_axis)))


def linear(p: Program, node: str) -> Linear:
    return p.model_map.linears[node]


def scale_inputs(p: Program, lin: Linear, s: torch.Tensor) -> None:
    """W ← W·diag(s): the reader absorbs a per-input-channel scale."""
    w = canonical(p, lin)
    _store(p, lin, w * s.to(w.device, torch.float64))


def inputs_transformed(w: torch.Tensor, lin: Linear, m: torch.Tensor) -> torch.Tensor:
    """W·M along ``lin``'s input axis, float64, in ``w``'s layout (differentiable in ``w`` and ``m``)."""
    canonical = w.double().movedim((lin.out_axis, lin.in_axis), (-2, -1))
    return (canonical @ m.to(canonical.device, torch.float64)).movedim((-2, -1), (lin.out_axis, lin.in_axis))


def outputs_transformed(w: torch.Tensor, b: torch.Tensor | None, lin: Linear, m: torch.Tensor, start: int = 0,
                        stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) with output rows [start, stop) ← Mᵀ·W[rows], b[rows]·M; float64, differentiable, out of place."""
    stop = lin.out_features if stop is None else stop
    m = m.to(w.device, torch.float64)
    canonical = w.double().movedim((lin.out_axis, lin.in_axis), (-2, -1))
    rows = m.T @ canonical[..., start:stop, :]
    canonical = torch.cat([canonical[..., :start, :], rows, canonical[..., stop:, :]], dim=-2)
    w = canonical.movedim((-2, -1), (lin.out_axis, lin.in_axis))
    return w, (bias_outputs_transformed(b, lin, m, start, stop) if b is not None else None)


def bias_outputs_transformed(b: torch.Tensor, lin: Linear, m: torch.Tensor, start: int = 0,
                             stop: int | None = None) -> torch.Tensor:
    """The bias half of ``outputs_transformed``: b[start:stop] ← b[start:stop]·M (float64, out of place)."""
    stop = lin.out_features if stop is None else stop
    b = b.double()
    return torch.cat([b[..., :start], b[..., start:stop] @ m.to(b.device, torch.float64), b[..., stop:]], dim=-1)


def transform_inputs(p: Program, lin: Linear, m: torch.Tensor) -> None:
    """W ← W·M along the input axis."""
    p.set_weight(lin.weight, inputs_transformed(read(p, lin.weight), lin, m))


def transform_outputs(p: Program, lin: Linear, m: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
    """y[start:stop] ← y[start:stop]·M: W[rows] ← Mᵀ·W[rows], b[rows] ← b[rows]·M."""
    b = read(p, lin.bias) if lin.bias else None
    w, b = outputs_transformed(read(p, lin.weight), b, lin, m, start, stop)
    p.set_weight(lin.weight, w)
    if b is not None:
        p.set_weight(lin.bias, b)


def add_to_bias(p: Program, lin: Linear, delta: torch.Tensor) -> Linear:
    """b ← b + delta, creating the bias (a new parameter next to the weight) where there is none."""
    if lin.experts:
        raise ValueError(f"cannot add a bias to stacked expert weight {lin.weight}")
    if lin.bias is None:
        name = bias_name(lin.weight)
        p.graph.add_bias(lin.node, name, torch.zeros(lin.out_features, dtype=p.weight(lin.weight).dtype))
        lin = dataclasses.replace(lin, bias=name)
        linears = dict(p.model_map.linears)
        linears[lin.node] = lin
        p.with_map(linears=linears)
    b = read(p, lin.bias)
    p.set_weight(lin.bias, b + delta.to(b.device, torch.float64))
    return lin


def centre_outputs(p: Program, lin: Linear) -> None:
    """Make every output row mean-free across features: W ← W − mean_out(W), b ← b − mean(b)."""
    w = canonical(p, lin)
    _store(p, lin, w - w.mean(dim=-2, keepdim=True))
    if lin.bias:
        b = read(p, lin.bias)
        p.set_weight(lin.bias, b - b.mean(dim=-1, keepdim=True))
