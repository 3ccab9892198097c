"""The ``torch.ops.qcompile`` declarations: schemas, CPU implementations, fake implementations
(traced by ``torch.export``), ``torch.library.opcheck``, and the shape checks' messages."""

import pytest
import torch

import qcompile.kernels as K
from qcompile.errors import ShapeError
from qcompile.kernels import reference


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _weight(n=24, k=576, g=128, asym=True):
    groups = -(-k // g)
    packed = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, generator=_gen(1))
    scales = (torch.rand(n, groups, generator=_gen(2)) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, generator=_gen(3)) if asym else None
    return packed, scales, zeros


def test_schemas():
    s = {name: str(getattr(torch.ops.qcompile, name).default._schema) for name in
         ("hadamard", "quantize_per_token", "linear_w4a16", "linear_w4a8", "linear_w4a4")}
    assert s["hadamard"] == "qcompile::hadamard(Tensor x, int block=0) -> Tensor"
    assert s["quantize_per_token"].endswith("-> (Tensor, Tensor, Tensor)")
    assert "Tensor? zeros, int group_size, Tensor? bias" in s["linear_w4a16"]
    assert s["linear_w4a8"].replace("w4a8", "w4a4") == s["linear_w4a4"]
    assert "ScalarType out_dtype" in s["linear_w4a8"]


def test_cpu_ops_are_the_reference():
    x = torch.randn(2, 3, 576, generator=_gen(4), dtype=torch.bfloat16)
    packed, scales, zeros = _weight()
    bias = torch.randn(24, generator=_gen(5), dtype=torch.bfloat16)
    assert torch.equal(K.linear_w4a16(x, packed, scales, zeros, 128, bias),
                       reference.linear_w4a16(x, packed, scales, zeros, 128, bias))
    assert torch.equal(K.hadamard(x), reference.hadamard(x))
    codes, s, z = K.quantize_per_token(x, 4, False, 0.9, rotate=True)
    for a, b in zip((codes, s, z), reference.quantize_per_token(x, 4, False, 0.9, True, 0)):
        assert torch.equal(a, b)
    y = K.linear_w4a4(codes, s, z, packed, scales, zeros, 128, bias, torch.float32)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    assert torch.equal(y, reference.linear_w4a8(codes, s, z, packed, scales, zeros, 128, bias, torch.float32))
    # per-channel: group_size None means K
    pc = _weight(g=576, asym=False)
    torch.testing.assert_close(K.linear_w4a16(x, *pc, None), K.linear_w4a16(x, *pc, 576))


class _Block(torch.nn.Module):
    """What a lowered layer looks like: rotate+quantize the input, int4 linear, plus a W4A16 linear."""

    def __init__(self):
        super().__init__()
        p, s, z = _weight(n=32, k=576, g=128)
        self.register_buffer("p", p)
        self.register_buffer("s", s)
        self.register_buffer("z", z)
        p2, s2, _ = _weight(n=576, k=32, g=32, asym=False)
        self.register_buffer("p2", p2)
        self.register_buffer("s2", s2)

    def forward(self, x):
        c, s, z = torch.ops.qcompile.quantize_per_token(x, 4, False, 0.9, True, 0)
        h = torch.ops.qcompile.linear_w4a4(c, s, z, self.p, self.s, self.z, 128, None, torch.bfloat16)
        h = torch.ops.qcompile.hadamard(h, 0)
        return torch.ops.qcompile.linear_w4a16(h, self.p2, self.s2, None, 32, None)


def test_fake_impls_trace_under_export():
    m = _Block()
    x = torch.randn(2, 5, 576, dtype=torch.bfloat16, generator=_gen(6))
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: batch}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"qcompile.quantize_per_token.default", "qcompile.linear_w4a4.default", "qcompile.hadamard.default",
            "qcompile.linear_w4a16.default"} <= targets
    x2 = torch.randn(3, 5, 576, dtype=torch.bfloat16, generator=_gen(7))
    torch.testing.assert_close(ep.module()(x2), m(x2), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["hadamard", "quantize_per_token", "linear_w4a16", "linear_w4a8"])
def test_opcheck(name):
    x = torch.randn(3, 576, generator=_gen(8))
    packed, scales, zeros = _weight()
    codes, s, z = reference.quantize_per_token(x, 8, False, 1.0)
    args = {
        "hadamard": (x, 0),
        "quantize_per_token": (x, 8, False, 0.9, True, 0),
        "linear_w4a16": (x, packed, scales, zeros, 128, None),
        "linear_w4a8": (codes, s, z, packed, scales, zeros, 128, torch.randn(24), torch.float32),
    }[name]
    torch.library.opcheck(getattr(torch.ops.qcompile, name).default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, s, z: K.linear_w4a16(torch.randn(2, 576), p[:, :-1], s, z, 128), r"ceil\(K/2\)"),
        (lambda p, s, z: K.linear_w4a16(torch.randn(2, 576), p, s[:, :-1], z, 128), r"ceil\(K/group_size\)"),
        (lambda p, s, z: K.linear_w4a16(torch.randn(2, 576), p, s, z.int(), 128), "zeros must be None"),
        (lambda p, s, z: K.linear_w4a16(torch.randn(2, 576), p, s, z, 0), "group_size must be in"),
        (lambda p, s, z: K.linear_w4a16(torch.randn(2, 576), p, s, z, 128, torch.randn(3)), "bias must be"),
        (lambda p, s, z: K.linear_w4a16(torch.randint(0, 3, (2, 576)), p, s, z, 128), "x must be a float"),
        (lambda p, s, z: K.linear_w4a8(torch.zeros(2, 576, dtype=torch.int8), torch.ones(2), None, p, s, z, 128),
         r"x_scales must be float32 \[2, 1\]"),
        (lambda p, s, z: K.linear_w4a8(torch.zeros(2, 576), torch.ones(2, 1), None, p, s, z, 128),
         "x_codes must be int8"),
        (lambda p, s, z: K.quantize_per_token(torch.randn(2, 576), 9), "bits must be in 2..8"),
        (lambda p, s, z: K.quantize_per_token(torch.randn(2, 576), 8, clip_ratio=1.5), "clip_ratio"),
        (lambda p, s, z: K.quantize_per_token(torch.randn(2, 576), 8, block=64), "only meaningful with rotate"),
        (lambda p, s, z: K.hadamard(torch.randn(2, 576), 100), "must divide the last dim"),
        (lambda p, s, z: K.hadamard(torch.randn(2, 11008)), "no Hadamard matrix of size 11008"),
    ],
)
def test_shape_errors_name_the_constraint(call, message):
    packed, scales, zeros = _weight()
    with pytest.raises(ShapeError, match=message):
        call(packed, scales, zeros)


def test_importing_qcompile_kernels_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, qcompile.kernels, qcompile.kernels.layout; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
