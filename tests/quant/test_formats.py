"""Formats: spec validation, grids, groups (incl. partial), packing, fake-quant and its STE."""

import pytest
import torch

from qcompile.errors import RecipeError, ShapeError
from qcompile.quant.formats import (
    CodebookWeight,
    Granularity,
    PackedWeight,
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_groups,
    fake_quantize,
    fake_quantize_per_head,
    fake_quantize_per_token,
    pack_int4,
    quantize,
    sqnr_db,
    unpack_int4,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=1, symmetric=True), "bits"),
        (dict(bits=9, symmetric=True), "bits"),
        (dict(bits=4.0, symmetric=True), "bits"),
        (dict(bits=4, symmetric=1), "symmetric"),
        (dict(bits=4, symmetric=True, granularity="row"), "granularity"),
        (dict(bits=4, symmetric=True, granularity="group"), "group_size"),
        (dict(bits=4, symmetric=True, granularity="group", group_size=0), "group_size"),
        (dict(bits=4, symmetric=True, granularity="channel", group_size=128), "group_size"),
        (dict(bits=4, symmetric=True, clip_ratio=0.0), "clip_ratio"),
        (dict(bits=4, symmetric=True, clip_ratio=1.5), "clip_ratio"),
    ],
)
def test_spec_rejects_bad_field_by_name(kwargs, field):
    with pytest.raises(RecipeError, match=field):
        QuantSpec(**kwargs)


def test_spec_dict_round_trip_and_unknown_key():
    spec = QuantSpec(3, False, "group", 64, 0.9)
    assert spec.granularity is Granularity.GROUP
    d = spec.to_dict()
    assert d["granularity"] == "group" and isinstance(d["granularity"], str)
    assert QuantSpec.from_dict(d) == spec
    with pytest.raises(RecipeError, match="grup_size"):
        QuantSpec.from_dict({**d, "grup_size": 3})


@pytest.mark.parametrize("k", [1, 7, 8, 577])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(0, 16, (5, k), generator=_gen(k), dtype=torch.uint8)
    packed = pack_int4(codes, pad=8)
    assert packed.shape == (5, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, k), codes)
    assert torch.equal(packed[:, 0] & 0x0F, codes[:, 0])  # low nibble = even k
    if k > 1:
        assert torch.equal(packed[:, 0] >> 4, codes[:, 1])
    if k % 2:
        assert bool((packed[:, -1] >> 4 == 8).all())  # odd K padded with the given code


def test_unpack_checks_width():
    with pytest.raises(ShapeError):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gran, gs", [("channel", None), ("group", 128), ("group", 100), ("tensor", None)])
def test_rounding_error_at_most_half_step(symmetric, bits, gran, gs):
    spec = QuantSpec(bits, symmetric, gran, gs)
    w = torch.randn(6, 576, generator=_gen(bits)) + (0.0 if symmetric else 0.7)
    scale, zero = compute_qparams(w, spec)
    codes = quantize(w, scale, zero, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    err = (dequantize(codes, scale, zero, spec) - w).abs()
    s = scale.expand(6, -1) if gran == "tensor" else expand_groups(scale, 576, 576 if gs is None else gs)
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-7).all())
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())
    else:
        assert bool((zero == zero.round()).all()) and 0 <= zero.min() and zero.max() <= 2**bits - 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_partial_last_group(symmetric):
    spec = QuantSpec(4, symmetric, "group", 128)
    w = torch.randn(4, 576, generator=_gen(1))
    w[:, 512:] *= 10.0  # the 64-column last group has its own range
    scale, zero = compute_qparams(w, spec)
    assert scale.shape == zero.shape == (4, 5)
    tail = w[:, 512:]
    if symmetric:
        expected = tail.abs().amax(1) / 7
    else:
        expected = (tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / 15
    torch.testing.assert_close(scale[:, 4], expected)
    assert bool((scale[:, 4] > 5 * scale[:, 3]).all())  # not shared with group 3
    deq = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
    assert bool(((deq - w)[:, 512:].abs() <= scale[:, 4:5] / 2 * (1 + 1e-5)).all())

    packed = PackedWeight.from_codes(quantize(w, scale, zero, spec), scale, zero, spec)
    assert packed.n_groups == 5 and packed.group_size == 128 and packed.packed.shape == (4, 288)
    assert sqnr_db(w, packed.dequantize()) > 15.0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_packed_weight_dequantizes_exactly(symmetric, bits, scale_dtype):
    spec = QuantSpec(bits, symmetric, "group", 64)
    w = torch.randn(3, 201, generator=_gen(2))  # odd K, partial last group
    scale, zero = compute_qparams(w, spec, scale_dtype)  # scales already representable
    codes = quantize(w, scale, zero, spec)
    pw = PackedWeight.from_codes(codes, scale, zero, spec, scale_dtype)
    assert pw.scales.dtype == scale_dtype and pw.scales.shape == (3, 4)
    assert (pw.zeros is None) == symmetric
    assert pw.packed.shape == ((3, 101) if bits == 4 else (3, 201))
    assert torch.equal(pw.codes(), codes)
    assert torch.equal(pw.dequantize(), dequantize(codes, scale, zero, spec))
    if bits == 4 and not symmetric:  # pad nibble is the last group's zero: dequantizes to 0
        assert torch.equal(pw.packed[:, -1] >> 4, pw.zeros[:, -1])


def test_packed_weight_validates_shapes():
    spec = QuantSpec(4, True, "group", 64)
    w = torch.randn(3, 128, generator=_gen(3))
    s, z = compute_qparams(w, spec)
    pw = PackedWeight.from_codes(quantize(w, s, z, spec), s, z, spec)
    with pytest.raises(ShapeError, match="scales"):
        PackedWeight(pw.packed, pw.scales[:, :1], None, 4, 64, 128, True)
    with pytest.raises(ShapeError, match="packed"):
        PackedWeight(pw.packed[:, :10], pw.scales, None, 4, 64, 128, True)
    with pytest.raises(ShapeError, match="zeros"):
        PackedWeight(pw.packed, pw.scales, None, 4, 64, 128, False)
    with pytest.raises(ShapeError, match="symmetric"):
        PackedWeight.from_codes(quantize(w, s, z, spec), s, z - 1, spec)
    with pytest.raises(RecipeError, match="token"):
        PackedWeight.from_codes(quantize(w, s, z, spec), s, z, QuantSpec(4, True, "token"))


def test_codebook_weight_round_trip():
    cb = torch.randn(3, 8, generator=_gen(4)).sort(1).values.half()
    codes = torch.randint(0, 8, (3, 9), generator=_gen(5), dtype=torch.uint8)
    from qcompile.quant.formats import pack_codes

    cw = CodebookWeight(pack_codes(codes, 3), cb, 3, 9)
    assert torch.equal(cw.dequantize(), cb.float().gather(1, codes.long()))
    with pytest.raises(ShapeError, match="codebook"):
        CodebookWeight(pack_codes(codes, 3), cb[:, :4], 3, 9)


def test_all_zero_weights_stay_zero():
    for spec in (QuantSpec(4, True), QuantSpec(4, False, "group", 32)):
        w = torch.zeros(2, 64)
        out = fake_quantize(w, spec)
        assert torch.equal(out, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_token_is_per_token(dtype):
    x = torch.randn(2, 5, 64, generator=_gen(6)).to(dtype)
    y = fake_quantize_per_token(x, 4, symmetric=True, clip_ratio=0.9)
    assert y.dtype == dtype and y.shape == x.shape
    x2 = x.clone()
    x2[0, 1] *= 1000  # one outlier token must not change the others
    y2 = fake_quantize_per_token(x2, 4, symmetric=True, clip_ratio=0.9)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 1] = False
    assert torch.equal(y[keep], y2[keep])
    for row in y.reshape(-1, 64).float():  # at most 2^b levels per token
        assert row.unique().numel() <= 16
    assert sqnr_db(x.float(), y.float()) > 12.0


def test_per_head_groups_and_shape_check():
    x = torch.randn(3, 4 * 32, generator=_gen(7))
    y = fake_quantize_per_head(x, 32, 4, symmetric=False)
    x2 = x.clone()
    x2[:, :32] *= 100  # head 0 outlier
    y2 = fake_quantize_per_head(x2, 32, 4, symmetric=False)
    assert torch.equal(y[:, 32:], y2[:, 32:])
    assert not torch.equal(y, fake_quantize_per_token(x, 4, symmetric=False))
    with pytest.raises(ShapeError, match="head_dim"):
        fake_quantize_per_head(torch.randn(2, 100), 32, 4)


def test_straight_through_gradient_is_identity():
    x = torch.randn(4, 96, generator=_gen(8), requires_grad=True)
    g = torch.randn(4, 96, generator=_gen(9))
    spec = QuantSpec(4, False, "group", 32)
    y = fake_quantize(x, spec)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)
    with torch.no_grad():
        assert torch.allclose(y, fake_quantize(x, spec), atol=1e-6)
    assert not torch.equal(y.detach(), x.detach())
