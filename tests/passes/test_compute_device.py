"""Weight passes computed on another device than the Program's (``weights.computed_on``), and SpinQuant's loss
block by block under activation checkpointing: the same weights, loss and gradients as the plain paths."""

import pytest
import torch

from qcompile.models import tiny
from qcompile.passes import weights
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.rotate import fuse_rotations, prepare_rotations
from qcompile.passes.spinquant import (BlockwiseForward, _loss, _training_program, _weight_spec, learn_rotations,
                                       spinquant)
from qcompile.pipeline import run_passes
from qcompile.program import PassReport, Program
from qcompile.recipe import load_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2", "opt"])  # biases (qwen2), LayerNorm centring (opt)
def program(request):
    return Program.capture(tiny(request.param))


def _calib(n=4, seq=32):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(2))


def _params(p: Program) -> dict:
    return {k: v.detach() for k, v in p.module.named_parameters()}


def test_computed_on_the_programs_own_device_is_the_plain_path(program):
    """``computed_on("cpu")`` on a host Program: bit for bit the weights of the plain path (QuaRot's passes, and
    SpinQuant's learning and fusion)."""
    recipe = load_recipe("quarot")
    plain = run_passes(program, recipe, None, progress=False)
    spin = spinquant(fold_norms(program), calibration=_calib(), steps=2, batch=2, seq=32, progress=False)
    with weights.computed_on("cpu"):
        inside = run_passes(program, recipe, None, progress=False)
        spin_inside = spinquant(fold_norms(program), calibration=_calib(), steps=2, batch=2, seq=32, progress=False)
    for a, b in ((plain, inside), (spin, spin_inside)):
        pa, pb = _params(a), _params(b)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k


def test_reads_go_to_the_compute_device(program):
    name = program.model_map.linears[program.model_map.lm_head].weight
    with weights.computed_on("meta"):
        w = weights.read(program, name)
        assert w.device.type == "meta" and w.dtype == torch.float64
    assert weights.read(program, name).device.type == "cpu"  # outside: where the weight is
    assert program.weight(name).device.type == "cpu"


def test_fuse_rotations_writes_each_weight_before_reading_the_next(program, monkeypatch):
    """The fusion streams: one weight read, rotated and written back at a time (so a compute device holds one
    weight, not the model)."""
    p = fold_norms(program)
    q1, q2 = prepare_rotations(p, "hadamard", 0, True, True, PassReport("test"))
    events = []
    read, set_weight = weights.read, p.set_weight
    monkeypatch.setattr(weights, "read", lambda prog, name: (events.append(("read", name)), read(prog, name))[1])
    monkeypatch.setattr(p, "set_weight", lambda name, v: (events.append(("write", name)), set_weight(name, v))[1])
    fuse_rotations(p, q1, q2, PassReport("test"))
    assert events and all(events[i][0] == "read" and events[i + 1] == ("write", events[i][1])
                          for i in range(0, len(events), 2))


def _loss_and_grads(t, forward, q1, q2, ids, spec, targets):
    rs = [r.clone().requires_grad_() for r in (q1, *q2)]
    loss = _loss(t, forward, rs[0], rs[1:], ids, spec, targets)
    loss.backward()
    return loss.detach(), [r.grad for r in rs]


@pytest.mark.parametrize("bits", [4, 16])
def test_checkpointed_blocks_give_the_whole_graphs_loss_and_gradients(program, bits):
    """Block by block under ``torch.utils.checkpoint``: the loss equals the whole graph's bit for bit, so do the
    R2 gradients; R1's (a sum over every weight's contribution, in another order) to float64 rounding; and
    checkpointing itself changes nothing (the same as the block-by-block forward without it)."""
    p = fold_norms(program)
    q1, q2 = prepare_rotations(p, "hadamard", 0, True, True, PassReport("test"))
    t, targets, whole = _training_program(p, bits, bits, True, True)
    spec = _weight_spec(bits)
    ids = _calib(2)
    ref_loss, ref = _loss_and_grads(t, whole, q1, q2, ids, spec, targets)
    seg_loss, seg = _loss_and_grads(t, BlockwiseForward(t, checkpoint=False), q1, q2, ids, spec, targets)
    ck_loss, ck = _loss_and_grads(t, BlockwiseForward(t, checkpoint=True), q1, q2, ids, spec, targets)
    assert torch.equal(ref_loss, ck_loss) and torch.equal(seg_loss, ck_loss)
    assert all(torch.equal(a, b) for a, b in zip(seg, ck))
    assert all(torch.equal(a, b) for a, b in zip(ref[1:], ck[1:]))
    assert ((ref[0] - ck[0]).abs().max() / ref[0].abs().max()).item() < 1e-12
    assert ref[0].abs().max() > 0


def test_learning_with_checkpoints_follows_the_plain_learning(program):
    p = fold_norms(program)
    q1, q2 = prepare_rotations(p, "hadamard", 0, True, True, PassReport("test"))
    a = learn_rotations(p, q1, q2, _calib(), steps=3, batch=2, seq=32, progress=False, checkpoint=False)
    b = learn_rotations(p, q1, q2, _calib(), steps=3, batch=2, seq=32, progress=False, checkpoint=True)
    assert a.losses[0] == b.losses[0] and len(b.seconds) == 3
    for x, y in zip([a.r1, *a.r2], [b.r1, *b.r2]):
        assert (x - y).abs().max() < 1e-9
