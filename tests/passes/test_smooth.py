"""SmoothQuant: exact on every tiny architecture (quantization off), and it flattens activation maxima."""

import pytest
import torch

from conftest import max_rel_error
from qcompile.errors import RecipeError, UnsafeRewriteError
from qcompile.models import TINY_ARCHS
from qcompile.passes.calibrate import collect
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.smooth import smooth, smoothing_scales

TOL = 1e-4


def _calib(n=4, seq=32, vocab=256):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_smooth_is_exact(arch, fold, tiny_programs, tiny_ids):
    model, program = tiny_programs[arch]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    p = fold_norms(program) if fold else program
    out = smooth(p, calibration=_calib(), alpha=0.6 if fold else 0.5)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    counts = out.reports[-1].counts
    layers = len(program.model_map.blocks)
    assert counts["scaled norm"] == 2 * layers and counts["scaled v_o"] == layers
    if arch == "mixtral":  # MoE: up→down skipped with its reason
        assert "up_down" not in str(counts) and "MoE" in out.reports[-1].skipped[0][1]
    else:
        assert counts["scaled up_down"] == layers
    q = out.model_map.linears[out.model_map.blocks[0].attention.q.linear]
    assert (out.weight(q.weight) - p.weight(q.weight)).abs().max() > 1e-4  # it did rewrite


def test_scales_formula():
    a, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(a, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, (1e-5) ** 0.5 / 2 ** 0.5], dtype=torch.float64))


def test_smoothing_flattens_an_outlier_channel(tiny_programs):
    _, program = tiny_programs["llama"]
    p = fold_norms(program)
    norm = p.model_map.blocks[0].attn_norm
    g = p.weight(norm.weight).detach().clone()
    g[5] = 40.0  # an outlier channel in the input of q/k/v
    p.set_weight(norm.weight, g)
    q = p.model_map.blocks[0].attention.q.linear
    before = collect(p, _calib(), {q: 0}, progress=False)[q].absmax
    out = smooth(p, calibration=_calib(), alpha=0.5)
    after = collect(out, _calib(), {q: 0}, progress=False)[q].absmax
    assert after.max() < 0.25 * before.max()
    assert (after.max() / after.median()) < 0.25 * (before.max() / before.median())


def test_smooth_refusals(tiny_programs):
    _, program = tiny_programs["llama"]
    with pytest.raises(RecipeError, match="alpha"):
        smooth(program, calibration=_calib(), alpha=1.5)
    out = smooth(fold_norms(program), calibration=_calib())
    with pytest.raises(UnsafeRewriteError, match="undo"):
        fold_norms(out)


@pytest.mark.real
def test_smollm2_smooth_is_exact(smollm2_program, smollm2_ids, smollm2_logits):
    ref = smollm2_logits
    out = smooth(fold_norms(smollm2_program), calibration=smollm2_ids[:, :128], alpha=0.5)
    assert max_rel_error(out.logits(smollm2_ids), ref) <= TOL
    assert out.reports[-1].counts["scaled norm"] == 60
