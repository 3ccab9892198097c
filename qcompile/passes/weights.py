"""Weight algebra on a Program's linears, in float64, written back in the weights' own dtype.

For a linear y = x·Wᵀ + b (W laid out [..., out, in] after moving its axes there):
- a reader whose input becomes x·M⁻ᵀ keeps y exact with W ← W·M (``transform_inputs``): a folded
  scale is M = diag(γ), a rotated stream x·Q (Q orthogonal, Q⁻ᵀ = Q) needs W ← W·Q;
- a writer whose output should become y·M takes W ← Mᵀ·W and b ← b·M (``transform_outputs``),
  on all output rows or on a range of them (one head of a fused qkv).

``inputs_transformed`` / ``outputs_transformed`` are the same algebra as pure functions of tensors (no
write-back, no detach), so a pass that learns M (SpinQuant) differentiates through exactly the update that
the in-place functions apply.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.analysis.modelmap import Linear
from qcompile.graph.edit import bias_name
from qcompile.program import Program


def _canonical(p: Program, lin: Linear) -> torch.Tensor:
    return p.weight(lin.weight).detach().double().movedim((lin.out_axis, lin.in_axis), (-2, -1))


def _store(p: Program, lin: Linear, w: torch.Tensor) -> None:
    p.set_weight(lin.weight, w.movedim((-2, -1), (lin.out_axis, lin.in_axis)))


def linear(p: Program, node: str) -> Linear:
    return p.model_map.linears[node]


def scale_inputs(p: Program, lin: Linear, s: torch.Tensor) -> None:
    """W ← W·diag(s): the reader absorbs a per-input-channel scale."""
    w = _canonical(p, lin)
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
    if b is not None:
        b = b.double()
        b = torch.cat([b[..., :start], b[..., start:stop] @ m, b[..., stop:]], dim=-1)
    return w, b


def transform_inputs(p: Program, lin: Linear, m: torch.Tensor) -> None:
    """W ← W·M along the input axis."""
    p.set_weight(lin.weight, inputs_transformed(p.weight(lin.weight).detach(), lin, m))


def transform_outputs(p: Program, lin: Linear, m: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
    """y[start:stop] ← y[start:stop]·M: W[rows] ← Mᵀ·W[rows], b[rows] ← b[rows]·M."""
    b = p.weight(lin.bias).detach() if lin.bias else None
    w, b = outputs_transformed(p.weight(lin.weight).detach(), b, lin, m, start, stop)
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
    b = p.weight(lin.bias).detach().double()
    p.set_weight(lin.bias, b + delta.to(b.device, torch.float64))
    return lin


def centre_outputs(p: Program, lin: Linear) -> None:
    """Make every output row mean-free across features: W ← W − mean_out(W), b ← b − mean(b)."""
    w = _canonical(p, lin)
    _store(p, lin, w - w.mean(dim=-2, keepdim=True))
    if lin.bias:
        b = p.weight(lin.bias).detach().double()
        p.set_weight(lin.bias, b - b.mean(dim=-1, keepdim=True))
