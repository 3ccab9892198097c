"""duquant pass: exact on every tiny architecture in both placements, online ops counted and seen through
by the matcher; refusals of chains that cannot compose."""

import pytest
import torch

from conftest import max_rel_error
from qcompile.errors import RecipeError, UnsafeRewriteError
from qcompile.models import TINY_ARCHS
from qcompile.passes.duquant import duquant
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.online_hadamard import online_hadamard
from qcompile.passes.rotate import rotate
from qcompile.passes.smooth import smooth
from qcompile.recipe import load_recipe

TOL = 1e-4


def _calib(n=2, seq=32):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(2))


def _online(p):
    return sum(1 for n in p.module.graph.nodes if n.meta.get("qcompile") == "online")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_duquant_online_is_exact(arch, tiny_programs, tiny_ids):
    model, program = tiny_programs[arch]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    out = duquant(program, calibration=_calib(), block=32, steps=8)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    layers = len(program.model_map.blocks)
    sites = 3 * layers if arch == "mixtral" else 4 * layers
    assert out.reports[-1].counts["online transform"] == sites
    assert _online(out) == 7 * sites  # 64 and 96 are multiples of 32: the block form everywhere
    assert out.model_map.summary() == program.model_map.summary() | {"linears": out.model_map.summary()["linears"]}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_duquant_fused_is_exact(arch, tiny_programs, tiny_ids):
    model, program = tiny_programs[arch]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    out = duquant(fold_norms(program), calibration=_calib(), placement="fused", block=16, steps=8)
    out = online_hadamard(out, r4=False)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    layers = len(program.model_map.blocks)
    assert out.reports[-2].counts.get("online transform", 0) == (0 if arch == "mixtral" else layers)


def test_partial_blocks_keep_the_block_form(tiny_programs, tiny_ids):
    """64 = 40 + 24 and 96 = 2·40 + 16: the full blocks as R₁·P·R₂, the partial one by its own small matrix,
    never a dense C×C one; exact."""
    model, program = tiny_programs["llama"]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    out = duquant(smooth(fold_norms(program), calibration=_calib()), calibration=_calib(), block=40, steps=8)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    assert _online(out) == 8 * 11  # slice ×2, the 7 block ops, the tail's matmul, cat: per site
    shapes = {tuple(t.shape) for n, t in [*out.module.named_parameters(), *out.module.named_buffers()]
              if "duquant" in n and t.dim() == 2}
    assert shapes == {(40, 40), (24, 24), (16, 16)}  # R₁/R₂ blocks and the two widths' tails


def test_refusals(tiny_programs):
    _, program = tiny_programs["llama"]
    with pytest.raises(UnsafeRewriteError, match="fold_norms"):
        duquant(program, calibration=_calib(), placement="fused")
    out = duquant(fold_norms(program), calibration=_calib(), block=32, steps=2)
    for later in (fold_norms, rotate):
        with pytest.raises(UnsafeRewriteError, match="duquant"):
            later(out)
    with pytest.raises(RecipeError, match="placement"):
        duquant(program, calibration=_calib(), placement="nope")
    with pytest.raises(RecipeError, match="cannot compose"):
        load_recipe("smoothquant+duquant-fused")


@pytest.mark.real
def test_smollm2_duquant_is_exact(smollm2_program, smollm2_ids, smollm2_logits):
    ref = smollm2_logits
    out = duquant(fold_norms(smollm2_program), calibration=smollm2_ids[:, :64], steps=4, tokens=128)
    assert max_rel_error(out.logits(smollm2_ids), ref) <= TOL
    assert out.reports[-1].counts["online transform"] == 120


@pytest.mark.real
def test_smollm2_duquant_fused_is_exact(smollm2_program, smollm2_ids, smollm2_logits):
    out = duquant(fold_norms(smollm2_program), calibration=smollm2_ids[:, :64], placement="fused", steps=4,
                  tokens=128)
    out = online_hadamard(out, r4=False)
    assert max_rel_error(out.logits(smollm2_ids), smollm2_logits) <= TOL
    assert out.reports[-2].counts["online transform"] == 30  # the down inputs only
