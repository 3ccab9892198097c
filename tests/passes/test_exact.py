"""Every equivalence-preserving pass keeps the logits (float32, max|Δ| ≤ 1e-4·max|logits|) and does rewrite."""

import pytest
import torch

from conftest import max_rel_error
from qcompile.errors import UnsafeRewriteError
from qcompile.models import TINY_ARCHS
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.online_hadamard import online_hadamard
from qcompile.passes.rotate import rotate

TOL = 1e-4
CHAINS = {
    "fold": lambda p: fold_norms(p),
    "fold+rotate": lambda p: rotate(fold_norms(p)),
    "fold+rotate(orthogonal)": lambda p: rotate(fold_norms(p), kind="orthogonal", seed=3),
    "fold+R1only": lambda p: rotate(fold_norms(p), r2=False),
    "fold+R2only": lambda p: rotate(fold_norms(p), r1=False),
    "online": lambda p: online_hadamard(p),
    "fold+rotate+online": lambda p: online_hadamard(rotate(fold_norms(p))),
}


def _hadamard_nodes(p):
    return sum(1 for n in p.module.graph.nodes if "qcompile.hadamard" in str(n.target))


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_stay_exact(arch, chain, tiny_programs, tiny_ids):
    model, program = tiny_programs[arch]
    with torch.no_grad():
        ref = model(input_ids=tiny_ids).logits
    out = CHAINS[chain](program)
    assert max_rel_error(out.logits(tiny_ids), ref) <= TOL
    # the pass really rewrote something: the original program is untouched, the new one differs
    assert max_rel_error(program.logits(tiny_ids), ref) == 0.0
    q = out.model_map.linears[out.model_map.blocks[0].attention.q.linear]
    changed = (out.weight(q.weight) - program.weight(program.model_map.linears[q.node].weight)).abs().max()
    if chain != "online" and "R2only" not in chain:
        assert changed > 1e-3
    layers = len(program.model_map.blocks)
    assert _hadamard_nodes(out) == (3 * layers if "online" in chain else 0)


def test_rotate_refuses_unfolded_norms(tiny_programs):
    _, p = tiny_programs["llama"]
    with pytest.raises(UnsafeRewriteError, match="fold_norms"):
        rotate(p)


def test_reports_count_the_sites(tiny_programs):
    _, p = tiny_programs["opt"]
    out = online_hadamard(rotate(fold_norms(p)))
    counts = {r.name: r.counts for r in out.reports}
    assert counts["fold_norms"]["folded norm"] == 5
    assert counts["fold_norms"]["untied embedding"] == 1
    assert counts["rotate"]["R1 writer"] == 4 and counts["rotate"]["R1 embedding"] == 2
    assert counts["online_hadamard"]["R4 down input"] == 2


@pytest.mark.real
def test_smollm2_stays_exact_after_each_pass(smollm2_program, smollm2_ids, smollm2_logits):
    ref = smollm2_logits
    p = smollm2_program
    assert max_rel_error(p.logits(smollm2_ids), ref) == 0.0
    for step in (fold_norms, rotate, online_hadamard):
        p = step(p)
        assert max_rel_error(p.logits(smollm2_ids), ref) <= TOL, step.__name__
    assert _hadamard_nodes(p) == 90
    assert not p.model_map.tied
