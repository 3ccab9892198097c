"""DuQuant's rotation and permutation transforms (arXiv 2406.01721), IR-free.

For activations X [tokens, C] the transform is T = R₁·P·R₂ (orthogonal: a product of block-diagonal
rotations and a permutation), X ↦ X·T, and the reading weight W ↦ W·T keeps X·Wᵀ exact.

- **Rotation basis** (``step_basis``): R₀ is the Householder reflection that maps e₀ to the uniform vector
  u = 1/√b, so its first row is uniform; the basis is diag(1, Q')·R₀ with Q' a fresh random orthogonal of
  size b−1 (its first row is still u). The step for outlier channel d is S_d = P₀d·basis·P₀d (P₀d swaps
  axes 0 and d): row d of S_d is uniform, so channel d is spread evenly over the block, the rest mixed.
- **Greedy** (``greedy_rotation``): the channels are cut into blocks of b (a last block of C mod b gets its
  own, smaller rotation); X is viewed as (tokens·blocks, b) and one b×b matrix, shared by all blocks, is
  grown step by step: find the largest |value| of X·R, take its channel d (``index="channel"``, the paper;
  ``index="row"`` reproduces the official code, which takes the reshaped row index modulo b), R ← R·S_d,
  record the peak max|X·R|. After N steps the prefix with the smallest peak is kept (0 steps: identity).
- **Zigzag permutation** (``zigzag_permutation``): channels sorted by max|X| descending are dealt to the
  K blocks in the order 0…K−1, K−1…0, 0…, so each block gets a balanced share of the outliers.
- ``duquant_transform``: R₁ (greedy), P (zigzag on X·R₁), R₂ (greedy on X·R₁·P): the official default
  of one permutation between two rotations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qcompile.quant.hadamard import random_orthogonal_matrix


def uniform_first_row_reflection(b: int) -> torch.Tensor:
    """The symmetric orthogonal Householder H with H·e₀ = u = (1/√b, …): its first row is uniform."""
    u = torch.full((b,), b ** -0.5, dtype=torch.float64)
    v = torch.zeros(b, dtype=torch.float64)
    v[0] = 1.0
    v = v - u
    n = v.dot(v)
    if n < 1e-30:  # b = 1
        return torch.eye(b, dtype=torch.float64)
    return torch.eye(b, dtype=torch.float64) - 2.0 * torch.outer(v, v) / n


def step_basis(b: int, seed: int) -> torch.Tensor:
    """diag(1, Q')·R₀: first row uniform, the remaining rows a random orthogonal mix."""
    r0 = uniform_first_row_reflection(b)
    if b <= 2:
        return r0
    q = torch.block_diag(torch.ones(1, 1, dtype=torch.float64), random_orthogonal_matrix(b - 1, seed))
    return q @ r0


def step_bases(b: int, seeds: list[int]) -> torch.Tensor:
    """``step_basis(b, seed)`` for every seed, stacked [n, b, b]: one batched QR instead of one per step (each
    matrix is the same LAPACK factorization of the same Gaussian, so the values are those of ``step_basis``)."""
    r0 = uniform_first_row_reflection(b)
    if b <= 2 or not seeds:
        return r0.expand(len(seeds), b, b).clone()
    gauss = torch.stack([torch.randn(b - 1, b - 1, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in seeds])
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    out = torch.zeros(len(seeds), b, b, dtype=torch.float64)
    out[:, 0, 0] = 1.0
    out[:, 1:, 1:] = q
    return out @ r0


def step_for_channel(basis: torch.Tensor, d: int) -> torch.Tensor:
    """S_d = P₀d·basis·P₀d: row d uniform."""
    s = basis.clone()
    if d:
        s[[0, d]] = s[[d, 0]]
        s[:, [0, d]] = s[:, [d, 0]]
    return s


@functools.lru_cache(maxsize=8)
def greedy_bases(b: int, steps: int, seed: int) -> torch.Tensor:
    """The ``steps`` random bases of a greedy run [steps, b, b]: they do not depend on the data, so the seeds
    are drawn in order and factored at once, and kept for the next run with the same seed (the q and gate
    sites of a layer share one, as do its o and down sites). Read-only."""
    g = torch.Generator().manual_seed(seed)
    return step_bases(b, [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for _ in range(steps)])


@dataclass
class GreedyResult:
    rotation: torch.Tensor  # b × b, float64
    steps: int  # the kept prefix length
    peaks: list  # peak max|X·R| after 0, 1, …, N steps


def _native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), where a bf16 product runs about
    three times faster than a float32 one; elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_BF16 = _native_bf16()


def scan_precision(device: torch.device) -> tuple[torch.dtype, float, float]:
    """(dtype of the scan's product, unit roundoff of its operands, of its output) on ``device``. A CPU with
    bf16 in hardware: bf16 operands, products summed in float32 (torch's CPU bf16 GEMM), rounded to bf16.
    Elsewhere float32, whose operands may be read as TF32 (u = 2⁻¹⁰, truncated or rounded alike) unless torch's
    float32 matmul precision is "highest", and as bf16 when it is "medium"."""
    if device.type == "cpu" and _BF16:
        return torch.bfloat16, 2.0 ** -8, 2.0 ** -8
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return torch.float32, 2.0 ** -8, 0.0
    if precision == "high":
        return torch.float32, 2.0 ** -10, 0.0
    return torch.float32, 2.0 ** -24, 0.0


class _PeakFinder:
    """max|X·R| and its first flat position in X·R, exactly as ``(X @ R).abs()`` in float64 gives them, at the
    cost of a low-precision product (``scan_precision``) over the rows and a float64 one over a few rows.

    Two bounds cut the work. Rotations keep row norms, so no entry of row t of X·R exceeds ‖x_t‖: the rows are
    sorted by decreasing norm once, the first ``head`` rows are scanned, then only the further rows whose norm
    reaches the peak found so far. And the scan is inexact by at most ``δ_t = c·‖x_t‖``: operands rounded to
    unit roundoff u (‖x̃ − x‖ ≤ u‖x‖, each column of R of norm 1, so 2u), a b-term float32 dot product
    ((b+2)·2⁻²⁴, its products' roundings included), the output rounded to v (v, every entry being ≤ ‖x_t‖):
    ``c = 1.1·(2u + v + (b+2)·2⁻²⁴)`` (10 % for the second-order terms). So ``L = max_t (rowmax_t − δ_t)`` is a
    lower bound on the peak and only the rows with ``rowmax_t + δ_t ≥ L`` can hold it. Those few rows are
    multiplied again in float64, and the peak and its position (ties to the smallest flat index, as ``argmax``)
    come from them.
    """

    def __init__(self, x: torch.Tensor, head: int = 256):
        norms = x.norm(dim=1)
        self.order = torch.argsort(norms, descending=True, stable=True)
        self.rows = x[self.order]
        self.dtype, unit, out = scan_precision(x.device)
        self.low = self.rows.to(self.dtype)
        sorted_norms = norms[self.order]
        self.neg_norms = (-sorted_norms * (1 + 1e-9)).contiguous()  # ascending, for searchsorted
        self.b = x.shape[1]
        c = 1.1 * (2 * unit + out + (self.b + 2) * 2.0 ** -24)
        self.slack = c * sorted_norms.float() + 1e-30 * self.b  # (the last term: subnormals flushed to zero)
        self.head = head

    def _bounds(self, start: int, stop: int, r_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.mm(self.low[start:stop], r_low)
        if self.dtype == torch.float32:
            top = torch.maximum(y.amax(1), y.amin(1).neg_())  # two passes, ten times faster than aminmax here
        else:
            top = y.abs_().amax(1).float()
        d = self.slack[start:stop]
        return top - d, top + d

    def __call__(self, r: torch.Tensor) -> tuple[float, int]:
        n = self.rows.shape[0]
        r_low = r.to(self.dtype)
        lo, hi = self._bounds(0, min(self.head, n), r_low)
        low = float(lo.max())
        # rows whose norm (with a rounding margin) reaches the peak's lower bound: the only ones that can hold it
        stop = int(torch.searchsorted(self.neg_norms, torch.tensor([-low], dtype=self.neg_norms.dtype,
                                                                   device=self.neg_norms.device), right=True))
        if stop > self.head:
            lo2, hi2 = self._bounds(self.head, stop, r_low)
            low = max(low, float(lo2.max()))
            hi = torch.cat([hi, hi2])
        cand = torch.nonzero(hi >= low).squeeze(1)
        mag = (self.rows[cand] @ r).abs()
        top = mag.max()
        rows, cols = torch.nonzero(mag == top, as_tuple=True)
        return float(top), int((self.order[cand[rows]] * self.b + cols).min())


def greedy_rotation(x: torch.Tensor, steps: int = 256, seed: int = 0, index: str = "channel") -> GreedyResult:
    """The greedy b×b rotation for rows ``x`` [n, b] (all blocks' rows stacked).

    Each step needs only the peak of X·R and where it is (``_PeakFinder``), so X·R is evaluated from the
    accumulated R for the rows that can hold the peak, rather than carried for every row.
    """
    if index not in ("channel", "row"):
        raise ValueError(f"index must be 'channel' or 'row', got {index!r}")
    x = x.double()
    b = x.shape[-1]
    r = torch.eye(b, dtype=torch.float64, device=x.device)
    best, best_r = None, r
    peaks = []
    n = steps if b > 1 else 0
    bases = greedy_bases(b, n, seed).to(x.device)
    find = _PeakFinder(x) if x.numel() else None
    for i in range(n + 1):
        peak, flat = find(r) if find is not None else (0.0, 0)
        peaks.append(peak)
        if best is None or peaks[-1] < best[0]:
            best, best_r = (peaks[-1], i), (r.clone() if i else r)
        if i == n:
            break
        d = flat % b if index == "channel" else (flat // b) % b
        r = r @ step_for_channel(bases[i], d)
    return GreedyResult(best_r, best[1], peaks)


def blocks_of(c: int, b: int) -> list[tuple[int, int]]:
    """[start, stop) of each block: full blocks of b, then a partial last one."""
    b = min(b, c)
    out = [(s, min(s + b, c)) for s in range(0, c, b)]
    return out


def block_rotation(x: torch.Tensor, block: int, steps: int = 256, seed: int = 0,
                   index: str = "channel") -> tuple[torch.Tensor, list[int]]:
    """A C×C block-diagonal rotation: one greedy b×b matrix for all full blocks, another for a partial last
    block (if C is not a multiple of b); returns (matrix, kept steps per distinct block matrix)."""
    c = x.shape[-1]
    x = x.reshape(-1, c).double()
    spans = blocks_of(c, block)
    b = spans[0][1] - spans[0][0]
    full = [s for s in spans if s[1] - s[0] == b]
    rows = torch.cat([x[:, s:e] for s, e in full])
    main = greedy_rotation(rows, steps, seed, index)
    mats, kept = [main.rotation] * len(full), [main.steps]
    if len(full) < len(spans):
        s, e = spans[-1]
        rest = greedy_rotation(x[:, s:e], steps, seed + 1, index)
        mats.append(rest.rotation)
        kept.append(rest.steps)
    return torch.block_diag(*mats), kept


def block_matmul(x: torch.Tensor, m: torch.Tensor, block: int) -> torch.Tensor:
    """x·M for M block-diagonal in the blocks of ``blocks_of(C, block)``, read off M's diagonal blocks: the
    product of the dense matrix without its zero terms (the same sums, in another order), C·b per row instead of
    C². The full blocks multiply as one batched product."""
    c = m.shape[0]
    spans = blocks_of(c, block)
    b = spans[0][1] - spans[0][0]
    full = sum(1 for s, e in spans if e - s == b) * b
    lead = x.shape[:-1]
    x = x.reshape(-1, c)
    out = torch.empty(x.shape[0], c, dtype=torch.promote_types(x.dtype, m.dtype), device=x.device)
    blocks = torch.stack([m[s:e, s:e] for s, e in spans if e - s == b])  # [K, b, b]
    out[:, :full] = (x[:, :full].reshape(-1, full // b, b).transpose(0, 1) @ blocks).transpose(0, 1).reshape(-1, full)
    if full < c:
        out[:, full:] = x[:, full:] @ m[full:, full:]
    return out.reshape(*lead, c)


def zigzag_permutation(absmax: torch.Tensor, block: int) -> torch.Tensor:
    """perm with X[:, perm] putting the zigzag-dealt channels of block k at positions [k·b, (k+1)·b).

    Only full blocks take part when C is not a multiple of b; the partial last block keeps its channels.
    """
    c = absmax.numel()
    spans = blocks_of(c, block)
    b = spans[0][1] - spans[0][0]
    k = sum(1 for s, e in spans if e - s == b)
    n = k * b
    order = torch.argsort(absmax[:n], descending=True, stable=True)
    buckets: list[list[int]] = [[] for _ in range(k)]
    for i, ch in enumerate(order.tolist()):
        lap, pos = divmod(i, k)
        buckets[pos if lap % 2 == 0 else k - 1 - pos].append(ch)
    return torch.tensor([ch for bucket in buckets for ch in bucket] + list(range(n, c)), dtype=torch.long,
                        device=absmax.device)


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """Pm with X·Pm = X[:, perm]."""
    c = perm.numel()
    m = torch.zeros(c, c, dtype=torch.float64, device=perm.device)
    m[perm, torch.arange(c, device=perm.device)] = 1.0
    return m


@dataclass
class DuQuantTransform:
    r1: torch.Tensor  # C×C block-diagonal
    perm: torch.Tensor  # [C]
    r2: torch.Tensor  # C×C block-diagonal
    block: int
    steps: tuple  # kept greedy steps (first rotation, second rotation)

    def matrix(self) -> torch.Tensor:
        """T = R₁·P·R₂ (float64, orthogonal); R₁·P is R₁'s columns gathered (exactly the product), R₂ applied
        block by block (``block_matmul``)."""
        return block_matmul(self.r1[:, self.perm], self.r2, self.block)

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The b×b matrices of R₁ and R₂ that every full block shares (the online op's weights)."""
        b = min(self.block, self.perm.numel())
        return self.r1[:b, :b], self.r2[:b, :b]


def duquant_transform(x: torch.Tensor, block: int = 128, steps: int = 256, seed: int = 0, permute: bool = True,
                      index: str = "channel") -> DuQuantTransform:
    """R₁·P·R₂ for activation rows ``x`` [..., C]."""
    c = x.shape[-1]
    x = x.reshape(-1, c).double()
    r1, k1 = block_rotation(x, block, steps, seed, index)
    if not permute:
        eye = torch.eye(c, dtype=torch.float64, device=x.device)
        return DuQuantTransform(r1, torch.arange(c, device=x.device), eye, min(block, c), (tuple(k1), ()))
    xr = block_matmul(x, r1, block)
    perm = zigzag_permutation(xr.abs().amax(0), block)
    r2, k2 = block_rotation(xr[:, perm], block, steps, seed + 7919, index)
    return DuQuantTransform(r1, perm, r2, min(block, c), (tuple(k1), tuple(k2)))
