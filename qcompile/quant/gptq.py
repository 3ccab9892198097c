"""GPTQ (Frantar et al., 2022): quantize ``W [N, K]`` column by column against ``H = 2/n Σ x xᵀ``.

Minimising ``‖X Wᵀ − X Ŵᵀ‖²`` one input column at a time, the rounding error of column ``i`` is
spread over the not-yet-quantized columns through the upper Cholesky factor ``U`` of ``H⁻¹``
(``H⁻¹ = Uᵀ U``): ``e = (w_i − q_i) / U_ii``, ``W[:, j] −= e · U_ij`` for ``j > i``. Updates are lazy: a
block of ``block_size`` columns is updated within itself, the rest of W once per block (identical
algebra, fewer passes over W).

Faithful to the reference implementation (and QuaRot's use of it):

* dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero weight column (their input is always 0);
* damping ``percdamp · mean(diag H)`` on the diagonal; a Hessian that is still not positive definite
  is refused with ``CalibrationError`` naming the layer;
* ``act_order`` quantizes columns by decreasing ``H_ii`` and undoes the permutation at the end;
* per-channel params come from the un-updated W; group params from the *current* W at each group
  start, or all up front from the un-updated W with ``static_groups`` (required with ``act_order``
  because the canonical format has contiguous groups and no ``g_idx``).

One deliberate difference: block boundaries are also placed at every group start, so the params of a
group that starts mid-block see the block's pending updates (the reference reads stale columns there
when ``group_size < block_size``). With g = 128 = block size the two are identical.

``grid`` replaces how the grid is chosen (LeanQuant): it is called once, before the loop, with the
un-updated W (original column order) and ``d = diag U`` (mapped back to original order), and returns
a ``Grid`` whose ``round(column, k)`` gives codes and values for original column ``k``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from qcompile.errors import CalibrationError, RecipeError, ShapeError
from qcompile.quant.formats import (
    Granularity,
    QuantizedWeight,
    QuantSpec,
    compute_qparams,
    group_length,
    num_groups,
    quantize,
)
from qcompile.quant.rtn import mse_qparams

__all__ = [
    "HessianAccumulator",
    "Grid",
    "AffineGrid",
    "CodebookGrid",
    "GridFn",
    "damped_inverse_cholesky",
    "gptq_quantize",
]


def _layer(name: str) -> str:
    return f"layer {name!r}" if name else "layer (unnamed)"


class HessianAccumulator:
    """Streams ``H = 2/n Σ_t x_t x_tᵀ`` over calibration batches (n counts rows, i.e. tokens).

    The sum is kept unscaled and divided once at the end. The overall scale of H does not change
    GPTQ's result (damping is relative to mean(diag H)); only its shape does.
    """

    def __init__(self, in_features: int, *, name: str = "", dtype: torch.dtype = torch.float32, device=None):
        self.name = name
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._n = 0

    @property
    def n_samples(self) -> int:
        return self._n

    def add(self, x: Tensor) -> None:
        """Accumulate inputs ``x [..., K]`` of the layer."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"{_layer(self.name)}: calibration input has {x.shape[-1]} features, expected {self.in_features}"
            )
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(
                f"{_layer(self.name)}: calibration input contains NaN/inf; check the model in float32 "
                "or the calibration data before quantizing"
            )
        rows = x.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=self._sum.dtype)
        self._sum.addmm_(rows.T, rows)
        self._n += rows.shape[0]

    def hessian(self) -> Tensor:
        if self._n == 0:
            raise CalibrationError(f"{_layer(self.name)}: no calibration inputs were seen")
        return self._sum * (2.0 / self._n)


class Grid(Protocol):
    """A quantization grid fixed for a whole weight; rounds one column at a time."""

    def round(self, col: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Codes (uint8 ``[N]``) and dequantized values (float ``[N]``) of column ``col`` = original column ``k``."""
        ...


GridFn = Callable[[Tensor, Tensor], Grid]


@dataclass(frozen=True, eq=False)
class AffineGrid:
    """Uniform grid with per-row-group ``scales``/``zeros`` ``[N, n_groups]``; column k is in group k // g."""

    scales: Tensor
    zeros: Tensor
    spec: QuantSpec
    group_size: int

    def round(self, col: Tensor, k: int) -> tuple[Tensor, Tensor]:
        gi = k // self.group_size
        s, z = self.scales[:, gi : gi + 1], self.zeros[:, gi : gi + 1]
        codes = quantize(col.unsqueeze(1), s, z, self.spec)  # one column = one (partial) group
        return codes.squeeze(1), ((codes.float() - z) * s).squeeze(1)


@dataclass(frozen=True, eq=False)
class CodebookGrid:
    """Non-uniform grid: a per-row codebook ``[N, C]`` sorted ascending; rounds to the nearest entry."""

    codebook: Tensor
    _mids: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cb = self.codebook
        object.__setattr__(self, "_mids", ((cb[:, 1:] + cb[:, :-1]) * 0.5).contiguous())

    def round(self, col: Tensor, k: int) -> tuple[Tensor, Tensor]:
        idx = torch.searchsorted(self._mids, col.unsqueeze(1).contiguous())
        return idx.squeeze(1).to(torch.uint8), self.codebook.gather(1, idx).squeeze(1)


def _channel(spec: QuantSpec) -> QuantSpec:
    return replace(spec, granularity=Granularity.CHANNEL, group_size=None)


def damped_inverse_cholesky(H: Tensor, percdamp: float = 0.01, name: str = "") -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + percdamp·mean(diag H)·I)⁻¹`` (``H⁻¹ = Uᵀ U``)."""
    H = H.clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise CalibrationError(
            f"{_layer(name)}: Hessian is not positive definite after damping {percdamp} (leading minor "
            f"{int(info)} fails); raise percdamp, use more calibration data, or check the inputs"
        )
    return U


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    grid: GridFn | None = None,
    mse: bool = False,
    scale_dtype: torch.dtype | None = torch.float16,
    name: str = "",
) -> QuantizedWeight:
    """GPTQ-quantize ``W [N, K]`` with Hessian ``H [K, K]``; returns codes, grid and dequantized W.

    ``mse`` picks params by QuaRot's clip search instead of min/max. Scales are rounded through
    ``scale_dtype`` so that ``.pack()`` reproduces ``.weight`` exactly.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ShapeError(f"{_layer(name)}: GPTQ needs W [N, K] and H [K, K]; got {tuple(W.shape)}, {tuple(H.shape)}")
    if spec.granularity not in (Granularity.CHANNEL, Granularity.GROUP):
        raise RecipeError(
            f"{_layer(name)}: GPTQ quantizes weights per channel or group, not {spec.granularity.value!r}"
        )
    if block_size < 1 or percdamp < 0:
        raise RecipeError(f"{_layer(name)}: block_size must be ≥ 1 and percdamp ≥ 0 (got {block_size}, {percdamp})")
    if not bool(torch.isfinite(H).all()):
        raise CalibrationError(f"{_layer(name)}: Hessian contains NaN/inf")
    if not bool(torch.isfinite(W).all()):
        raise CalibrationError(f"{_layer(name)}: weight contains NaN/inf")
    N, K = W.shape
    g = group_length(spec, K)
    grouped = g < K
    if act_order and grouped and not static_groups and grid is None:
        raise RecipeError(
            f"{_layer(name)}: act_order with group_size={g} needs static_groups=True (the canonical "
            "format stores contiguous groups, so group params must not follow the permuted order)"
        )

    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64 if H.dtype == torch.float64 else torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K, device=W.device)
    U = damped_inverse_cholesky(H[perm][:, perm], percdamp, name).to(torch.float32)
    invperm = torch.argsort(perm)

    params = (lambda w, s: mse_qparams(w, s, scale_dtype=scale_dtype)) if mse else (
        lambda w, s: compute_qparams(w, s, scale_dtype)
    )
    dynamic = grid is None and grouped and not static_groups
    if grid is not None:
        fitted = grid(W.clone(), U.diagonal()[invperm].clone())
    elif dynamic:
        G = num_groups(K, g)
        fitted = AffineGrid(W.new_zeros(N, G), W.new_zeros(N, G), spec, g)
    else:
        fitted = AffineGrid(*params(W, spec), spec, g)

    W = W[:, perm]  # the loop runs in quantization order; cols maps position → original column
    starts = set(range(0, K, block_size)) | (set(range(0, K, g)) if dynamic else set())
    bounds = sorted(starts) + [K]
    cols = perm.tolist()
    Q = torch.zeros_like(W)
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if dynamic and i1 % g == 0:  # group start: params from the current (updated) weights
            s, z = params(W[:, i1 : i1 + g], _channel(spec))
            fitted.scales[:, i1 // g], fitted.zeros[:, i1 // g] = s[:, 0], z[:, 0]
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            c, q = fitted.round(w, cols[i1 + i])
            codes[:, i1 + i], Q[:, i1 + i] = c, q
            err = (w - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)

    Q, codes = Q[:, invperm], codes[:, invperm]
    if isinstance(fitted, CodebookGrid):
        return QuantizedWeight(Q, codes, spec, codebook=fitted.codebook)
    return QuantizedWeight(Q, codes, spec, scales=getattr(fitted, "scales", None), zeros=getattr(fitted, "zeros", None))
