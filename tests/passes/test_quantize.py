"""The quantize pass: placement of fake-quant ops, sequential GPTQ/LeanQuant, determinism, refusals."""

import pytest
import torch

from qcompile.errors import CalibrationError, RecipeError
from qcompile.passes.quantize import quantize
from qcompile.pipeline import run_passes
from qcompile.recipe import load_recipe


def _calib(n=4, seq=32, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _fake_quant_nodes(p):
    return [n for n in p.module.graph.nodes if "qcompile.fake_quant" in str(n.target)]


@pytest.mark.parametrize("recipe", ["rtn", "gptq", "leanquant", "leanquant-nu", "quarot", "quarot+gptq"])
def test_quantized_weights_lie_on_their_grid(recipe, tiny_programs):
    _, p = tiny_programs["llama"]
    r = load_recipe(recipe)
    q = quantize(run_passes(p, r), r, _calib())
    mm = q.model_map
    quantized = [mm.linears[n].weight for n in mm.linears if n != mm.lm_head]
    assert sorted(q.quantized) == sorted(quantized)
    for name in quantized:
        qw = q.quantized[name]
        levels = qw.weight.unique(dim=None).numel()
        assert torch.equal(q.weight(name), qw.weight.reshape(q.weight(name).shape))
        assert qw.codes.max() < 2 ** r.weights.bits
        assert levels <= qw.weight.shape[0] * 2 ** r.weights.bits
    head = mm.linears[mm.lm_head].weight
    assert head not in q.quantized


def test_activation_and_kv_quant_ops_are_placed(tiny_programs):
    _, p = tiny_programs["llama"]
    r = load_recipe("quarot")
    q = quantize(run_passes(p, r), r)
    nodes = _fake_quant_nodes(q)
    layers = len(p.model_map.blocks)
    assert len(nodes) == 7 * layers + 2 * layers  # 7 linear inputs and K, V per layer
    attn = {b.attention.node for b in q.model_map.blocks}
    kv = [n for n in nodes if any(u.name in attn for u in n.users)]
    assert len(kv) == 2 * layers and all(n.args[1] == 4 and n.args[2] is False for n in kv)


def test_gptq_beats_rtn_on_the_model_output(tiny_programs, tiny_ids):
    model, p = tiny_programs["opt"]
    ref = model(input_ids=tiny_ids).logits
    err = {}
    for name in ("rtn", "gptq"):
        r = load_recipe(name)
        q = quantize(p, r, _calib(16, 64))
        err[name] = (q.logits(tiny_ids) - ref).norm().item()
    assert err["gptq"] < err["rtn"]


def test_same_seed_gives_bit_identical_weights(tiny_programs):
    _, p = tiny_programs["qwen2"]
    r = load_recipe("leanquant")
    a = quantize(p, r, _calib(seed=5), progress=False)
    b = quantize(p, r, _calib(seed=5), progress=False)
    c = quantize(p, r, _calib(seed=6), progress=False)
    assert all(torch.equal(a.quantized[k].codes, b.quantized[k].codes) for k in a.quantized)
    assert any(not torch.equal(a.quantized[k].codes, c.quantized[k].codes) for k in a.quantized)


def test_nan_in_calibration_is_refused_naming_the_layer(tiny_programs):
    _, p = tiny_programs["llama"]
    broken = p.clone()
    emb = broken.model_map.embedding.weight
    w = broken.weight(emb).detach().clone()
    w[3] = float("nan")
    broken.set_weight(emb, w)
    calib = _calib()
    calib[0, 5] = 3
    with pytest.raises(CalibrationError, match=r"NaN|nan"):
        quantize(broken, load_recipe("gptq"), calib)


def test_calibrated_method_without_data_is_refused(tiny_programs):
    _, p = tiny_programs["llama"]
    with pytest.raises(RecipeError, match="calibration"):
        quantize(p, load_recipe("gptq"))


def test_gptq_quantizes_stacked_experts_one_by_one(tiny_programs):
    """Each routed expert on its own Hessian (tests/passes/test_experts.py checks the Hessians and the fallback)."""
    _, p = tiny_programs["mixtral"]
    out = quantize(p, load_recipe("gptq"), _calib())
    report = out.reports[-1]
    experts = {lin.weight: lin.experts for lin in p.model_map.linears.values() if lin.experts}
    assert set(experts) <= set(out.quantized) and not report.skipped
    assert report.counts["gptq experts (own routed tokens)"] == sum(experts.values())


@pytest.mark.real
def test_gptq_and_leanquant_on_a_real_hessian(smollm2, smollm2_program):
    """On SmolLM2's own down_proj inputs: GPTQ's layer error < RTN's; LeanQuant's grid has a weighted
    error ≤ the min/max grid's and its layer error < RTN's."""
    from qcompile.eval.data import VALID, calibration_windows, token_ids
    from qcompile.passes.calibrate import collect
    from qcompile.quant.formats import Granularity, QuantSpec, compute_qparams, dequantize, quantize
    from qcompile.quant.gptq import HessianAccumulator, damped_inverse_cholesky, gptq_quantize
    from qcompile.quant.leanquant import affine_grid, leanquant_quantize, loss_error_weights
    from qcompile.quant.rtn import rtn_quantize

    _, tok = smollm2
    p = smollm2_program
    down = p.model_map.blocks[3].ffn.down
    windows = calibration_windows(token_ids(tok, VALID), 2, 256, seed=0)
    x = collect(p, windows, {down: 0}, keep_tokens=512, progress=False)[down].kept()
    acc = HessianAccumulator(x.shape[1], name="down")
    acc.add(x)
    H = acc.hessian()
    W = p.weight(p.model_map.linears[down].weight).detach().float()
    spec = QuantSpec(4, False, Granularity.GROUP, 128)

    def out_err(q):
        return (x @ (W - q.weight).T).pow(2).sum().item()

    rtn, gptq = rtn_quantize(W, spec, clip_search=False), gptq_quantize(W, H, spec)
    assert out_err(gptq) < out_err(rtn)
    # the loss-error-aware grid (fitted before the GPTQ loop) has a d^(-p)-weighted rounding error no
    # larger than the min/max grid's, on this real Hessian's Cholesky diagonal d
    d = damped_inverse_cholesky(H).diagonal()
    weights = loss_error_weights(d)
    lean_grid = affine_grid(spec)(W, d)
    minmax_s, minmax_z = compute_qparams(W, spec, torch.float16)

    def weighted(s, z):
        q = dequantize(quantize(W, s, z, spec), s, z, spec)
        return ((W - q).pow(2) * weights).sum().item()

    assert weighted(lean_grid.scales, lean_grid.zeros) <= weighted(minmax_s, minmax_z)
    lean = leanquant_quantize(W, H, spec, act_order=False)
    assert out_err(lean) < out_err(rtn)


def test_sequential_gptq_computes_twin_fake_quants_once_and_stops_after_the_last_linear(tiny_programs, monkeypatch):
    """Equal activation fake quantizations (q/k/v, gate/up) are computed once per run and the nodes after the last
    quantized linear (the lm_head) never run; the weights are those of a run that computes every node."""
    import qcompile.passes.quantize as qp

    _, p = tiny_programs["llama"]
    r = load_recipe("quarot+gptq").with_bits(a=4)
    calib = _calib()
    ran = []
    real = qp._SequentialQuantizer.run_node
    monkeypatch.setattr(qp._SequentialQuantizer, "run_node",
                        lambda self, n: ran.append(n) or real(self, n))
    fast = quantize(run_passes(p, r), r, calib)
    fq = [n for n in ran if "qcompile.fake_quant" in str(n.target)]
    distinct = {qp.shared_input(n) for n in fq}
    assert len(distinct) < len(fq)  # twins were met...
    head = fast.model_map.lm_head
    assert head not in {n.name for n in ran}  # ...and the lm_head never ran

    monkeypatch.setattr(qp._SequentialQuantizer, "run_node", real)
    monkeypatch.setattr(qp._SequentialQuantizer, "finished", lambda self: False)  # every node runs
    monkeypatch.setattr(qp, "shared_input", lambda n: n)  # every node its own: no twin shared
    full = quantize(run_passes(p, r), r, calib)
    assert sorted(full.quantized) == sorted(fast.quantized)
    assert all(torch.equal(full.quantized[k].codes, q.codes) for k, q in fast.quantized.items())
    assert all(torch.equal(x, y) for x, y in zip(full.module.state_dict().values(), fast.module.state_dict().values()))
