"""fuse_linears: shared-input INT4 linears become one op with the same outputs (float rounding), the duplicate
activation quantizations merge, and linears that differ in what they compute stay apart."""

import pytest
import torch

import qcompile.api as qc
from qcompile.models import tiny
from qcompile.passes.fuse_linears import _fused_name, fuse_linears
from qcompile.passes.lower import lower
from qcompile.recipe import load_recipe

from conftest import max_rel_error

qops = torch.ops.qcompile
LINEARS = (qops.linear_w4a16.default, qops.linear_w4a8.default, qops.linear_w4a4.default)


def _count(program, targets):
    return sum(1 for n in program.module.graph.nodes if n.op == "call_function" and n.target in targets)


# (arch, activation bits, weight group, asymmetric): W4A16 g32 asym (qwen2: q/k/v biases), W4A8, W4A4 + R4
@pytest.mark.parametrize("arch,a,group,asym", [("llama", 16, 32, True), ("qwen2", 16, 32, True),
                                               ("llama", 8, None, False), ("llama", 4, 32, True)])
def test_fused_program_computes_the_same_logits(arch, a, group, asym, tiny_ids):
    model = tiny(arch)
    recipe = load_recipe("quarot").with_bits(a=a, kv=16, group=group, symmetric=False if asym else None)
    low = lower(qc.compile(qc.capture(model), recipe, None, progress=False))
    fused = fuse_linears(low)
    layers = len(low.model_map.blocks)
    assert _count(low, LINEARS) == 7 * layers
    assert _count(fused, LINEARS) == 4 * layers  # q|k|v, o, gate|up, down
    if a < 16:  # one activation quantization for q|k|v and one for gate|up
        assert _count(fused, [qops.quantize_per_token.default]) == 4 * layers
    assert max_rel_error(fused.logits(tiny_ids), low.logits(tiny_ids)) < 1e-5
    names = {n for n, _ in fused.module.named_parameters()}
    assert "model.layers.0.self_attn.q_proj_k_proj_v_proj.weight_packed" in names
    assert "model.layers.0.self_attn.q_proj.weight_packed" not in names  # the per-linear copies are gone
    assert fuse_linears(fused).reports[-1].counts == {}  # nothing left to fuse


def test_different_group_sizes_stay_apart(tiny_ids):
    """Linears on one input but with different grids cannot share one op."""
    model = tiny("llama")
    low = lower(qc.compile(qc.capture(model), load_recipe("rtn").with_bits(a=16, kv=16, group=32), None,
                           progress=False))
    q = next(n for n in low.module.graph.nodes if n.op == "call_function" and n.target in LINEARS
             and n.args[1].target == "model.layers.0.self_attn.q_proj.weight_packed")
    q.args = q.args[:4] + (16,) + q.args[5:]  # relabel q_proj's group size: only k|v may fuse now
    sites = fuse_linears(low).reports[-1].sites
    assert "2 linears → 1: model.layers.0.self_attn.k_proj_v_proj.weight" in sites
    assert "3 linears → 1: model.layers.1.self_attn.q_proj_k_proj_v_proj.weight" in sites


def test_fused_names_keep_their_sources():
    assert _fused_name(["m.l.0.mlp.gate_proj.weight", "m.l.0.mlp.up_proj.weight"]) == "m.l.0.mlp.gate_proj_up_proj.weight"
