"""Quantization formats: the one definition of every integer grid qcompile uses.

Algebra (everything else in ``quant/``, ``kernels/`` and the ONNX lowering derives from this):

* Codes are **unsigned** integers ``q ∈ [0, 2^b − 1]`` and dequantize as ``w = (q − z) · s``.
* **Symmetric**: ``z = 2^(b−1)`` (8 at int4) and ``s = clip · max|w| / (2^(b−1) − 1)``, so the
  codes ``q − z ∈ [−2^(b−1), 2^(b−1) − 1]`` cover ``[−max|w|, max|w|]`` with one spare negative level.
* **Asymmetric**: the range is widened to contain 0 (``lo = min(min w, 0)``, ``hi = max(max w, 0)``),
  ``s = clip · (hi − lo) / (2^b − 1)`` and ``z = round(−lo / s_unclipped)``. Containing 0 keeps ``z``
  inside the code range without clamping it, so every value in ``[lo, hi]`` is within ``s/2`` of the
  grid and 0 itself (zero padding, dead input columns) is exactly representable. This is GPTQ's
  convention.
* **Groups** run along the last axis (K, the input features of an ``nn.Linear`` weight ``[N, K]``):
  ``n_groups = ceil(K / g)``, the last group is *partial* when ``g`` does not divide K (K = 576,
  g = 128: four groups of 128 and one of 64). Per-channel (and per-token for activations) is one group
  of K; per-head is groups of ``head_dim`` (which must divide K); per-tensor is one scale in all.
  Scales and zeros have shape ``[..., n_groups]``; zeros are float tensors holding integers.

Canonical packed weight format (``PackedWeight``), for ``W [N, K]`` (nn.Linear's ``[out, in]``):

* ``bits ≤ 4``: ``packed uint8 [N, ceil(K/2)]``, ``packed[n, j] = q[n, 2j] | (q[n, 2j+1] << 4)``
  (low nibble = even k). An odd K is padded with code ``z`` of the row's last group, which
  dequantizes to exactly 0. ``5 ≤ bits ≤ 8``: one code per byte, ``packed uint8 [N, K]``.
* ``scales`` float16 ``[N, n_groups]`` (bfloat16 on request); ``zeros`` uint8 ``[N, n_groups]``, or
  ``None`` for symmetric weights (meaning ``z = 2^(b−1)``); ``group_size`` is an int (K for
  per-channel); the last group may be partial.

Backend layouts (Triton tiles, onnxruntime ``MatMulNBits``) are derived from this by one function each
in ``qcompile.kernels``; nothing else defines a layout.

Fake quantization passes gradients straight through (``x + (q(x) − x).detach()``) so that learned
rotations can train through it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum

import torch
from torch import Tensor

from qcompile.errors import RecipeError, ShapeError

__all__ = [
    "Granularity",
    "QuantSpec",
    "QuantizedWeight",
    "PackedWeight",
    "CodebookWeight",
    "group_length",
    "num_groups",
    "expand_groups",
    "group_reduce",
    "qparams_from_range",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_per_token",
    "fake_quantize_per_head",
    "pack_int4",
    "unpack_int4",
    "pack_codes",
    "unpack_codes",
    "sqnr_db",
    "straight_through",
]


class Granularity(str, Enum):
    """Which elements share one (scale, zero)."""

    CHANNEL = "channel"  # one group per output row of a weight: the whole K axis
    GROUP = "group"  # groups of ``group_size`` along K; the last one may be partial
    TOKEN = "token"  # activations: one group per token, over the last (feature) axis
    HEAD = "head"  # groups of ``group_size`` = head_dim along the last axis (KV cache)
    TENSOR = "tensor"  # a single scale for the whole tensor


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized: ``bits`` (2..8), symmetric or not, the grouping, a fixed clip."""

    bits: int
    symmetric: bool
    granularity: Granularity = Granularity.CHANNEL
    group_size: int | None = None
    clip_ratio: float = 1.0

    VERSION = 1  # serialization version of ``to_dict`` (a class constant, not a field)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise RecipeError(f"QuantSpec.bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        try:
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        except ValueError:
            choices = ", ".join(g.value for g in Granularity)
            raise RecipeError(
                f"QuantSpec.granularity must be one of {choices}; got {self.granularity!r}"
            ) from None
        needs_size = self.granularity in (Granularity.GROUP, Granularity.HEAD)
        gs = self.group_size
        if needs_size:
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise RecipeError(
                    f"QuantSpec.group_size must be a positive int for granularity "
                    f"{self.granularity.value!r}, got {gs!r}"
                )
        elif gs is not None:
            raise RecipeError(
                f"QuantSpec.group_size must be None for granularity {self.granularity.value!r} "
                f"(got {gs!r}); use granularity 'group' for grouped quantization"
            )
        clip = self.clip_ratio
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < clip <= 1.0:
            raise RecipeError(f"QuantSpec.clip_ratio must be in (0, 1], got {clip!r}")
        object.__setattr__(self, "clip_ratio", float(clip))

    @property
    def qmax(self) -> int:
        """Largest code, ``2^b − 1``."""
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The implicit zero point of symmetric codes, ``2^(b−1)``."""
        return 1 << (self.bits - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["granularity"] = self.granularity.value
        d["version"] = self.VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise RecipeError(f"QuantSpec version {version!r} is not supported (expected {cls.VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"QuantSpec: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Groups along the last axis


def group_length(spec: QuantSpec, k: int) -> int:
    """Columns per group for a last axis of length ``k`` (``k`` itself for channel/token/tensor)."""
    if spec.granularity is Granularity.HEAD and k % spec.group_size:
        raise ShapeError(f"per-head quantization needs head_dim={spec.group_size} to divide the last axis ({k})")
    if spec.granularity in (Granularity.GROUP, Granularity.HEAD):
        return min(spec.group_size, k)
    return k


def num_groups(k: int, g: int) -> int:
    """``ceil(k / g)``: the last group is partial when ``g`` does not divide ``k``."""
    return -(-k // g)


def expand_groups(p: Tensor, k: int, g: int) -> Tensor:
    """Per-group ``p [..., G]`` → per-column ``[..., k]`` (group of column j is ``j // g``)."""
    return p.repeat_interleave(g, dim=-1)[..., :k]


def _group_view(x: Tensor, g: int, fill: str) -> Tensor:
    """``x [..., k]`` → ``[..., G, g]``; the partial last group is padded with zeros (``fill='zero'``)
    or with its own first element (``fill='repeat'``, which leaves min/max/absmax unchanged)."""
    k = x.shape[-1]
    pad = num_groups(k, g) * g - k
    if pad:
        if fill == "zero":
            tail = x.new_zeros(*x.shape[:-1], pad)
        else:
            tail = x[..., (k // g) * g : (k // g) * g + 1].expand(*x.shape[:-1], pad)
        x = torch.cat([x, tail], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g)


def group_reduce(x: Tensor, g: int, op: str) -> Tensor:
    """Reduce ``x [..., k]`` per group of ``g`` columns: ``op`` in {'sum', 'amin', 'amax'} → ``[..., G]``."""
    if op == "sum":
        return _group_view(x, g, "zero").sum(-1)
    return getattr(_group_view(x, g, "repeat"), op)(-1)


def _flat(x: Tensor, spec: QuantSpec) -> Tensor:
    return x.reshape(1, -1) if spec.granularity is Granularity.TENSOR else x


# ---------------------------------------------------------------------------------------------
# Parameters, quantize, dequantize


def qparams_from_range(
    lo: Tensor, hi: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0, scale_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """(scale, zero) for per-group ranges ``lo ≤ 0 ≤ hi`` shrunk by ``clip`` (float or per-group).

    ``scale_dtype`` rounds the scale through a storage dtype (float16) so that codes computed here
    dequantize identically after packing.
    """
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    tiny = torch.finfo(scale_dtype or torch.float32).tiny
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) * clip / (spec.sym_zero - 1)
        scale = _round_scale(scale.clamp(min=tiny), scale_dtype)
        zero = torch.full_like(scale, float(spec.sym_zero))
    else:
        full = ((hi - lo) / spec.qmax).clamp(min=tiny)
        zero = torch.round(-lo / full).clamp(0, spec.qmax)
        scale = _round_scale((full * clip).clamp(min=tiny), scale_dtype)
    return scale, zero


def _round_scale(scale: Tensor, dtype: torch.dtype | None) -> Tensor:
    return scale if dtype is None else scale.to(dtype).float().clamp(min=torch.finfo(dtype).tiny)


def compute_qparams(
    w: Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Min/max (clipped by ``spec.clip_ratio``) scales and zeros, float32, shape ``[..., n_groups]``
    (all ones in the leading dims for per-tensor)."""
    x = _flat(w.detach(), spec)
    g = group_length(spec, x.shape[-1])
    lo, hi = group_reduce(x, g, "amin"), group_reduce(x, g, "amax")
    scale, zero = qparams_from_range(lo, hi, spec, spec.clip_ratio, scale_dtype)
    if spec.granularity is Granularity.TENSOR:
        shape = (1,) * w.dim()
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return scale, zero


def _expanded(p: Tensor, w: Tensor, spec: QuantSpec) -> Tensor:
    if spec.granularity is Granularity.TENSOR or p.shape[-1] == 1:  # one group per row: broadcast
        return p
    k = w.shape[-1]
    return expand_groups(p, k, group_length(spec, k))


def quantize(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Codes ``clamp(round(w / s) + z, 0, 2^b − 1)`` as uint8, same shape as ``w``."""
    s, z = _expanded(scale, w, spec), _expanded(zero, w, spec)
    return (torch.round(w.float() / s) + z).clamp(0, spec.qmax).to(torch.uint8)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(q − z) · s`` in ``dtype``."""
    s, z = _expanded(scale.float(), codes, spec), _expanded(zero.float(), codes, spec)
    return ((codes.float() - z) * s).to(dtype)


def straight_through(x: Tensor, xq: Tensor) -> Tensor:
    """Forward ``xq``, backward identity: the STE that learned rotations train through."""
    if x.requires_grad and torch.is_grad_enabled():
        return x + (xq - x).detach()
    return xq


def fake_quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize then dequantize in ``w``'s dtype (min/max params; STE gradient)."""
    scale, zero = compute_qparams(w, spec)
    s, z = _expanded(scale, w, spec), _expanded(zero, w, spec)
    return straight_through(w, round_trip(w.detach().float(), s, z, spec.qmax).to(w.dtype))


def round_trip(x: Tensor, scale: Tensor, zero: Tensor, qmax: int) -> Tensor:
    """``dequantize(quantize(x))`` = (clamp(round(x/s) + z, 0, qmax) − z)·s in one new buffer: the clamped codes
    are integers in [0, qmax], exact in float32, so leaving out the uint8 codes changes no value."""
    return torch.div(x, scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)


def fake_quantize_per_token(x: Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0) -> Tensor:
    """Dynamic per-token activation fake-quant over the last axis (QuaRot: symmetric, clip 0.9)."""
    return fake_quantize(x, QuantSpec(bits, symmetric, Granularity.TOKEN, None, clip_ratio))


def fake_quantize_per_head(
    x: Tensor, head_dim: int, bits: int, symmetric: bool = False, clip_ratio: float = 1.0
) -> Tensor:
    """Per (token, head) fake-quant: groups of ``head_dim`` along the last axis (KV: asym, clip 0.95)."""
    return fake_quantize(x, QuantSpec(bits, symmetric, Granularity.HEAD, head_dim, clip_ratio))


# ---------------------------------------------------------------------------------------------
# Packing


def pack_int4(codes: Tensor, pad: int | Tensor = 0) -> Tensor:
    """``[..., K]`` codes < 16 → ``[..., ceil(K/2)]`` uint8, low nibble = even k.

    An odd K is padded with ``pad`` (an int, or a tensor of the leading shape: one code per row).
    """
    if codes.dtype != torch.uint8:
        raise ShapeError(f"pack_int4 needs uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ShapeError("pack_int4 needs codes < 16 (bits ≤ 4)")
    if codes.shape[-1] % 2:
        col = torch.as_tensor(pad, dtype=torch.uint8, device=codes.device)
        col = col.expand(codes.shape[:-1]).unsqueeze(-1)
        codes = torch.cat([codes, col], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """Inverse of ``pack_int4``: ``[..., ceil(K/2)]`` uint8 → ``[..., K]`` codes."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != num_groups(k, 2):
        raise ShapeError(
            f"unpack_int4 needs uint8 [..., ceil(K/2)={num_groups(k, 2)}], got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    both = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :k]


def pack_codes(codes: Tensor, bits: int, pad: int | Tensor = 0) -> Tensor:
    """Canonical storage of codes: two per byte for ``bits ≤ 4``, one per byte above."""
    return pack_int4(codes, pad) if bits <= 4 else codes.to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, k: int) -> Tensor:
    return unpack_int4(packed, k) if bits <= 4 else packed


def _check_packed(packed: Tensor, bits: int, k: int, who: str) -> int:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ShapeError(f"{who}.packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    width = num_groups(k, 2) if bits <= 4 else k
    if packed.shape[1] != width:
        raise ShapeError(
            f"{who}.packed has {packed.shape[1]} columns; {bits}-bit codes for in_features={k} need {width}"
        )
    return packed.shape[0]


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """The canonical stored form of an affine-quantized ``W [N, K]`` (see the module docstring)."""

    packed: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    in_features: int
    symmetric: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ShapeError(f"PackedWeight.bits must be in 2..8, got {self.bits}")
        n = _check_packed(self.packed, self.bits, self.in_features, "PackedWeight")
        if not 1 <= self.group_size <= self.in_features:
            raise ShapeError(
                f"PackedWeight.group_size={self.group_size} must be in 1..in_features={self.in_features}"
            )
        shape = (n, num_groups(self.in_features, self.group_size))
        if tuple(self.scales.shape) != shape or not self.scales.is_floating_point():
            got = f"{self.scales.dtype} {tuple(self.scales.shape)}"
            raise ShapeError(f"PackedWeight.scales must be float {shape}, got {got}")
        if self.symmetric != (self.zeros is None):
            raise ShapeError("PackedWeight.zeros must be None exactly when symmetric=True")
        if self.zeros is not None and (tuple(self.zeros.shape) != shape or self.zeros.dtype != torch.uint8):
            got = f"{self.zeros.dtype} {tuple(self.zeros.shape)}"
            raise ShapeError(f"PackedWeight.zeros must be uint8 {shape}, got {got}")

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def codes(self) -> Tensor:
        """Unpacked uint8 codes ``[N, K]``."""
        return unpack_codes(self.packed, self.bits, self.in_features)

    def zero_points(self) -> Tensor:
        """Zero points as float ``[N, n_groups]`` (``2^(b−1)`` everywhere when symmetric)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, float(1 << (self.bits - 1)), device=self.scales.device)
        return self.zeros.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q − z) · s`` as a dense ``[N, K]`` weight."""
        k, g = self.in_features, self.group_size
        s = expand_groups(self.scales.float(), k, g)
        z = expand_groups(self.zero_points(), k, g)
        return ((self.codes().float() - z) * s).to(dtype)

    @classmethod
    def from_codes(
        cls, codes: Tensor, scales: Tensor, zeros: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float16
    ) -> PackedWeight:
        """Pack codes ``[N, K]`` with float scales/zeros ``[N, n_groups]`` (channel or group specs)."""
        if codes.dim() != 2:
            raise ShapeError(f"PackedWeight packs 2-D [out, in] weights, got shape {tuple(codes.shape)}")
        if spec.granularity not in (Granularity.CHANNEL, Granularity.GROUP, Granularity.TENSOR):
            raise RecipeError(
                f"weights are packed per channel, group or tensor; granularity {spec.granularity.value!r} "
                "is for activations"
            )
        n, k = codes.shape
        g = group_length(spec, k)
        shape = (n, num_groups(k, g))
        scales, zeros = scales.expand(shape), zeros.expand(shape)
        if spec.symmetric:
            if not bool((zeros == spec.sym_zero).all()):
                raise ShapeError(f"symmetric codes must have zero point {spec.sym_zero} everywhere")
            zq, pad = None, spec.sym_zero
        else:
            zq = zeros.round().to(torch.uint8)
            pad = zq[:, -1]
        return cls(
            packed=pack_codes(codes, spec.bits, pad),
            scales=scales.to(scale_dtype).contiguous(),
            zeros=None if zq is None else zq.contiguous(),
            bits=spec.bits,
            group_size=g,
            in_features=k,
            symmetric=spec.symmetric,
        )


@dataclass(frozen=True, eq=False)
class CodebookWeight:
    """Non-uniform (LeanQuant) stored form: codes packed as above + a per-row codebook ``[N, 2^b]``.

    ``w[n, k] = codebook[n, q[n, k]]``; the pad code of an odd K is 0 and must not be read.
    """

    packed: Tensor
    codebook: Tensor
    bits: int
    in_features: int

    def __post_init__(self) -> None:
        n = _check_packed(self.packed, self.bits, self.in_features, "CodebookWeight")
        shape = (n, 1 << self.bits)
        if tuple(self.codebook.shape) != shape or not self.codebook.is_floating_point():
            raise ShapeError(f"CodebookWeight.codebook must be float {shape}, got {tuple(self.codebook.shape)}")

    def codes(self) -> Tensor:
        return unpack_codes(self.packed, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.codebook.float().gather(1, self.codes().long()).to(dtype)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """What a weight quantizer (rtn, gptq, leanquant) returns.

    ``weight`` is the dequantized ``[N, K]`` float32 weight; ``codes`` uint8 ``[N, K]``; either
    ``scales``/``zeros`` (float32 ``[N, n_groups]``, zeros integer-valued) for an affine grid, or
    ``codebook`` ``[N, 2^b]`` for a non-uniform one.
    """

    weight: Tensor
    codes: Tensor
    spec: QuantSpec
    scales: Tensor | None = None
    zeros: Tensor | None = None
    codebook: Tensor | None = None

    def pack(self, scale_dtype: torch.dtype = torch.float16) -> PackedWeight | CodebookWeight:
        """Canonical stored form; exact when the quantizer rounded its scales through ``scale_dtype``."""
        if self.codebook is not None:
            k = self.codes.shape[1]
            bits = self.spec.bits
            return CodebookWeight(pack_codes(self.codes, bits), self.codebook.to(scale_dtype), bits, k)
        return PackedWeight.from_codes(self.codes, self.scales, self.zeros, self.spec, scale_dtype)


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10·log10(‖ref‖² / ‖ref − approx‖²)``."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)
