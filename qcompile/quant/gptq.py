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

import contextlib
import contextvars
import os
from collections import OrderedDict
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


_TILE = 256  # columns per tile of the CPU Hessian's lower block triangle


def _layer(name: str) -> str:
    return f"layer {name!r}" if name else "layer (unnamed)"


class HessianAccumulator:
    """Streams ``H = 2/n Σ_t x_t x_tᵀ`` over calibration batches (n counts rows, i.e. tokens).

    The sum is kept unscaled and divided once at the end. The overall scale of H does not change
    GPTQ's result (damping is relative to mean(diag H)); only its shape does. On the CPU, widths of two
    tiles or more sum only the lower block triangle (tiles of ``_TILE`` columns: ``H[j:, j:j+t] += X[:, j:]ᵀ
    X[:, j:j+t]``, about 0.6 of the products) and mirror it at the end; every entry is the same dot product
    over the same rows as the full product's (equal bit for bit on the 2-core EPYC the CPU figures come from).
    """

    def __init__(self, in_features: int, *, name: str = "", dtype: torch.dtype = torch.float32, device=None):
        self.name = name
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._n = 0
        self._lower = False  # whether only the lower block triangle of ``_sum`` is summed

    @property
    def n_samples(self) -> int:
        return self._n

    def add(self, x: Tensor) -> None:
        """Accumulate inputs ``x [..., K]`` of the layer."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"{_layer(self.name)}: calibration input has {x.shape[-1]} features, expected {self.in_features}"
            )
        rows = x.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=self._sum.dtype)
        # one reduction instead of isfinite's passes: a NaN/inf makes the sum NaN/inf; a finite sum past the
        # dtype's range needs inputs whose Σ x² overflows too, which H could not hold either
        if not bool(torch.isfinite(rows.sum())):
            raise CalibrationError(
                f"{_layer(self.name)}: calibration input contains NaN/inf (or values too large for Σ x²); check "
                "the model in float32 or the calibration data before quantizing"
            )
        if self._sum.is_cuda or self.in_features < 2 * _TILE:
            self._sum.addmm_(rows.T, rows)
        else:  # Σ x xᵀ is symmetric: on the CPU only its lower block triangle is summed (hessian() mirrors it)
            for j in range(0, self.in_features, _TILE):
                self._sum[j:, j : j + _TILE].addmm_(rows[:, j:].T, rows[:, j : j + _TILE])
            self._lower = True
        self._n += rows.shape[0]

    def hessian(self) -> Tensor:
        if self._n == 0:
            raise CalibrationError(f"{_layer(self.name)}: no calibration inputs were seen")
        s = self._sum
        if self._lower:
            low = s.tril()
            s = low + low.tril(-1).T
        return s * (2.0 / self._n)


class Grid(Protocol):
    """A quantization grid fixed for a whole weight; rounds one column at a time.

    ``block(cols)`` gathers what rounding the original columns ``cols`` needs into tensors (``[N, len(cols)]``
    or per row), and the static ``round_in(col, params, i, spec)`` rounds column ``i`` of such a block from
    those tensors alone: the column loop then reads nothing else, so it can be captured as a CUDA graph.
    """

    def round(self, col: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Codes (uint8 ``[N]``) and dequantized values (float ``[N]``) of column ``col`` = original column ``k``."""
        ...

    def block(self, cols: Tensor) -> tuple[Tensor, ...]: ...

    @staticmethod
    def round_in(col: Tensor, params: tuple[Tensor, ...], i: int, spec) -> tuple[Tensor, Tensor]: ...


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
        return self.round_in(col, (self.scales[:, gi : gi + 1], self.zeros[:, gi : gi + 1]), 0, self.spec)

    def block(self, cols: Tensor) -> tuple[Tensor, ...]:
        """Per-column params ``(s, z)`` ``[N, len(cols)]`` of original columns ``cols``: a block's grid."""
        gi = torch.div(cols, self.group_size, rounding_mode="floor")
        return self.scales[:, gi], self.zeros[:, gi]

    @staticmethod
    def round_in(col: Tensor, params: tuple[Tensor, ...], i: int, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """Codes and values of ``col`` on column ``i`` of a block's params (one column = one group)."""
        s, z = params[0][:, i : i + 1], params[1][:, i : i + 1]
        codes = quantize(col.unsqueeze(1), s, z, spec)
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
        return self.round_in(col, self.block(None), 0, None)

    def block(self, cols: Tensor | None) -> tuple[Tensor, ...]:
        return self.codebook, self._mids

    @staticmethod
    def round_in(col: Tensor, params: tuple[Tensor, ...], i: int, spec: QuantSpec | None) -> tuple[Tensor, Tensor]:
        codebook, mids = params
        idx = torch.searchsorted(mids, col.unsqueeze(1).contiguous())
        return idx.squeeze(1).to(torch.uint8), codebook.gather(1, idx).squeeze(1)


def _channel(spec: QuantSpec) -> QuantSpec:
    return replace(spec, granularity=Granularity.CHANNEL, group_size=None)


_FACTORS = ("inverse", "reversed")


def _factor_method(H: Tensor, method: str | None) -> str:
    """``method``, else ``QCOMPILE_GPTQ_FACTOR``, else ``reversed`` on CUDA and ``inverse`` on the CPU."""
    method = method or os.environ.get("QCOMPILE_GPTQ_FACTOR") or ("reversed" if H.is_cuda else "inverse")
    if method not in _FACTORS:
        raise RecipeError(f"GPTQ's inverse Cholesky factor is computed by one of {_FACTORS}, not {method!r}")
    return method


def damped_inverse_cholesky(H: Tensor, percdamp: float = 0.01, name: str = "", method: str | None = None) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H_d⁻¹``, ``H_d = H + percdamp·mean(diag H)·I`` (``H_d⁻¹ = Uᵀ U``).

    Two ways to the same (unique, positive-diagonal) factor:

    * ``inverse`` (the reference's): ``L = chol(H_d)``, ``H_d⁻¹ = (L Lᵀ)⁻¹`` formed (``cholesky_inverse``), then
      ``U = chol(H_d⁻¹)`` (upper): two Cholesky factorizations and an inverse;
    * ``reversed``: with ``J`` the order reversal, ``J·H_d·J = L_r L_rᵀ``, so ``H_d⁻¹ = (J·L_r⁻¹·J)ᵀ (J·L_r⁻¹·J)``
      and ``U = J·L_r⁻¹·J`` (upper, as ``L_r⁻¹`` is lower): one Cholesky and one triangular inverse, ``H_d⁻¹``
      never formed (70B's 28,672-wide down-projection Hessian on an H200: about a quarter of the time).

    ``method`` (or ``QCOMPILE_GPTQ_FACTOR``) picks one; by default ``reversed`` on CUDA, ``inverse`` on the CPU
    (milliseconds at CPU widths, and every CPU result stays as it was). cuBLAS runs in IEEE float32 within (TF32
    off, whatever the caller allows): TF32's 10-bit mantissa in the triangular solve moved U by 2e-4. Under
    ``factor_shared_by(ranks)`` the reversed factor's solves are shared among the ranks.
    """
    method = _factor_method(H, method)
    with _ieee_float32(H):
        # reversed: J·H·J (the diagonal stays on the diagonal, reversed); inverse: H itself
        Hd = H.flip(0, 1) if method == "reversed" else H.clone()
        Hd.diagonal().add_(percdamp * Hd.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if method == "reversed":
            if int(info) == 0:
                U = _reversed_lower_inverse(L, ranks=_SHARE.get())
            minor = f"trailing minor of order {int(info)}"
        else:
            if int(info) == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            minor = f"leading minor {int(info)}"
    if int(info) != 0:
        raise CalibrationError(
            f"{_layer(name)}: Hessian is not positive definite after damping {percdamp} ({minor} fails); raise "
            "percdamp, use more calibration data, or check the inputs"
        )
    return U


_SOLVE_BLOCK = 2048  # columns of L⁻¹ per triangular solve
_SHARE: contextvars.ContextVar = contextvars.ContextVar("gptq_factor_share", default=None)


@contextlib.contextmanager
def factor_shared_by(ranks):
    """Within: the ``reversed`` factor's triangular solves dealt out among ``ranks`` (``passes.distributed.Ranks``:
    ``deal``, ``checkpoint``, ``all_reduce_``) and summed, so each rank solves about 1/world of them and every
    rank gets the same factor, equal bit for bit to one process's (each column block is the same solve on the same
    L, and the sum adds zeros to it). Every rank must then compute each factor with the same H, in the same order
    (the ranks of a stage dealt its rows, all of them non-empty). ``None`` or one rank: nothing shared."""
    token = _SHARE.set(ranks if ranks is not None and ranks.world > 1 else None)
    try:
        yield
    finally:
        _SHARE.reset(token)


def _reversed_lower_inverse(L: Tensor, block: int | None = None, ranks=None) -> Tensor:
    """``J·L⁻¹·J`` of a lower-triangular ``L``, by column blocks of ``X = L⁻¹``: the columns ``[c0, c1)`` of X are
    zero above row ``c0`` and solve ``L[c0:, c0:]·X[c0:, c0:c1] = I[c0:, c0:c1]``, so the solves cost
    ``Σ (n − c0)²·b ≈ n³/3`` instead of ``n³`` for ``L·X = I`` in one; each block lands flipped in its place.
    With ``ranks`` the blocks are dealt out by that cost and the disjoint results summed (``factor_shared_by``)."""
    n, block = L.shape[0], block or _SOLVE_BLOCK
    U = torch.zeros(L.shape, dtype=L.dtype, device=L.device)  # contiguous (L may be column-major on CUDA)
    starts = list(range(0, n, block))
    owners = ranks.deal([float((n - c0) ** 2 * (min(c0 + block, n) - c0)) for c0 in starts]) if ranks else None
    if ranks:  # a rank that failed before this collective stops every rank here (see Ranks.checkpoint)
        ranks.checkpoint("computing GPTQ's inverse Cholesky factor")
    for c0, owner in zip(starts, owners or [None] * len(starts)):
        if owners and owner != ranks.rank:
            continue
        c1 = min(c0 + block, n)
        rhs = torch.zeros(n - c0, c1 - c0, dtype=L.dtype, device=L.device)
        rhs.diagonal().fill_(1)
        U[: n - c0, n - c1 : n - c0] = torch.linalg.solve_triangular(L[c0:, c0:], rhs, upper=False).flip(0, 1)
    if ranks:
        ranks.all_reduce_(U)
    return U


@contextlib.contextmanager
def _ieee_float32(t: Tensor):
    """cuBLAS float32 products without TF32 within (GPTQ's reference turns TF32 off for the whole run too)."""
    if not t.is_cuda:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def block_columns(round_in, spec, W1: Tensor, U1: Tensor, params: tuple[Tensor, ...]):
    """GPTQ's inner loop over one block's columns, in place on ``W1 [N, B]`` (the block's current weights).

    Column ``i``: ``q = round(w_i)``, ``e = (w_i − q) / U_ii``, ``W1[:, j] −= e · U_ij`` for ``j ≥ i``; the loop is
    sequential in columns and independent per row. Returns codes ``[N, B]``, values ``[N, B]`` and the
    scaled errors ``E [N, B]`` that update the columns after the block (``W[:, i2:] −= E · U[block, i2:]``).
    """
    codes = torch.empty(W1.shape, dtype=torch.uint8, device=W1.device)
    Q1 = torch.empty_like(W1)
    err1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        w = W1[:, i]
        c, q = round_in(w, params, i, spec)
        codes[:, i], Q1[:, i] = c, q
        err = (w - q) / U1[i, i]
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
        err1[:, i] = err
    return codes, Q1, err1


def _use_fused(W: Tensor, fused: bool | None, fitted) -> bool:
    """Whether the column loop runs as one Triton kernel per block (``quant.gptq_fused``): by default on CUDA
    for affine grids (``QCOMPILE_GPTQ_FUSED=0`` turns it off); ``fused=True`` off CUDA needs Triton's
    interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    if fused is None:
        return W.is_cuda and isinstance(fitted, AffineGrid) and os.environ.get("QCOMPILE_GPTQ_FUSED", "1") != "0"
    if fused and not isinstance(fitted, AffineGrid):
        raise RecipeError("GPTQ's fused column loop rounds on affine grids only; a codebook grid loops in torch")
    return fused


def _use_graphs(W: Tensor, cuda_graph: bool | None) -> bool:
    if cuda_graph is None:
        cuda_graph = W.is_cuda and os.environ.get("QCOMPILE_GPTQ_CUDA_GRAPH", "1") != "0"
    if cuda_graph and not W.is_cuda:
        raise RecipeError("GPTQ's CUDA-graph column loop needs the weight on a CUDA device")
    return cuda_graph


class _CapturedBlock:
    """``block_columns`` captured once per (grid kind, spec, shapes, device) as a CUDA graph over static
    buffers; a call copies the block in, replays the graph and hands back the static outputs (valid until
    the next call on the same shapes)."""

    def __init__(self, kind, spec, W1: Tensor, U1: Tensor, params: tuple[Tensor, ...]):
        self.W1, self.U1 = W1.clone(), U1.clone()
        self.params = tuple(p.clone() for p in params)
        side = torch.cuda.Stream(device=W1.device)
        side.wait_stream(torch.cuda.current_stream(W1.device))
        with torch.cuda.stream(side):  # warm-up off the capture (allocator, lazy kernel loading)
            block_columns(kind.round_in, spec, self.W1.clone(), self.U1, self.params)
        torch.cuda.current_stream(W1.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = block_columns(kind.round_in, spec, self.W1, self.U1, self.params)

    def __call__(self, W1: Tensor, U1: Tensor, params: tuple[Tensor, ...]):
        self.W1.copy_(W1)
        self.U1.copy_(U1)
        for mine, p in zip(self.params, params):
            mine.copy_(p)
        self.graph.replay()
        return self.out


_CAPTURED: OrderedDict = OrderedDict()
_CAPTURED_MAX = 16  # shapes seen in one model: a few per block kind, and the partial last blocks


def _graphed_block(kind, spec, W1: Tensor, U1: Tensor, params: tuple[Tensor, ...]):
    key = (kind, spec, tuple(W1.shape), W1.dtype, W1.device, tuple((tuple(p.shape), p.dtype) for p in params))
    step = _CAPTURED.get(key)
    if step is None:
        step = _CAPTURED[key] = _CapturedBlock(kind, spec, W1, U1, params)
        while len(_CAPTURED) > _CAPTURED_MAX:
            _CAPTURED.popitem(last=False)
    _CAPTURED.move_to_end(key)
    return step(W1, U1, params)


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
    cuda_graph: bool | None = None,
    fused: bool | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize ``W [N, K]`` with Hessian ``H [K, K]``; returns codes, grid and dequantized W.

    ``mse`` picks params by QuaRot's clip search instead of min/max. Scales are rounded through
    ``scale_dtype`` so that ``.pack()`` reproduces ``.weight`` exactly. ``cuda_graph`` (default: on for CUDA
    weights) replays each block's column loop as a captured CUDA graph: the same kernels on the same
    values, so the same result, without a launch per op per column. ``fused`` (default: on for CUDA weights on
    an affine grid) runs each block's column loop as one Triton kernel over tiles of rows instead
    (``quant.gptq_fused``: the same operations per element; its time scales with the rows).
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

    with _one_thread_on_cpu(W), _ieee_float32(W):
        return _gptq(W, H, spec, g, grouped, block_size, percdamp, act_order, static_groups, grid, mse, scale_dtype,
                     name, cuda_graph, fused)


@contextlib.contextmanager
def _one_thread_on_cpu(W: Tensor):
    """GPTQ of a CPU weight on one intra-op thread. Its column loop is thousands of small ops, for which OpenMP's
    fork and join per op cost more than a second thread gains, and on a loaded machine every join waits for a
    descheduled partner (a 3072 × 576 weight: 4.0–7.3 s on two threads beside other jobs, 0.9–1.2 s on one).
    Elementwise ops and row reductions give the same bits on any thread count; LAPACK's Cholesky factors do not
    (its blocking follows the threads), so U may differ from a two-thread run in the last bits."""
    if W.is_cuda:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gptq(W, H, spec, g, grouped, block_size, percdamp, act_order, static_groups, grid, mse, scale_dtype, name,
          cuda_graph, fused) -> QuantizedWeight:
    """``gptq_quantize``'s work after its checks."""
    N, K = W.shape
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64 if H.dtype == torch.float64 else torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K, device=W.device)
    U = damped_inverse_cholesky(H[perm][:, perm] if act_order else H, percdamp, name).to(torch.float32)
    del H
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

    W = W[:, perm]  # the loop runs in quantization order; perm maps position → original column
    starts = set(range(0, K, block_size)) | (set(range(0, K, g)) if dynamic else set())
    bounds = sorted(starts) + [K]
    fuse = _use_fused(W, fused, fitted)
    graphed = not fuse and _use_graphs(W, cuda_graph)
    if fuse:
        from qcompile.quant.gptq_fused import fused_block_columns
    Q = torch.zeros_like(W)
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if dynamic and i1 % g == 0:  # group start: params from the current (updated) weights
            s, z = params(W[:, i1 : i1 + g], _channel(spec))
            fitted.scales[:, i1 // g], fitted.zeros[:, i1 // g] = s[:, 0], z[:, 0]
        args = (W[:, i1:i2], U[i1:i2, i1:i2], fitted.block(perm[i1:i2]))
        if fuse:
            c1, q1, err1 = fused_block_columns(*args, spec.qmax)
        elif graphed:
            c1, q1, err1 = _graphed_block(type(fitted), spec, *args)
        else:
            c1, q1, err1 = block_columns(type(fitted).round_in, spec, args[0].clone(), *args[1:])
        codes[:, i1:i2], Q[:, i1:i2] = c1, q1
        W[:, i2:].addmm_(err1, U[i1:i2, i2:], alpha=-1.0)

    Q, codes = Q[:, invperm], codes[:, invperm]
    if isinstance(fitted, CodebookGrid):
        return QuantizedWeight(Q, codes, spec, codebook=fitted.codebook)
    return QuantizedWeight(Q, codes, spec, scales=getattr(fitted, "scales", None), zeros=getattr(fitted, "zeros", None))
