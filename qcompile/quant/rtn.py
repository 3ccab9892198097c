"""Round-to-nearest weight quantization with QuaRot's linear clip search.

For each row (or group) the range ``[lo, hi]`` is shrunk to ``c·[lo, hi]`` for the candidates
``c = clip_ratio · (1 − i/grid)``, ``i = 0 … ⌊max_shrink·grid⌋ − 1`` (100 steps from 1.0 down to 0.21
by default), and the candidate with the least error ``Σ |Q(w) − w|^norm`` over the group is kept.
``norm = 2.4`` is GPTQ's ``find_params(mse=True)`` default, used by QuaRot; ``norm = 2`` is plain
squared error. Candidate 0 is the unshrunk range and is only replaced by a strictly better one, so
the search never increases the error (in the norm it measures) over ``fake_quantize`` at
``clip_ratio``.

``search_qparams`` is the shared engine: it takes any candidate list of (lo-shrink, hi-shrink) pairs and
an optional per-column weight, which is how LeanQuant's loss-error-aware affine grid reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qcompile.errors import RecipeError
from qcompile.quant.formats import (
    Granularity,
    _group_view,
    QuantizedWeight,
    QuantSpec,
    compute_qparams,
    dequantize,
    group_length,
    group_reduce,
    qparams_from_range,
    quantize,
    round_trip,
    straight_through,
)

__all__ = [
    "linear_shrinks", "search_qparams", "mse_qparams", "coarse_to_fine_mse_qparams", "rtn_quantize", "fake_quantize_mse",
]


def linear_shrinks(grid: int = 100, max_shrink: float = 0.8) -> list[float]:
    """QuaRot/GPTQ candidates ``1 − i/grid`` for ``i < max_shrink·grid`` (first is 1.0)."""
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise RecipeError(
            f"clip search needs grid ≥ 1 and 0 ≤ max_shrink < 1, got grid={grid}, max_shrink={max_shrink}"
        )
    return [1.0 - i / grid for i in range(max(1, int(max_shrink * grid)))]


def search_qparams(
    w: Tensor,
    spec: QuantSpec,
    candidates: Sequence[tuple[float, float]],
    *,
    norm: float = 2.0,
    col_weight: Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    with_index: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-group (scale, zero) of ``w [N, K]`` minimising ``Σ_k col_weight[k]·|Q(w) − w|^norm``.

    Each candidate ``(a, b)`` uses the range ``clip_ratio·[a·lo, b·hi]`` (symmetric specs use ``a``
    only); ``candidates`` may also be a pair of tensors ``(a, b)`` of shape ``[C, N, G]``, one list per
    group. The first candidate wins ties, so put the reference range first. Vectorised over all
    rows and groups; the loop is over candidates only. ``with_index`` also returns which candidate won.
    """
    if w.dim() != 2 or spec.granularity not in (Granularity.CHANNEL, Granularity.GROUP):
        raise RecipeError(
            f"clip search runs on 2-D weights per channel or group; got shape {tuple(w.shape)}, "
            f"granularity {spec.granularity.value!r}"
        )
    if not candidates:
        raise RecipeError("clip search needs at least one candidate")
    x = w.detach().float()
    k = x.shape[1]
    g = group_length(spec, k)
    lo = group_reduce(x, g, "amin").clamp(max=0) * spec.clip_ratio
    hi = group_reduce(x, g, "amax").clamp(min=0) * spec.clip_ratio
    # work on the grouped view [N, G, g]: zero padding of a partial group quantizes to 0 exactly (z is an
    # integer), so it adds no error and needs no masking. Candidates are evaluated in chunks stacked on
    # a leading axis, so the loop runs a handful of large ops instead of many small ones; on the CPU over
    # tiles of rows too, so each chunk (≈ 4 MB) stays in cache: rows are independent, so the tiling changes
    # no value (each row's error is summed over the same g elements in the same order).
    xg = _group_view(x, g, "zero")
    wg = None if col_weight is None else _group_view(col_weight.float().expand_as(x), g, "zero")
    if isinstance(candidates, tuple) and torch.is_tensor(candidates[0]):
        a_all, b_all = candidates[0], candidates[0 if spec.symmetric else 1]
    else:
        a_all = torch.tensor([a for a, _ in candidates], device=x.device).view(-1, 1, 1)
        b_all = torch.tensor([a if spec.symmetric else b for a, b in candidates], device=x.device).view(-1, 1, 1)
    n, per_row = xg.shape[0], max(xg[0].numel(), 1) if xg.shape[0] else 1
    budget = (1 << 24) if x.is_cuda else (1 << 20)
    rows = n if x.is_cuda else max(1, budget // (8 * per_row))
    found = [_search_rows(xg[r0 : r0 + rows], lo[r0 : r0 + rows], hi[r0 : r0 + rows],
                          None if wg is None else wg[r0 : r0 + rows], _rows_of(a_all, r0, rows),
                          _rows_of(b_all, r0, rows), spec, norm, scale_dtype, budget)
             for r0 in range(0, max(n, 1), rows)]
    best_s, best_z, best_i = (torch.cat(t) for t in zip(*found))
    return (best_s, best_z, best_i) if with_index else (best_s, best_z)


def _rows_of(c: Tensor, r0: int, rows: int) -> Tensor:
    """Rows ``[r0, r0 + rows)`` of a candidate tensor ``[C, N, G]`` (a shared list ``[C, 1, 1]`` as is)."""
    return c if c.shape[1] == 1 else c[:, r0 : r0 + rows]


def _search_rows(xg: Tensor, lo: Tensor, hi: Tensor, wg: Tensor | None, a_all: Tensor, b_all: Tensor,
                 spec: QuantSpec, norm: float, scale_dtype, budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """``search_qparams``'s loop over candidate chunks for one tile of rows ``xg [n, G, g]``: (s, z, index)."""
    chunk = max(1, min(len(a_all), budget // max(xg.numel(), 1)))
    best_err = best_s = best_z = best_i = None
    for c0 in range(0, len(a_all), chunk):
        a, b = a_all[c0 : c0 + chunk], b_all[c0 : c0 + chunk]
        s, z = qparams_from_range(a * lo, b * hi, spec, 1.0, scale_dtype)  # [C, n, G]
        s4, z4 = s.unsqueeze(-1), z.unsqueeze(-1)
        e = round_trip(xg, s4, z4, spec.qmax).sub_(xg).abs_()
        e = e.square_() if norm == 2 else e.pow_(norm)
        if wg is not None:
            e = e.mul_(wg)
        err, idx = e.sum(-1).min(0)  # the first of equal errors wins
        s = s.gather(0, idx[None]).squeeze(0)
        z = z.gather(0, idx[None]).squeeze(0)
        idx = idx + c0
        if best_err is None:
            best_err, best_s, best_z, best_i = err, s, z, idx
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_i = torch.where(better, idx, best_i)
    return best_s, best_z, best_i


def mse_qparams(
    w: Tensor,
    spec: QuantSpec,
    *,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """QuaRot's linear clip search (one shrink factor for both ends of the range)."""
    cands = [(c, c) for c in linear_shrinks(grid, max_shrink)]
    return search_qparams(w, spec, cands, norm=norm, scale_dtype=scale_dtype)


def coarse_to_fine_mse_qparams(
    w: Tensor, spec: QuantSpec, *, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4, stride: int = 8
) -> tuple[Tensor, Tensor]:
    """``mse_qparams`` on a budget: every ``stride``-th shrink, then the ``stride − 1`` neighbours on each
    side of each group's best. It finds the exhaustive optimum unless a group's error has a second valley
    narrower than ``stride`` grid steps, with about ``n/stride + 2·stride`` candidates instead of n."""
    shrinks = torch.tensor(linear_shrinks(grid, max_shrink), device=w.device)
    coarse = shrinks[::stride].view(-1, 1, 1)
    _, _, won = search_qparams(w, spec, (coarse, coarse), norm=norm, with_index=True)
    offsets = torch.arange(-(stride - 1), stride, device=w.device).view(-1, 1, 1)
    near = shrinks[(won[None] * stride + offsets).clamp(0, len(shrinks) - 1)]  # [2·stride − 1, N, G]
    return search_qparams(w, spec, (near, near), norm=norm)


def rtn_quantize(
    w: Tensor,
    spec: QuantSpec,
    *,
    clip_search: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    scale_dtype: torch.dtype | None = torch.float16,
) -> QuantizedWeight:
    """RTN of ``w [N, K]``; params by clip search (or plain min/max at ``clip_ratio``).

    Scales are rounded through ``scale_dtype`` so that ``.pack()`` reproduces ``.weight`` exactly.
    """
    if clip_search:
        s, z = mse_qparams(w, spec, grid=grid, max_shrink=max_shrink, norm=norm, scale_dtype=scale_dtype)
    else:
        s, z = compute_qparams(w, spec, scale_dtype)
    codes = quantize(w.detach(), s, z, spec)
    return QuantizedWeight(dequantize(codes, s, z, spec), codes, spec, scales=s, zeros=z)


def fake_quantize_mse(w: Tensor, spec: QuantSpec, **search) -> Tensor:
    """RTN fake-quant with the clip search recomputed on every call (SpinQuant's weight quantizer, run at
    every training step over every linear, hence the coarse-to-fine search); straight-through gradient,
    output in ``w``'s dtype."""
    s, z = coarse_to_fine_mse_qparams(w, spec, **search)
    return fake_quantize_on_grid(w, spec, s, z)


def fake_quantize_on_grid(w: Tensor, spec: QuantSpec, s: Tensor, z: Tensor) -> Tensor:
    """RTN fake-quant of ``w`` on a given grid (scale, zero): straight-through gradient, ``w``'s dtype."""
    wq = dequantize(quantize(w.detach(), s, z, spec), s, z, spec, w.dtype)
    return straight_through(w, wq)

