"""LeanQuant (arXiv 2407.10032): GPTQ with a loss-error-aware grid.

GPTQ's loss increase from rounding column i is ``(w_i − q_i)² / d_i²``, ``d_i = U_ii`` the diagonal of
the upper Cholesky factor of the damped ``H⁻¹`` (and the error it propagates scales the same way).
A min/max grid ignores that: it spends levels on weights whose errors are cheap. LeanQuant fixes the
grid *before* the GPTQ loop, from the un-updated weights, minimising the weighted rounding error

    Σ_i ω_i (w_i − Q(w_i))²,   ω_i = d_i^(−p)   (p = 4 by default; 3 also used),

p > 2 sharpening the emphasis on the columns with the largest loss-error. Everything else is GPTQ.

* Affine: (scale, zero) per row or group searched over shrunken ranges ``[a·lo, b·hi]`` with
  ``a, b ∈ linspace(1, min_shrink, steps)`` (``a = b`` for symmetric); ``(1, 1)``, the min/max grid,
  comes first and wins ties, so the weighted error never exceeds the min/max grid's. Vectorised over
  rows and groups (the loop runs over candidates). The official code releases only the non-uniform
  variant; this one follows the paper's description, and the candidate set is our choice.
* Non-uniform: a weighted 1-D k-means per row with ``2^b`` centroids (k-means++ at ≥ 4 bits, seeded;
  linspace at ≤ 3 bits), stored as codes + a per-row codebook ``[N, 2^b]``; group size does not apply.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile.errors import RecipeError
from qcompile.quant.formats import Granularity, QuantizedWeight, QuantSpec, group_length
from qcompile.quant.gptq import AffineGrid, CodebookGrid, GridFn, gptq_quantize
from qcompile.quant.rtn import search_qparams

__all__ = [
    "loss_error_weights",
    "affine_grid",
    "weighted_kmeans_1d",
    "codebook_grid",
    "leanquant_quantize",
]


def loss_error_weights(d: Tensor, p: float = 4.0) -> Tensor:
    """``ω_i = (d_i / min d)^(−p)`` in (0, 1]: d^(−p) normalised so that it cannot overflow."""
    d = d.double()
    return (d / d.min()).pow(-p).float()


def affine_grid(
    spec: QuantSpec,
    *,
    p: float = 4.0,
    steps: int = 20,
    min_shrink: float = 0.3,
    scale_dtype: torch.dtype | None = torch.float16,
) -> GridFn:
    """Grid hook for ``gptq_quantize``: loss-error-aware affine params per row or group."""
    if steps < 1 or not 0.0 < min_shrink <= 1.0:
        raise RecipeError(
            f"LeanQuant affine search needs steps ≥ 1 and 0 < min_shrink ≤ 1 (got {steps}, {min_shrink})"
        )
    shrinks = torch.linspace(1.0, min_shrink, steps).tolist()
    cands = [(a, a) for a in shrinks] if spec.symmetric else [(a, b) for a in shrinks for b in shrinks]

    def fit(W: Tensor, d: Tensor) -> AffineGrid:
        s, z = search_qparams(W, spec, cands, norm=2.0, col_weight=loss_error_weights(d, p), scale_dtype=scale_dtype)
        return AffineGrid(s, z, spec, group_length(spec, W.shape[1]))

    return fit


def weighted_kmeans_1d(
    x: Tensor, weight: Tensor, n_clusters: int, *, init: str = "kmeans++", iters: int = 50, seed: int = 0
) -> Tensor:
    """Independent weighted 1-D k-means on every row of ``x [N, K]`` (``weight [K]`` or ``[N, K]``).

    Returns centroids ``[N, n_clusters]`` sorted ascending. Each row is sorted once; a Lloyd step is a
    ``searchsorted`` of the centroid midpoints into it (O(N·C·log K)) plus prefix-sum differences; an
    empty cluster keeps its centroid. A value on a midpoint goes to the lower cluster, as in
    ``CodebookGrid.round``.
    ``init='kmeans++'`` samples with probability ∝ ω·D² from a generator seeded with ``seed``.
    """
    x = x.float()
    w = weight.float().expand_as(x).contiguous()
    N, K = x.shape
    if init == "linspace":
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        c = lo + (hi - lo) * torch.linspace(0, 1, n_clusters, device=x.device)
    elif init == "kmeans++":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        c = x.new_empty(N, n_clusters)
        c[:, 0] = x.gather(1, torch.multinomial(w, 1, generator=gen)).squeeze(1)
        d2 = (x - c[:, :1]).square()
        for j in range(1, n_clusters):
            prob = w * d2
            prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, w)  # rows with < j distinct values
            c[:, j] = x.gather(1, torch.multinomial(prob, 1, generator=gen)).squeeze(1)
            d2 = torch.minimum(d2, (x - c[:, j : j + 1]).square())
    else:
        raise RecipeError(f"k-means init must be 'kmeans++' or 'linspace', got {init!r}")

    # Lloyd in 1-D: clusters are contiguous runs of the sorted row, so cluster sums are differences
    # of prefix sums (deterministic on every device, unlike scatter_add's atomics on CUDA).
    xs, order = x.sort(1)
    zero = x.new_zeros(N, 1, dtype=torch.float64)
    cw = torch.cat([zero, w.gather(1, order).double().cumsum(1)], 1)
    cwx = torch.cat([zero, (w.gather(1, order).double() * xs.double()).cumsum(1)], 1)
    ends = torch.full((N, 1), K, device=x.device, dtype=torch.long)
    bounds = None
    for _ in range(iters):
        c = c.sort(1).values
        new = torch.searchsorted(xs, (c[:, 1:] * 0.5 + c[:, :-1] * 0.5).contiguous(), right=True)
        if bounds is not None and torch.equal(new, bounds):
            break
        bounds = new
        hi = torch.cat([bounds, ends], 1)
        lo = torch.cat([ends.new_zeros(N, 1), bounds], 1)
        den = cw.gather(1, hi) - cw.gather(1, lo)
        num = cwx.gather(1, hi) - cwx.gather(1, lo)
        c = torch.where(den > 0, (num / den.clamp(min=1e-300)).float(), c)
    return c.sort(1).values


def codebook_grid(
    bits: int,
    *,
    p: float = 4.0,
    iters: int = 50,
    seed: int = 0,
    init: str | None = None,
    codebook_dtype: torch.dtype | None = torch.float16,
) -> GridFn:
    """Grid hook for ``gptq_quantize``: a loss-error-weighted k-means codebook per row."""
    init = init or ("kmeans++" if bits >= 4 else "linspace")

    def fit(W: Tensor, d: Tensor) -> CodebookGrid:
        cb = weighted_kmeans_1d(W, loss_error_weights(d, p), 1 << bits, init=init, iters=iters, seed=seed)
        if codebook_dtype is not None:  # round to storage precision so that packing is exact
            cb = cb.to(codebook_dtype).float().sort(1).values
        return CodebookGrid(cb)

    return fit


def leanquant_quantize(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    nonuniform: bool = False,
    p: float = 4.0,
    act_order: bool = True,
    block_size: int = 128,
    percdamp: float = 0.01,
    seed: int = 0,
    grid_steps: int = 20,
    scale_dtype: torch.dtype | None = torch.float16,
    name: str = "",
    cuda_graph: bool | None = None,
    fused: bool | None = None,
) -> QuantizedWeight:
    """LeanQuant of ``W [N, K]``: GPTQ (act-order by default, as recommended) on a loss-error-aware grid.

    ``nonuniform`` uses per-row k-means codebooks (``spec`` must be per-channel; ``symmetric`` and
    ``clip_ratio`` do not apply); otherwise the affine grid of ``spec``, searched over ``grid_steps``
    shrink factors per end of the range. ``cuda_graph`` and ``fused`` as in ``gptq_quantize``.
    """
    if nonuniform:
        if spec.granularity is not Granularity.CHANNEL:
            raise RecipeError(
                f"layer {name!r}: non-uniform LeanQuant uses one codebook per row; granularity must be "
                f"'channel', got {spec.granularity.value!r}"
            )
        fit = codebook_grid(spec.bits, p=p, seed=seed, codebook_dtype=scale_dtype)
    else:
        fit = affine_grid(spec, p=p, steps=grid_steps, scale_dtype=scale_dtype)
    return gptq_quantize(
        W, H, spec, block_size=block_size, percdamp=percdamp, act_order=act_order, grid=fit,
        scale_dtype=scale_dtype, name=name, cuda_graph=cuda_graph, fused=fused,
    )
