"""Routed experts: per-expert Hessians from the tokens routed to each, GPTQ/LeanQuant per expert, RTN for the
experts no calibration token reaches (reported), blockwise and whole-graph paths, INT4 lowering."""

import pytest
import torch

from conftest import max_rel_error
from qcompile.models import tiny
from qcompile.passes import experts as moe
from qcompile.passes.lower import lower
from qcompile.passes.quantize import quantize
from qcompile.program import Program
from qcompile.quant.rtn import rtn_quantize
from qcompile.recipe import load_recipe

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def _calib(n=4, seq=32, seed=2):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def moe_programs():
    return {}


def _program(cache, arch):
    if arch not in cache:
        model = tiny(arch)
        cache[arch] = (model, Program.capture(model))
    return cache[arch]


def _routed_by_hand(model, calib):
    """{layer: (x [T, H], top-k expert ids [T, k], experts module)} from transformers' own MoE forward."""
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue

        def hook(mod, args, i=i):
            hidden, index, _ = args
            seen[i] = (hidden.detach().clone(), index.detach().clone(), mod)

        hooks.append(experts.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=calib)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("arch", MOE)
def test_per_expert_hessian_is_xe_t_xe_of_the_routed_tokens(arch, moe_programs):
    """H_e of gate_up is 2/n_e·X_eᵀX_e with X_e the tokens transformers routes to e; the down projection's is the
    same of act(X_e W_gateᵀ)·(X_e W_upᵀ): checked against a hand computation on every MoE layer."""
    model, p = _program(moe_programs, arch)
    calib = _calib()
    by_hand = _routed_by_hand(model, calib)
    hessians = moe.expert_hessians(p, calib)
    blocks = [b for b in p.model_map.blocks if b.ffn is not None and b.ffn.experts]
    assert len(blocks) == len(by_hand) > 0
    for b, (x, index, mod) in zip(blocks, by_hand.values()):
        gate_up, down = hessians[b.ffn.up.linear], hessians[b.ffn.down]
        for e in range(b.ffn.experts):
            xe = x[(index == e).any(-1)].double()
            assert gate_up.tokens[e] == down.tokens[e] == xe.shape[0]
            if not xe.shape[0]:
                assert gate_up.hessian(e) is None
                continue
            torch.testing.assert_close(gate_up.hessian(e).double(), 2 / xe.shape[0] * xe.T @ xe, rtol=1e-5, atol=1e-6)
            g, u = (xe @ mod.gate_up_proj[e].double().T).chunk(2, dim=-1)
            he = mod.act_fn(g) * u
            torch.testing.assert_close(down.hessian(e).double(), 2 / he.shape[0] * he.T @ he, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def starved():
    """DeepSeek-V3 with a correction bias that keeps expert 3 of the MoE layer out of every top-k (and, with
    n_group = 2 and topk_group = 1, its whole group: experts 2 and 3 get no token)."""
    model = tiny("deepseek_v3")
    router = model.model.layers[1].mlp.gate
    router.e_score_correction_bias[3] = -10.0
    return model, Program.capture(model)


def test_experts_without_tokens_fall_back_to_rtn_and_are_reported(starved):
    model, p = starved
    calib = _calib()
    (x, index, _), = _routed_by_hand(model, calib).values()
    empty = [e for e in range(model.config.n_routed_experts) if not (index == e).any()]
    assert 3 in empty
    counts = moe.routed_tokens(p, calib)
    ffn = p.model_map.blocks[1].ffn
    weights = [p.model_map.linears[n].weight for n in (ffn.up.linear, ffn.down)]
    assert all([e for e, t in enumerate(counts[w]) if t == 0] == empty for w in weights)
    plan = moe.plan_lines(counts)
    assert all(any(w in line and f"RTN for expert(s) {empty}" in line for line in plan) for w in weights)

    q = quantize(p, load_recipe("gptq"), calib, progress=False)
    report = q.reports[-1]
    assert sorted(s for s, _ in report.skipped) == sorted(moe.expert_site(w, e) for w in weights for e in empty)
    assert all("no calibration token" in why for _, why in report.skipped)
    assert report.counts["RTN experts (no routed token)"] == len(weights) * len(empty)
    wq = load_recipe("gptq").weights
    for w in weights:
        src = p.weight(w).detach().float()
        got = q.weight(w).detach()
        for e in range(src.shape[0]):
            rtn = rtn_quantize(src[e], wq.spec, clip_search=wq.clip_search).weight
            assert torch.equal(got[e], rtn) == (e in empty), (w, e)  # RTN exactly where no token came


@pytest.mark.parametrize("method", ["gptq", "leanquant"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_per_expert_gptq_beats_rtn_on_every_expert_layer(arch, method, moe_programs):
    """Σ_e ‖X_e W_eᵀ − X_e Ŵ_eᵀ‖² = Σ_e n_e/2·tr(Δ_e H_e Δ_eᵀ) on the calibration tokens, H_e from the float model:
    per-expert GPTQ/LeanQuant lower it below RTN's (with RTN's clip search) on every expert weight."""
    _, p = _program(moe_programs, arch)
    calib = _calib()
    hessians = moe.expert_hessians(p, calib)
    rtn = quantize(p, load_recipe("rtn"), progress=False)
    ours = quantize(p, load_recipe(method), calib, progress=False)
    assert ours.reports[-1].counts[f"{method} experts (own routed tokens)"] == sum(
        h.lin.experts for h in hessians.values())

    def error(q, h):
        w = p.weight(h.lin.weight).detach().double()
        d = q.weight(h.lin.weight).detach().double() - w
        return sum(n / 2 * torch.trace(d[e] @ h.hessian(e).double() @ d[e].T).item()
                   for e, n in enumerate(h.tokens) if n)

    for h in hessians.values():
        assert error(ours, h) < 0.8 * error(rtn, h), h.lin.weight


def test_blockwise_quantizes_experts_on_their_own_tokens_too(moe_programs):
    """With ``device`` the experts are quantized block by block after the dense linears; the first MoE layer's
    inputs are then the same as in the whole-graph run (every dense linear before it is quantized in both), so
    its experts' weights agree."""
    _, p = _program(moe_programs, "mixtral")
    calib = _calib(n=2)
    whole = quantize(p, load_recipe("gptq"), calib, progress=False)
    blocks = quantize(p, load_recipe("gptq"), calib, progress=False, device="cpu", batch=4)
    assert blocks.reports[-1].counts["gptq experts (own routed tokens)"] == whole.reports[-1].counts[
        "gptq experts (own routed tokens)"]
    first = p.model_map.blocks[0].ffn
    for n in (first.up.linear, first.down):
        w = p.model_map.linears[n].weight
        torch.testing.assert_close(blocks.weight(w), whole.weight(w), rtol=0, atol=1e-5)
        assert not torch.equal(blocks.weight(w), p.weight(w))


@pytest.mark.parametrize("recipe", ["gptq", "quarot"])
@pytest.mark.parametrize("arch", MOE)
def test_lowered_experts_are_int4_ops_with_the_fake_quantized_logits(arch, recipe, moe_programs, tiny_ids):
    _, p = _program(moe_programs, arch)
    q = quantize(p, load_recipe(recipe), _calib(n=2, seq=16), progress=False)
    low = lower(q)
    experts = [n for n, lin in p.model_map.linears.items() if lin.experts]
    op = {"gptq": "grouped_linear_w4a16", "quarot": "grouped_linear_w4a4"}[recipe]  # quarot: A4 per token
    grouped = [n for n in low.module.graph.nodes if n.target == getattr(torch.ops.qcompile, op).default]
    assert len(grouped) == len(experts) and not low.reports[-1].skipped
    assert not any("grouped_mm" in str(n.target) for n in low.module.graph.nodes)
    assert max_rel_error(low.logits(tiny_ids), q.logits(tiny_ids)) < 1e-5


def test_hessians_from_rows_equal_streamed_ones_and_release_them():
    from qcompile.analysis.modelmap import Linear

    lin = Linear("n", "w", None, 8, 3, experts=3)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    rows = moe.ExpertHessians.from_rows(lin, x, offs)
    streamed = moe.ExpertHessians(lin)
    streamed.add(x[:6], torch.tensor([4, 4, 6]))  # two batches: the second has expert 2's last 4 rows
    streamed.add(x[6:], torch.tensor([0, 0, 4]))
    assert rows.tokens == streamed.tokens == [4, 0, 6]
    for e in (0, 2):
        torch.testing.assert_close(rows.hessian(e), streamed.hessian(e))
        torch.testing.assert_close(rows.hessian(e), 2 / rows.tokens[e] * x[offs[e] - rows.tokens[e]:offs[e]].T
                                   @ x[offs[e] - rows.tokens[e]:offs[e]])
    assert rows.hessian(1) is None and streamed.acc[1] is None  # no accumulator for an expert without rows
    streamed.release(0)
    rows.release(0)
    assert streamed.acc[0] is None and rows.rows[0] is None
