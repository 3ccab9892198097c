"""Outlier Suppression+: exact on every tiny architecture (quantization off); shifts centre and scales
bound the channel ranges; the threshold search never does worse than no scaling."""

import pytest
import torch

from conftest import max_rel_error
from qcompile.errors import RecipeError
from qcompile.models import TINY_ARCHS
from qcompile.passes.calibrate import collect
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.shift_scale import scales_for, search_order, shift_scale, threshold_grid

TOL = 1e-4


def _calib(n=4, seq=32):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shift_scale_is_exact(arch, tiny_programs, tiny_ids):
    model, program = tiny_programs[arch]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    out = shift_scale(fold_norms(program), calibration=_calib(), max_steps=8)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    counts = out.reports[-1].counts
    layers = len(program.model_map.blocks)
    assert counts["shifted norm"] == (layers if arch == "mixtral" else 2 * layers)
    # every reader of a shifted norm got a bias (created where the model had none)
    for b in out.model_map.blocks:
        assert b.attn_norm.bias is not None
        assert all(out.model_map.linears[r].bias for r in b.attn_norm.readers)


def test_no_shift_is_the_official_llama_setting(tiny_programs, tiny_ids):
    model, program = tiny_programs["llama"]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    out = shift_scale(fold_norms(program), calibration=_calib(), shift=False, max_steps=8)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    assert "shifted norm" not in out.reports[-1].counts
    assert all(b.attn_norm.bias is None for b in out.model_map.blocks)


def test_grid_and_scales():
    g = threshold_grid(20.0, 0.1)
    assert len(g) == 100 and g[0] == 20.0 and abs(g[-1] - 0.1) < 1e-12
    assert len(threshold_grid(500.0, 0.1)) == 1000 and len(threshold_grid(500.0, 0.1, max_steps=50)) == 50
    s = scales_for(torch.tensor([-8.0, -1.0]), torch.tensor([2.0, 1.0]), 4.0)
    assert s.tolist() == [2.0, 1.0]


def test_shift_centres_and_scale_bounds_the_range(tiny_programs):
    _, program = tiny_programs["llama"]
    p = fold_norms(program)
    norm = p.model_map.blocks[0].attn_norm
    g = p.weight(norm.weight).detach().clone()
    g[3] = 30.0  # an outlier channel
    p.set_weight(norm.weight, g)
    q = p.model_map.blocks[0].attention.q.linear
    before = collect(p, _calib(), {q: 0}, progress=False)[q]
    out = shift_scale(p, calibration=_calib(), max_steps=30)
    after = collect(out, _calib(), {q: 0}, progress=False)[q]
    assert torch.allclose(after.max + after.min, torch.zeros_like(after.min), atol=1e-4)  # centred
    assert (after.max - after.min).max() < 0.5 * (before.max - before.min).max()
    line = next(s for s in out.reports[-1].sites if s.startswith("block 0 attn_norm"))
    assert "t = " in line


def _search_mse(report) -> dict[str, float]:
    """{site: the search's MSE at its chosen threshold}, from the report's site lines."""
    return {line.split(":")[0]: float(line.split("search MSE ")[1].split()[0])
            for line in report.sites if "search MSE " in line}


def test_search_never_worse_than_unscaled(tiny_programs):
    # t = T_max is the first candidate and gives s = 1: so a 1-step grid is the unscaled error
    _, program = tiny_programs["qwen2"]
    p = fold_norms(program)
    one = shift_scale(p, calibration=_calib(), max_steps=1, shift=False)
    many = shift_scale(p, calibration=_calib(), max_steps=16, shift=False)
    for site in ("block 0 attn_norm", "block 1 ffn_norm"):
        assert _search_mse(many.reports[-1])[site] <= _search_mse(one.reports[-1])[site]


def test_coarse_to_fine_search_finds_a_unimodal_minimum_with_few_evaluations():
    errors = [(i - 613) ** 2 for i in range(1000)]
    tried = []

    def best_of(indices):
        tried.extend(indices)
        return min(indices, key=lambda i: errors[i])

    rest = search_order(1000, 64, best_of)
    assert 613 in tried + rest and len(tried) + len(rest) < 100
    assert search_order(50, 0, best_of) == list(range(50))


def test_coarse_search_is_close_to_every_threshold(tiny_programs):
    _, program = tiny_programs["llama"]
    p = fold_norms(program)
    mse = {}
    for coarse in (0, 4):
        out = shift_scale(p, calibration=_calib(), max_steps=32, coarse=coarse)
        mse[coarse] = _search_mse(out.reports[-1])
    assert len(mse[0]) == 6 and mse[0].keys() == mse[4].keys()  # 2 layers × (2 norms + up→down)
    assert all(mse[0][k] * (1 - 1e-9) <= mse[4][k] <= mse[0][k] * 1.1 for k in mse[0])


def test_bad_options_are_refused(tiny_programs):
    _, program = tiny_programs["llama"]
    with pytest.raises(RecipeError, match="w_bits"):
        shift_scale(program, calibration=_calib(), w_bits=1)


@pytest.mark.real
def test_smollm2_shift_scale_is_exact(smollm2_program, smollm2_ids, smollm2_logits):
    ref = smollm2_logits
    out = shift_scale(fold_norms(smollm2_program), calibration=smollm2_ids[:, :128], max_steps=4)
    assert max_rel_error(out.logits(smollm2_ids), ref) <= TOL
    assert out.reports[-1].counts["shifted norm"] == 60
