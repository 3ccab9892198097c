"""Hadamard matrices of size n = m·2^k, built, not tabulated, and applied in O(n·(m + log n)).

Constructions (each checked by ``H @ H.T == n·I`` in the tests):
- Sylvester: H_{2n} = [[H, H], [H, -H]], for powers of two (applied as the fast Walsh-Hadamard transform).
- Paley I: for a prime power q ≡ 3 (mod 4), with the Jacobsthal matrix Q[a, b] = χ(a − b) (χ the
  quadratic character of GF(q)), H = I + [[0, 1ᵀ], [−1, Q]] has order q + 1.
- Paley II: for q ≡ 1 (mod 4), the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] gives
  H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]] of order 2(q + 1).
- Kronecker products: H_{m·2^k} = H_m ⊗ H_{2^k}.

Orders reached this way include 12, 20, 28, 36, 40, 44, 52, 60, 108 and 140 (with GF(p^e) arithmetic for
q = 25, 27, ...). 156 and 172 have no Paley or Kronecker construction (they need Williamson-type
matrices); ``has_hadamard`` says so and the rotation plan falls back to a block-diagonal Hadamard.

Convention: ``hadamard_transform(x) == x @ hadamard_matrix(n)`` with H_n = H_m ⊗ H_{2^k}, normalized by
1/√n so that it is orthogonal. Viewing x as an (m, 2^k) matrix X, x·(A ⊗ B) is Aᵀ·X·B: the fast
transform does X·B, a small m×m matmul does Aᵀ·(·).
"""

from __future__ import annotations

import functools
import math

import torch

from qcompile.errors import ShapeError


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e for a prime p, else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    return (p, e) if r == 1 else None


class _GaloisField:
    """GF(p^e): elements are ints 0..q−1 whose base-p digits are polynomial coefficients."""

    def __init__(self, p: int, e: int):
        self.p, self.e, self.q = p, e, p**e
        self.modulus = self._irreducible() if e > 1 else None

    def _digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.e)]

    def _number(self, digits: list[int]) -> int:
        return sum(d * self.p**i for i, d in enumerate(digits))

    def sub(self, a: int, b: int) -> int:
        return self._number([(x - y) % self.p for x, y in zip(self._digits(a), self._digits(b))])

    def _polymul(self, a: list[int], b: list[int], modulus: list[int]) -> list[int]:
        prod = [0] * (len(a) + len(b) - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                prod[i + j] = (prod[i + j] + x * y) % self.p
        # reduce by the monic modulus of degree e
        for deg in range(len(prod) - 1, self.e - 1, -1):
            c = prod[deg]
            if c:
                for i, m in enumerate(modulus):
                    prod[deg - self.e + i] = (prod[deg - self.e + i] - c * m) % self.p
        return (prod + [0] * self.e)[: self.e]

    def _irreducible(self) -> list[int]:
        """The first monic polynomial of degree e (coefficients low to high) with no root-free factor."""
        for tail in range(self.p**self.e):
            poly = [(tail // self.p**i) % self.p for i in range(self.e)] + [1]
            if not self._has_factor(poly):
                return poly
        raise AssertionError("no irreducible polynomial found")  # cannot happen for a prime p

    def _has_factor(self, poly: list[int]) -> bool:
        # a polynomial of degree e ≤ 3 is reducible iff it has a root; for larger e test all monic divisors
        for d in range(1, self.e // 2 + 1):
            for tail in range(self.p**d):
                div = [(tail // self.p**i) % self.p for i in range(d)] + [1]
                if self._divides(div, poly):
                    return True
        return False

    def _divides(self, div: list[int], poly: list[int]) -> bool:
        rem = list(poly)
        for deg in range(len(rem) - 1, len(div) - 2, -1):
            c = rem[deg]
            if c:
                for i, m in enumerate(div):
                    rem[deg - len(div) + 1 + i] = (rem[deg - len(div) + 1 + i] - c * m) % self.p
        return not any(rem[: len(div) - 1])

    def mul(self, a: int, b: int) -> int:
        if self.e == 1:
            return a * b % self.p
        return self._number(self._polymul(self._digits(a), self._digits(b), self.modulus))

    def quadratic_character(self) -> list[int]:
        squares = {self.mul(a, a) for a in range(1, self.q)}
        return [0] + [1 if a in squares else -1 for a in range(1, self.q)]


def _jacobsthal(q: int) -> torch.Tensor:
    field = _GaloisField(*_prime_power(q))
    chi = field.quadratic_character()
    return torch.tensor([[chi[field.sub(a, b)] for b in range(q)] for a in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, Q
    return torch.eye(q + 1, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, Q
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _unnormalized(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order m, or None when no construction here reaches m.

    Built and cached as real tensors even when first asked for while tracing (under a FakeTensorMode,
    e.g. inside torch.export): a cached fake tensor would poison every later real call.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _construct(m)


@functools.lru_cache(maxsize=None)
def _construct(m: int) -> torch.Tensor | None:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    q = m - 1
    pp = _prime_power(q)
    if pp and q % 4 == 3:
        return _paley1(q)
    q = m // 2 - 1
    pp = _prime_power(q)
    if pp and q % 4 == 1:
        return _paley2(q)
    half = _construct(m // 2)
    if half is not None:
        return torch.kron(_construct(2), half)
    return None


MAX_ORDER = 256  # larger m costs O(n·m) per transform and is never needed for speed


def has_order(m: int) -> bool:
    """Whether a Hadamard matrix of order m ≤ MAX_ORDER is constructible here."""
    return m <= MAX_ORDER and _unnormalized(m) is not None


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m·2^k, m the smallest constructible order, or None when n has none."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        m = n >> j
        if has_order(m):
            return m, 1 << j
    return None


def has_hadamard(n: int) -> bool:
    return hadamard_factors(n) is not None


def _require(n: int) -> tuple[int, int]:
    factors = hadamard_factors(n)
    if factors is None:
        raise ShapeError(
            f"no Hadamard matrix of size {n} is constructible (n = m·2^k needs a Paley/Sylvester order m); "
            "use a block-diagonal Hadamard or a random orthogonal rotation for this size"
        )
    return factors


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal H_n = (H_m ⊗ H_{2^k}) / √n, dense (for fusing into weights and for tests)."""
    m, p = _require(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < p:
        sylvester = torch.kron(_unnormalized(2), sylvester)
    return (torch.kron(_unnormalized(m), sylvester) / math.sqrt(n)).to(dtype)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform over the last dim (a power of two), O(n log n)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


DENSE_MAX = 768  # up to this order one matmul with H beats the O(n log n) butterflies on a CPU


@functools.lru_cache(maxsize=None)
def _dense(n: int) -> torch.Tensor:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # a real tensor even when first built while tracing, as _unnormalized
        return hadamard_matrix(n)


def hadamard_transform(x: torch.Tensor, block: int | None = None, transpose: bool = False) -> torch.Tensor:
    """x @ H_n over the last dim (n = block, applied block-diagonally, or the whole last dim).

    With a block b dividing n the transform is x @ diag(H_b, …, H_b), the fallback for sizes that
    have no Hadamard of their own. ``transpose`` applies Hᵀ = H⁻¹ instead (the backward of x ↦ x·H):
    the Sylvester factor is symmetric, so only the small factor changes, (A ⊗ B)ᵀ = Aᵀ ⊗ B.
    Orders up to ``DENSE_MAX`` multiply by the dense H; larger ones run the butterflies.
    """
    n = x.shape[-1]
    b = n if block is None else block
    if n % b:
        raise ShapeError(f"Hadamard block {b} does not divide the last dim {n}")
    m, p = _require(b)
    lead = x.shape[:-1]
    if b <= DENSE_MAX:
        h = _dense(b).to(dtype=x.dtype, device=x.device)
        return (x.reshape(*lead, n // b, b) @ (h.T if transpose else h)).reshape(*lead, n)
    y = _fwht(x.reshape(*lead, n // b, m, p))
    if m > 1:
        a = _unnormalized(m).to(dtype=x.dtype, device=x.device)
        y = torch.einsum("mi,...ip->...mp" if transpose else "im,...ip->...mp", a, y)
    return (y / math.sqrt(b)).reshape(*lead, n)


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1


def random_hadamard_matrix(n: int, seed: int, block: int | None = None) -> torch.Tensor:
    """QuaRot's randomized Hadamard diag(s)·H (block-diagonal H when ``block`` is given), float64."""
    b = n if block is None else block
    H = torch.block_diag(*[hadamard_matrix(b)] * (n // b)) if b != n else hadamard_matrix(n)
    return random_signs(n, seed)[:, None] * H


def random_orthogonal_matrix(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed), float64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def largest_hadamard_block(n: int, minimum: int = 64) -> int | None:
    """The largest b ≥ minimum dividing n that has a Hadamard, for a block-diagonal fallback."""
    for b in sorted((d for d in range(minimum, n + 1) if n % d == 0), reverse=True):
        if has_hadamard(b):
            return b
    return None
