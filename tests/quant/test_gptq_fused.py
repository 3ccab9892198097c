"""GPTQ's fused column loop (``quant.gptq_fused``, a Triton kernel) against the torch loop, on the CPU through
Triton's interpreter: the same codes, values and errors bit for bit (the CPU loop rounds ``W − e·U`` as the
kernel's ``fma=False`` form does)."""

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.interpreter import interpret_library  # noqa: E402  (sets TRITON_INTERPRET=1)

from qcompile.errors import RecipeError  # noqa: E402
from qcompile.quant.formats import Granularity, QuantSpec, compute_qparams  # noqa: E402
from qcompile.quant.gptq import AffineGrid, block_columns, damped_inverse_cholesky, gptq_quantize  # noqa: E402

interpret_library()


def _hessian(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, k, generator=g) * torch.rand(k, generator=g) * 2
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("n,b", [(40, 32), (37, 20)])
def test_block_equals_torch_loop(n, b):
    from qcompile.quant.gptq_fused import fused_block_columns

    g = torch.Generator().manual_seed(n)
    W = torch.randn(n, b, generator=g) * 0.02
    U = damped_inverse_cholesky(_hessian(b, n))
    spec = QuantSpec(4, False, Granularity.GROUP, 8)
    grid = AffineGrid(*compute_qparams(W, spec, torch.float16), spec, 8)
    params = grid.block(torch.arange(b))
    ref = block_columns(AffineGrid.round_in, spec, W.clone(), U, params)
    got = fused_block_columns(W, U, params, spec.qmax, rows=16)
    for r, x in zip(ref, got):
        assert torch.equal(r, x)
    assert ref[0].float().std() > 0  # codes spread over the grid: the comparison is not of constants


@pytest.mark.parametrize("kw", [
    dict(spec=QuantSpec(4, False, Granularity.GROUP, 32)),  # dynamic groups: params at each group start
    dict(spec=QuantSpec(4, True), mse=True),  # per channel, clip search
    dict(spec=QuantSpec(3, False, Granularity.GROUP, 32), act_order=True, static_groups=True),
])
def test_gptq_quantize_fused_equals_loop(kw):
    n, k = 24, 96
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    H = _hessian(k, 2)
    H[5, :], H[:, 5] = 0, 0  # a dead input
    spec = kw.pop("spec")
    ref = gptq_quantize(W, H, spec, block_size=64, fused=False, **kw)
    got = gptq_quantize(W, H, spec, block_size=64, fused=True, **kw)
    assert torch.equal(ref.codes, got.codes) and torch.equal(ref.weight, got.weight)
    assert torch.equal(ref.scales, got.scales)


def test_codebook_grid_refused():
    from qcompile.quant.gptq import CodebookGrid

    W, H = torch.randn(4, 16), _hessian(16, 0)
    cb = lambda w, d: CodebookGrid(torch.linspace(-1, 1, 16).expand(4, 16).contiguous())  # noqa: E731
    with pytest.raises(RecipeError, match="affine grids only"):
        gptq_quantize(W, H, QuantSpec(4, False), grid=cb, fused=True)
