"""A Program belongs to no device: captured on one, it runs on another; blockwise execution equals the whole graph.

The CPU tests use the meta device as the "other" device (no values, but every device constant left in a
graph or every weight left behind would show up as a device mismatch). Tests marked ``gpu`` need CUDA and
run on the lent GPU (``pytest -m gpu``); elsewhere they are skipped.
"""

import contextlib
import copy

import pytest
import torch

from qcompile.models import tiny
from qcompile.passes.calibrate import collect, linear_inputs
from qcompile.passes.quantize import quantize
from qcompile.pipeline import run_passes
from qcompile.program import Program
from qcompile.recipe import load_recipe

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def llama():
    model = tiny("llama")
    return model, Program.capture(model)


def _calib(n=6, seq=48, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ids():
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))


def _device_constants(gm):
    found = []
    for n in gm.graph.nodes:
        torch.fx.node.map_aggregate((n.args, n.kwargs), lambda a: found.append((n.name, a))
                                    if isinstance(a, torch.device) else a)
    return found


def test_captured_graph_holds_no_device(llama):
    _, p = llama
    assert _device_constants(p.module) == []
    # the factory ops now take the input's device
    aranges = [n for n in p.module.graph.nodes if n.target == torch.ops.aten.arange.default]
    assert aranges and all(n.kwargs["device"].target is getattr for n in aranges)


def test_capture_on_meta_then_run_on_cpu(llama):
    model, p = llama
    on_meta = Program.capture(copy.deepcopy(model).to("meta"))
    assert on_meta.device.type == "meta"
    same = lambda s: {k: v for k, v in s.items() if k != "tied"}  # noqa: E731  (ties are read from values)
    assert same(on_meta.model_map.summary()) == same(p.model_map.summary())
    on_meta.module.to_empty(device="cpu")
    ref = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    with torch.no_grad():
        for name, t in [*on_meta.module.named_parameters(), *on_meta.module.named_buffers()]:
            t.copy_(ref[name])
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    assert torch.allclose(on_meta.logits(_ids()), expected, atol=1e-5, rtol=1e-5)


def test_program_to_moves_weights_and_codes(llama):
    _, p = llama
    q = quantize(p, load_recipe("rtn"), progress=False).to("meta")
    assert q.device.type == "meta"
    assert all(t.device.type == "meta" for t in [*q.module.parameters(), *q.module.buffers()])
    assert q.quantized and all(qw.codes.device.type == "meta" and qw.weight.device.type == "meta"
                               for qw in q.quantized.values())
    assert q.logits(_ids()).device.type == "meta"  # the graph follows the weights, ids are moved there
    assert p.device.type == "cpu"  # the original is untouched


@pytest.mark.parametrize("batch", [6, 2])
def test_blockwise_gptq_equals_whole_graph(llama, batch):
    _, p = llama
    recipe = load_recipe("quarot+gptq").with_bits(group=32)
    calib = _calib()
    rotated = run_passes(p, recipe, calib)
    whole = quantize(rotated, recipe, calib, progress=False)
    blocks = quantize(rotated, recipe, calib, progress=False, device="cpu", batch=batch)
    assert set(whole.quantized) == set(blocks.quantized) and len(whole.quantized) == 14
    for name, qw in whole.quantized.items():
        other = blocks.quantized[name]
        # the same ops on the same values: per batch, Hessians are summed in the same order
        assert torch.equal(qw.codes, other.codes), name
        assert torch.allclose(qw.weight, other.weight, rtol=0, atol=1e-6), name
    assert torch.allclose(whole.logits(_ids()), blocks.logits(_ids()), atol=1e-5)
    # and the quantization did something (the weights are not the rotated ones)
    assert not torch.allclose(whole.logits(_ids()), rotated.logits(_ids()), atol=1e-3)


@pytest.mark.parametrize("a", [16, 4])
@pytest.mark.parametrize("device", ["cpu", None])
def test_gptq_quantizes_each_stage_as_one_stack(llama, monkeypatch, a, device):
    """q|k|v and gate|up read one value (with A4, each through its own fake quantization of it), hence share a
    Hessian: one GPTQ run over their stacked rows per stage, block by block and on the whole graph alike."""
    import qcompile.passes.quantize as qz

    _, p = llama
    recipe = load_recipe("gptq").with_bits(group=32, a=a)
    calls, real = [], qz._quantize_weight
    monkeypatch.setattr(qz, "_quantize_weight", lambda w, H, wq, name: calls.append((tuple(w.shape), name))
                        or real(w, H, wq, name))
    phases = {}
    q = quantize(p, recipe, _calib(), progress=False, device=device, batch=2, timings=phases)
    mm = p.model_map
    blocks = len(mm.blocks)
    assert len(calls) == 4 * blocks and len(q.quantized) == 7 * blocks
    at = mm.blocks[0].attention
    rows = sum(mm.linears[proj.linear].out_features for proj in (at.q, at.k, at.v))
    assert calls[0][0] == (rows, mm.hidden) and calls[0][1].count("+") == 2, calls[0]
    if device is not None:
        assert {"forward", "quantize", "stack", "store", "weights in", "weights out", "codes home"} <= set(phases)


def test_stacked_stages_equal_each_linear_alone(llama, monkeypatch):
    """The stacked path gives every linear the codes it gets quantized alone against the stage's Hessian."""
    import qcompile.passes.quantize as qz

    _, p = llama
    recipe = load_recipe("quarot+gptq").with_bits(group=32)
    calib = _calib()
    rotated = run_passes(p, recipe, calib)
    stacked = quantize(rotated, recipe, calib, progress=False, device="cpu", batch=2)
    real = qz.quantize_blockwise
    monkeypatch.setattr(qz, "quantize_blockwise", lambda *a, rows_of=None, quantize_rows=None, **k: real(*a, **k))
    alone = quantize(rotated, recipe, calib, progress=False, device="cpu", batch=2)
    assert set(stacked.quantized) == set(alone.quantized)
    for name, qw in alone.quantized.items():
        assert torch.equal(qw.codes, stacked.quantized[name].codes), name
        assert torch.equal(qw.weight, stacked.quantized[name].weight), name


def test_blockwise_statistics_equal_whole_graph(llama):
    _, p = llama
    watch = linear_inputs(p)
    calib = _calib()
    whole = collect(p, calib, watch, batch=2, keep_tokens=50, progress=False, whole_graph=True)
    blocks = collect(p, calib, watch, batch=2, keep_tokens=50, progress=False, device="cpu")
    default = collect(p, calib, watch, batch=2, keep_tokens=50, progress=False)  # block by block, no logits
    assert all(torch.equal(default[n].kept(), blocks[n].kept()) for n in watch)
    assert set(whole) == set(blocks) == set(watch)
    for n, s in whole.items():
        b = blocks[n]
        assert torch.equal(s.absmax, b.absmax) and torch.equal(s.sumsq, b.sumsq) and s.tokens == b.tokens
        assert torch.equal(s.kept(), b.kept())


def test_blockwise_runs_where_attention_is_not_matched():
    """DeepSeek-V3's latent attention is not proved by the matcher: the memory plan must not need its heads."""
    model = tiny("deepseek_v3")
    program = Program.capture(model)
    assert program.model_map.blocks[0].attention is None
    out = quantize(program, load_recipe("gptq").with_calibration(2, 32), _calib(2, 32), progress=False, device="cpu")
    assert "block by block" in " ".join(line for r in out.reports for line in r.lines())


def test_blockwise_refuses_nan_naming_the_node(llama):
    _, p = llama
    bad = p.clone()
    w = bad.model_map.linears[bad.model_map.blocks[0].attention.o].weight
    bad.set_weight(w, torch.full_like(bad.weight(w), float("nan")))
    from qcompile.errors import CalibrationError

    with pytest.raises(CalibrationError, match="linear|mlp|node"):
        collect(bad, _calib(), linear_inputs(bad), progress=False, device="cpu")


# --- on the GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
def test_capture_on_cuda_matches_the_model():
    model = tiny("llama").cuda()
    p = Program.capture(model)
    assert _device_constants(p.module) == []
    with torch.no_grad():
        expected = model(input_ids=_ids().cuda()).logits
    got = p.logits(_ids().cuda())
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
    # and the same graph runs on the CPU
    assert torch.allclose(p.clone().to("cpu").logits(_ids()), expected.cpu(), atol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("recipe", ["quarot+gptq", "duquant+gptq", "smoothquant", "osplus+gptq",
                                    "spinquant-cpu", "leanquant", "duquant-fused"])
def test_recipes_run_on_cuda_like_on_cpu(llama, recipe):
    from qcompile.passes.lower import lower

    _, p = llama
    r = load_recipe(recipe).with_bits(group=32)
    calib = _calib(n=4, seq=64)
    cpu = quantize(run_passes(p, r, calib), r, calib if r.weights.method != "rtn" else None, progress=False)
    on_gpu = p.clone().to("cuda")
    cuda = quantize(run_passes(on_gpu, r, calib), r, calib if r.weights.method != "rtn" else None, progress=False)
    a, b = cpu.logits(_ids()), cuda.logits(_ids()).cpu()
    assert torch.isfinite(b).all()
    ref = p.logits(_ids())
    # searches and learned rotations (DuQuant's greedy, OS+'s grid, SpinQuant) can take another path on a
    # near-tie under another device's rounding: there, the quantization error must be as small, not identical
    assert (b - ref).abs().mean() < 1.5 * (a - ref).abs().mean() + 1e-3, recipe
    if recipe in ("quarot+gptq", "smoothquant", "leanquant"):
        assert ((a - b).abs().mean() / a.abs().mean()).item() < 0.05, recipe
    low = lower(cuda)
    assert torch.isfinite(low.logits(_ids())).all()


@pytest.mark.gpu
@gpu
def test_blockwise_on_cuda_keeps_weights_on_cpu(llama):
    _, p = llama
    recipe = load_recipe("quarot+gptq").with_bits(group=32)
    calib = _calib()
    rotated = run_passes(p, recipe, calib)
    whole = quantize(rotated, recipe, calib, progress=False)
    blocks = quantize(rotated, recipe, calib, progress=False, device="cuda", batch=2)
    assert blocks.device.type == "cpu"
    assert all(qw.codes.device.type == "cpu" for qw in blocks.quantized.values())
    same = sum(int(torch.equal(whole.quantized[k].codes, blocks.quantized[k].codes)) for k in whole.quantized)
    diff = max(float((whole.quantized[k].weight - blocks.quantized[k].weight).abs().mean()) for k in whole.quantized)
    assert same >= len(whole.quantized) // 2 and diff < 1e-3


@pytest.mark.gpu
@gpu
def test_blockwise_weights_return_into_their_host_memory(llama):
    """A block's weights go back into the very host tensors they left (changed ones copied in, the others only
    pointed at again: no fresh host memory), and a quantized weight's dequantized values are the Program's
    weight itself, not a second copy."""
    from qcompile.passes.blockwise import BlockRunner

    _, p = llama
    q = p.clone()
    runner = BlockRunner(q, "cuda")
    names = runner.segments.attrs[1]
    before = {t: (q.weight(t).data_ptr(), q.weight(t).detach().clone()) for t in names}
    w = q.model_map.linears[q.model_map.blocks[1].attention.o].weight
    home = runner.load(1)
    assert all(q.weight(t).device.type == "cuda" for t in names)
    q.set_weight(w, q.weight(w) * 2)
    runner.unload(home, changed={w})
    for t, (ptr, value) in before.items():
        assert q.weight(t).device.type == "cpu" and q.weight(t).data_ptr() == ptr, t
        assert torch.equal(q.weight(t), value * 2 if t == w else value), t
    recipe = load_recipe("quarot+gptq").with_bits(group=32)
    calib = _calib()
    blocks = quantize(run_passes(p, recipe, calib), recipe, calib, progress=False, device="cuda", batch=2)
    for name, qw in blocks.quantized.items():
        assert qw.weight.untyped_storage().data_ptr() == blocks.weight(name).untyped_storage().data_ptr(), name
        assert torch.equal(qw.weight, blocks.weight(name).reshape(qw.weight.shape))


@pytest.mark.gpu
@gpu
def test_passes_computed_on_cuda_leave_the_program_on_the_host(llama):
    """QuaRot's and SpinQuant's weight passes on a host Program with each weight computed on the GPU
    (``weights.computed_on``) give the weights of the same passes run with the whole Program on the GPU: QuaRot's
    bit for bit; SpinQuant's (learned on the GPU block by block under checkpointing, in both runs: attention's
    backward may add in any order) to float rounding. The Program never leaves the host."""
    from qcompile.passes import weights
    from qcompile.passes.fold_norms import fold_norms
    from qcompile.passes.spinquant import spinquant

    _, p = llama
    calib = _calib(n=4, seq=64)
    runs = {}
    for where in ("gpu", "host"):
        src = p.clone().to("cuda") if where == "gpu" else p.clone()
        with weights.computed_on("cuda") if where == "host" else contextlib.nullcontext():
            quarot = run_passes(src, load_recipe("quarot"), None, progress=False)
            spin = spinquant(fold_norms(src), calibration=calib, steps=2, batch=2, seq=64, progress=False)
        runs[where] = (quarot, spin)
    for exact, gpu_run, host_run in zip((True, False), runs["gpu"], runs["host"]):
        assert host_run.device.type == "cpu"
        for name, w in gpu_run.module.named_parameters():
            if exact:
                assert torch.equal(w.cpu(), host_run.weight(name)), name
            else:
                assert ((w.cpu() - host_run.weight(name)).abs().max() <= 1e-5 * w.abs().max() + 1e-7), name
