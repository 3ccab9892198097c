"""spinquant pass: the learned R1/R2 stay orthogonal, the fake-quant loss falls, the fused result is exact with
quantization off (biases, LayerNorm, fused qkv), the run is deterministic, and recipes that stack it with
rotate are refused before anything runs."""

import pytest
import torch

from conftest import max_rel_error
from qcompile.errors import RecipeError, UnsafeRewriteError
from qcompile.models import TINY_ARCHS
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.online_hadamard import online_hadamard
from qcompile.passes.rotate import prepare_rotations, rotate
from qcompile.passes.spinquant import _loss, _training_program, learn_rotations, spinquant
from qcompile.pipeline import plan
from qcompile.program import PassReport
from qcompile.quant.cayley import skew_direction
from qcompile.quant.formats import Granularity, QuantSpec
from qcompile.recipe import Recipe, load_recipe

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=8, seq=32):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(2))


def _learn(program, **options):
    p = fold_norms(program)
    q1, q2 = prepare_rotations(p, "hadamard", options.get("seed", 0), True, True, PassReport("test"))
    return (q1, q2), learn_rotations(p, q1, q2, _calib(), progress=False, **options)


def test_learned_rotations_stay_orthogonal(tiny_programs):
    _, program = tiny_programs["llama"]
    (q1, q2), learned = _learn(program, steps=6, batch=2)
    for r, r0 in zip([learned.r1, *learned.r2], [q1, *q2]):
        eye = torch.eye(r.shape[0], dtype=r.dtype)
        assert r.dtype == torch.float64
        assert torch.linalg.matrix_norm(r.T @ r - eye) <= 1e-6
        assert (r - r0).abs().max() > 1e-4  # it did move off the Hadamard start
    assert len(learned.r2) == len(program.model_map.blocks)


def test_fake_quant_loss_decreases(tiny_programs):
    _, program = tiny_programs["llama"]
    _, learned = _learn(program, steps=8, batch=2, seed=0)
    assert learned.loss_after < learned.loss_before  # measured: 5.6095 → 5.5831
    assert learned.losses[0] == pytest.approx(learned.loss_before)  # step 0 trains on the evaluated batch


def test_loss_depends_on_r_only_through_quantization(tiny_programs):
    """Quantization off, the rotated model is exact for every R: the Cayley direction A vanishes."""
    _, program = tiny_programs["llama"]
    p = fold_norms(program)
    q1, q2 = prepare_rotations(p, "hadamard", 0, True, True, PassReport("test"))
    ids = _calib()[:2]
    for bits, spec in ((16, None), (4, QuantSpec(4, True, Granularity.CHANNEL))):
        t, targets, forward = _training_program(p, bits, bits, True, True)
        r1 = q1.clone().requires_grad_()
        loss = _loss(t, forward, r1, q2, ids, spec, targets)
        loss.backward()
        a = skew_direction(r1.detach(), r1.grad).abs().max().item()
        if bits == 16:
            assert a < 1e-5 * r1.grad.abs().max().item() + 1e-7
        else:
            assert a > 1e-4


@pytest.mark.parametrize("arch", TINY_ARCHS)  # qwen2: biases, opt: LayerNorm, phi3: fused qkv, mixtral: experts
def test_fused_result_is_exact_without_quantization(arch, tiny_programs, tiny_ids):
    model, program = tiny_programs[arch]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    folded = fold_norms(program)
    out = spinquant(folded, calibration=_calib(), steps=3, batch=2, seq=32)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    assert max_rel_error(online_hadamard(out).logits(tiny_ids), ref) <= TOL  # the recipe's chain
    report = out.reports[-1]
    layers = len(program.model_map.blocks)
    assert report.counts["learned R2"] == layers and report.counts["R2 head pair"] == layers
    assert report.counts["R1 writer"] == 2 * layers
    # learned, not QuaRot's Hadamard: the fused weights differ from rotate's
    q = out.model_map.linears[out.model_map.blocks[0].attention.q.linear].weight
    assert (out.weight(q) - rotate(folded).weight(q)).abs().max() > 1e-4


def test_no_steps_is_rotate(tiny_programs, tiny_ids):
    _, program = tiny_programs["qwen2"]
    folded = fold_norms(program)
    a, b = spinquant(folded, calibration=_calib(), steps=0), rotate(folded)
    for name, w in b.module.named_parameters():
        assert torch.allclose(a.weight(name), w, atol=1e-6), name


def test_same_seed_same_rotations(tiny_programs):
    _, program = tiny_programs["llama"]
    _, a = _learn(program, steps=3, batch=2, seed=5)
    _, b = _learn(program, steps=3, batch=2, seed=5)
    _, c = _learn(program, steps=3, batch=2, seed=6)
    assert torch.equal(a.r1, b.r1) and all(torch.equal(x, y) for x, y in zip(a.r2, b.r2))
    assert not torch.equal(a.r1, c.r1)


def test_refusals(tiny_programs):
    _, program = tiny_programs["llama"]
    steps = [{"fold_norms": {}}, {"rotate": {}}, {"spinquant": {}}, {"online_hadamard": {}}]
    with pytest.raises(RecipeError, match="rotate then spinquant cannot compose"):
        Recipe.from_dict({"passes": steps})
    with pytest.raises(RecipeError, match="cannot compose"):
        load_recipe("quarot+spinquant")
    with pytest.raises(RecipeError, match="needs fold_norms"):
        Recipe.from_dict({"passes": [{"spinquant": {}}, {"online_hadamard": {}}]})
    with pytest.raises(RecipeError, match="r3"):  # trained with R3/R4 but nothing applies them
        Recipe.from_dict({"passes": [{"fold_norms": {}}, {"spinquant": {}}]})
    with pytest.raises(RecipeError, match="lr must be float"):
        Recipe.from_dict({"passes": [{"fold_norms": {}}, {"spinquant": {"lr": 2}}, {"online_hadamard": {}}]})
    with pytest.raises(UnsafeRewriteError, match="fold_norms"):
        spinquant(program, calibration=_calib(), steps=0)
    with pytest.raises(UnsafeRewriteError, match="after rotate"):
        spinquant(rotate(fold_norms(program)), calibration=_calib(), steps=0)
    with pytest.raises(UnsafeRewriteError, match="after spinquant"):
        rotate(spinquant(fold_norms(program), calibration=_calib(), steps=0))
    with pytest.raises(RecipeError, match="steps"):
        spinquant(fold_norms(program), calibration=_calib(), steps=-1)


def test_recipes_plan_and_compose(tiny_programs):
    _, program = tiny_programs["llama"]
    lines = plan(program.model_map, load_recipe("spinquant-cpu"))
    assert any("learns R1" in line and "20 steps × 2 windows" in line for line in lines)
    assert any("calibration (passes): 40 windows × 512" in line for line in lines)
    r = load_recipe("spinquant-w16+gptq")
    assert r.options("spinquant")["learn_weights_16bit"] and r.weights.method == "gptq"
    assert r.activations.bits == 4 and r.kv.bits == 4
    w16 = plan(program.model_map, r)
    assert any("W16 (weights in float)" in line for line in w16)


@pytest.mark.real
def test_smollm2_learned_rotations_fuse_exactly(smollm2_program, smollm2_ids, smollm2_logits):
    folded = fold_norms(smollm2_program)
    out = online_hadamard(spinquant(folded, calibration=smollm2_ids[:, :64], steps=2, batch=1, seq=64))
    assert max_rel_error(out.logits(smollm2_ids), smollm2_logits) <= TOL
    q = out.model_map.linears[out.model_map.blocks[0].attention.q.linear].weight
    assert (out.weight(q) - rotate(folded).weight(q)).abs().max() > 1e-4  # the steps moved R1 off the Hadamard
