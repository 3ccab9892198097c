"""ONNX export: each bit setting exported → onnx.checker → onnxruntime → parity with the lowered PyTorch
program; KV-cache decoding = full-sequence scoring; onnxruntime-genai runs the folder; refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

import qcompile.api as qc
from qcompile.errors import ExportError
from qcompile.export.onnx import META_MODEL, META_RECIPE, export_onnx
from qcompile.export.runtime import OrtModel, genai_generate
from qcompile.decoding import generate
from qcompile.models import tiny
from qcompile.passes.lower import lower
from qcompile.passes.quantize import quantize
from qcompile.recipe import load_recipe

# (activation bits, weight group, asymmetric weights, KV bits, int8 path): W4A16 g32 asym; W4A8 per-channel;
# W4A4 g32 + KV4; the A8/A4 settings through MatMulInteger (exact int8) and MatMulNBits
SETTINGS = {"w4a16": (16, 32, True, 16, "matmulinteger"), "w4a8": (8, None, False, 16, "matmulinteger"),
            "w4a4kv4": (4, 32, True, 4, "matmulinteger"), "w4a8-nbits": (8, None, False, 16, "matmulnbits"),
            "w4a4kv4-nbits": (4, 32, True, 4, "matmulnbits")}


def _lowered(name):
    a, g, asym, kv, _ = SETTINGS[name]
    model = tiny("llama")
    recipe = load_recipe("quarot").with_bits(a=a, kv=kv, group=g, symmetric=False if asym else None)
    return model, recipe, lower(qc.compile(qc.capture(model), recipe, None, progress=False))


@pytest.fixture(scope="module", params=list(SETTINGS))
def exported(request, tmp_path_factory):
    model, recipe, program = _lowered(request.param)
    out = tmp_path_factory.mktemp("onnx") / request.param
    export_onnx(program, out, recipe=recipe, model="tiny:llama", hf_config=model.config,
                int8_path=SETTINGS[request.param][-1])
    return request.param, program, out, OrtModel(out, threads=2)


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(3))


def test_checker_metadata_and_ops(exported):
    name, _, out, _ = exported
    onnx.checker.check_model(str(out / "model.onnx"))
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta[META_MODEL] == "tiny:llama" and "quarot" in meta[META_RECIPE]
    ops = [n.op_type for n in m.graph.node]
    if name == "w4a16" or name.endswith("nbits"):
        assert ops.count("MatMulNBits") == 8 and "MatMulInteger" not in ops  # 2 layers × (q|k|v, o, gate|up, down)
    else:
        assert ops.count("MatMulInteger") == 8 and "MatMulNBits" not in ops
    levels = {a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels <= ({4} if name == "w4a8-nbits" else {0})  # int8 compute only where A8 allows it
    # fused for onnxruntime: one GroupQueryAttention per layer, norms with their residual adds (the first
    # block's input norm has none: 2 layers × 2 + the final norm − 1 = 4), no repeat of the cache
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    assert ops.count("SkipSimplifiedLayerNormalization") == 4
    # without a quantized K, R3 cancels and RoPE runs inside GroupQueryAttention (one cos/sin table pair); with
    # KV4 both stay in the graph before it
    rotary = {a.i for n in m.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
              if a.name == "do_rotary"}
    tables = [i.name for i in m.graph.initializer if i.name.startswith("rope_")]
    negated = {o for n in m.graph.node if n.op_type == "Neg" for o in n.output}
    rotate_half = sum(1 for n in m.graph.node if n.op_type == "Concat" and n.input[0] in negated)
    if "kv4" in name:
        assert not rotary and not tables and rotate_half == 4  # RoPE of q and k, 2 layers
    else:
        assert rotary == {1} and len(tables) == 2 and rotate_half == 0
    # token-major attention: q|k|v read packed (no key/value inputs) where nothing runs between the projection
    # and the attention; one copy of the sequence lengths for every layer; no shape arithmetic elsewhere
    gqas = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    packed = [n.input[1] == n.input[2] == "" for n in gqas]
    assert packed == [("kv4" not in name)] * 2
    assert len({n.input[5] for n in gqas}) == len({n.input[6] for n in gqas}) == 1
    # the lengths come from the attention mask, so onnxruntime-genai may share one cache buffer per layer
    assert [i.name for i in m.graph.input][:2] == ["input_ids", "attention_mask"]
    assert {n.op_type for n in m.graph.node if gqas[0].input[5] in n.output} == {"Cast"}
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert config["model"]["decoder"]["inputs"]["attention_mask"] == "attention_mask"
    weights = {i.name for i in m.graph.initializer}
    moved = [n for n in m.graph.node if n.op_type == "Transpose" and n.input[0] not in weights]
    assert (len(moved) > 0) == ("kv4" in name) and ("kv4" in name or ops.count("Shape") <= 3), ops
    # the lm_head reads the embedding table: one vocabulary-sized matrix in the file
    vocab = [i.name for i in m.graph.initializer if list(i.dims) == [256, 64]]
    assert len(vocab) == 1, vocab
    # online Hadamards are structured: no square float initializer of the FFN width (96) or more
    for init in m.graph.initializer:
        dims = list(init.dims)
        assert not (len(dims) == 2 and dims[0] == dims[1] and dims[0] >= 96 and init.data_type == 1), init.name


def test_parity_with_lowered_program(exported, ids):
    name, program, _, om = exported
    ref = program.logits(ids)
    got = om.logits(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    if name == "w4a8-nbits":  # onnxruntime's own int8 activations (per block of K, not per token): close, not equal
        assert err < 0.2 and (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8, err
        return
    # W4A16: float32 rounding. A8/A4: the Hadamard before quantization is computed by matmuls, not the FWHT,
    # so a value on a rounding boundary may move one activation code (measured ≤ 1e-3).
    assert err < (1e-5 if name == "w4a16" else 5e-3), err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


def test_kv_cache_decoding_matches_full_sequence(exported, ids):
    _, _, _, om = exported
    prompt = ids[:1, :8]
    out = generate(om, prompt, 16)
    assert out.shape[1] == 24
    full = om.logits(out)  # one full-sequence pass over prompt + generated tokens
    assert torch.equal(full[0, 7:-1].argmax(-1), out[0, 8:])  # the same greedy tokens
    cache = om.empty_cache(1)
    steps = [om.step(prompt, cache)]
    for t in range(8, 23):
        steps.append(om.step(out[:, t:t + 1], steps[-1][1]))
    inc = torch.cat([s[0] for s in steps], 1)
    assert ((inc - full[:, :23]).abs().max() / full.abs().max()).item() < 1e-4


def test_chunked_continuation_matches_full_sequence(exported, ids):
    """A prompt fed in two chunks (P = 11, then S = 7 with a past): GroupQueryAttention's rotary must place the
    second chunk at positions 11 … 17, as one full pass does."""
    _, _, _, om = exported
    seq = ids[:1, :18]
    full = om.logits(seq)
    first, cache = om.step(seq[:, :11], om.empty_cache(1))
    second, _ = om.step(seq[:, 11:], cache)
    got = torch.cat([first, second], 1)
    assert ((got - full).abs().max() / full.abs().max()).item() < 1e-4


def test_genai_generates_the_same_tokens(exported, ids):
    name, _, out, om = exported
    if name != "w4a8":
        pytest.skip("one setting is enough for onnxruntime-genai")
    prompt = ids[0, :8]
    ours = generate(om, prompt[None], 8)[0, 8:].tolist()
    assert genai_generate(out, prompt.tolist(), 8) == ours


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_vocabulary_tables(bits, tmp_path, ids):
    """weights.vocab_bits: the embedding and the lm_head as GatherBlockQuantized / MatMulNBits on the codes the
    recipe chose, with the PyTorch program's logits (the tables are exactly its values)."""
    model = tiny("llama")
    recipe = load_recipe("quarot").with_bits(a=16, kv=16, group=32)
    recipe = dataclasses.replace(recipe, weights=dataclasses.replace(recipe.weights, vocab_bits=bits))
    program = lower(qc.compile(qc.capture(model), recipe, None, progress=False))
    emb = program.weight(program.model_map.embedding.weight)
    assert emb.reshape(-1, 32).unique(dim=None).numel() < emb.numel()  # on a grid now
    out = export_onnx(program, tmp_path / "v", recipe=recipe, model="tiny:llama", hf_config=model.config)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    head = [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"]
    assert [a.i for a in head[0].attribute if a.name == "bits"] == [bits]
    assert not [i.name for i in m.graph.initializer if list(i.dims) in ([256, 64], [64, 256])
                and i.data_type == onnx.TensorProto.FLOAT]  # no float table left
    ref = program.logits(ids)
    got = OrtModel(out, threads=2).logits(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    # 4-bit: float32 rounding; 8-bit: the lm_head's input in onnxruntime's int8 per block of 32 (its fast kernel)
    assert err < (1e-5 if bits == 4 else 2e-2), err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


def test_lm_head_by_the_method_embedding_by_vocab_bits(tmp_path, ids):
    """include_lm_head + vocab_bits on a tied model: the lm_head gets GPTQ codes of its own (a MatMulNBits with
    the recipe's group), the embedding the 8-bit RTN table (GatherBlockQuantized), the tie broken first; the
    folder computes the program's logits."""
    model = tiny("llama")
    assert model.config.tie_word_embeddings
    recipe = load_recipe("gptq").with_bits(w=4, a=16, kv=16, group=32, vocab=8, lm_head=True)
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    program = qc.compile(qc.capture(model), recipe, progress=False, calibration=calib)
    mm = program.model_map
    emb, head = program.weight(mm.embedding.weight), program.weight(mm.linears[mm.lm_head].weight)
    table = model.get_input_embeddings().weight.detach()
    assert not torch.equal(emb, head) and not torch.equal(emb, table)  # on its own grid, apart from the lm_head
    assert (emb - table).abs().max() <= table.abs().max() / 127  # RTN 8-bit
    program = lower(program)
    out = export_onnx(program, tmp_path / "h", recipe=recipe, model="tiny:llama", hf_config=model.config)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    gathers = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    assert [a.i for a in gathers[0].attribute if a.name == "bits"] == [8]
    head_op = [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"]
    attrs = {a.name: a.i for a in head_op[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32
    ref, got = program.logits(ids), OrtModel(out, threads=2).logits(ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_accuracy_level_is_the_users_choice(tmp_path, ids):
    """accuracy_level=4 on a W4A16 model: every INT4 MatMulNBits computes with onnxruntime's int8 activations
    (close to, not equal to, the float-activation program); a level other than 0 or 4 is refused."""
    model, recipe, program = _lowered("w4a16")
    out = export_onnx(program, tmp_path / "l4", recipe=recipe, model="tiny:llama", hf_config=model.config,
                      accuracy_level=4)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    levels = [a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4] * 8
    ref, got = program.logits(ids), OrtModel(out, threads=2).logits(ids)
    assert 0 < ((got - ref).abs().max() / ref.abs().max()).item() < 0.2
    with pytest.raises(ExportError, match="accuracy_level must be 0 .* or 4"):
        export_onnx(program, tmp_path / "l2", model="tiny:llama", accuracy_level=2)
    assert not (tmp_path / "l2").exists()


def test_duquant_transforms_export_in_block_form(tmp_path, ids):
    """DuQuant's online transforms with a partial last block (blocks of 40 over widths 64 and 96) export as their
    blocks and the tail's own matrix, not as dense C×C initializers; onnxruntime gives the program's logits,
    the cached decode included."""
    from qcompile.passes.duquant import duquant

    model = tiny("llama")
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    program = duquant(qc.capture(model), calibration=calib, block=40, steps=8, progress=False)
    out = export_onnx(program, tmp_path / "duquant", model="tiny:llama", hf_config=model.config)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    squares = {init.dims[0] for init in m.graph.initializer if len(init.dims) == 2 and init.dims[0] == init.dims[1]}
    assert {40, 24, 16} <= squares and not squares & {96}, squares
    om = OrtModel(out, threads=2)
    ref = program.logits(ids)
    assert ((om.logits(ids) - ref).abs().max() / ref.abs().max()).item() < 1e-5
    out = generate(om, ids[:1, :8], 8)  # onnxruntime's cached decode: the program's greedy tokens
    assert torch.equal(program.logits(out)[0, 7:-1].argmax(-1), out[0, 8:])


# ------------------------------------------------------------------------------------------------
# refusals


def test_existing_out_refused_without_force(exported, tmp_path):
    _, program, out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_onnx(program, out, model="tiny:llama")
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folder left


def test_codebook_refused_before_writing(tmp_path):
    model = tiny("llama")
    recipe = load_recipe("leanquant-nu").with_calibration(2, 32)
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    program = lower(quantize(qc.capture(model), recipe, calib, progress=False))
    out = tmp_path / "nu"
    with pytest.raises(ExportError, match="not lowered.*codebook"):
        export_onnx(program, out, model="tiny:llama", hf_config=model.config)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_corrupt_or_foreign_onnx_refused(exported, tmp_path):
    _, _, out, _ = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:100])
    with pytest.raises(ExportError, match="cannot load .*model.onnx"):
        OrtModel(bad)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign / "model.onnx"))
    with pytest.raises(ExportError, match="not a qcompile decoder export"):
        OrtModel(foreign)
    with pytest.raises(ExportError, match="does not exist"):
        OrtModel(tmp_path / "nothing")


# the real model: W4A16 RTN g64 asym; W4A8 QuaRot with online R3/R4 Hadamards. W4A4 is checked on the tiny
# model only: on SmolLM2 (QuaRot RTN g64) the exported loss differed from PyTorch's by 1.5% on 64 tokens in one
# run, and a second run failed a 3% bound on loss, argmax agreement or max error (4-bit code flips from the
# Hadamard's rounding order compound over 30 layers), so no bound is stated yet
REAL = {"w4a16": ("rtn", 16, 64, "matmulnbits"), "w4a8": ("quarot", 8, None, "matmulinteger"),
        "w4a8-nbits": ("quarot", 8, None, "matmulnbits")}


@pytest.mark.real
@pytest.mark.parametrize("name", list(REAL))
def test_smollm2_export_parity(name, smollm2, smollm2_program, smollm2_ids, tmp_path):
    """The real model: exported logits = lowered PyTorch logits (W4A16: float32 rounding; A8: the same loss and
    predictions, see below)."""
    model, tokenizer = smollm2
    base, a, g, route = REAL[name]
    recipe = load_recipe(base).with_bits(a=a, kv=16, group=g, symmetric=False if g else None)
    program = lower(qc.compile(smollm2_program, recipe, None, progress=False))
    out = export_onnx(program, tmp_path / "smol", recipe=recipe, model="smollm2-135m", tokenizer=tokenizer,
                      hf_config=model.config, int8_path=route)
    assert (out / "tokenizer.json").is_file() and (out / "genai_config.json").is_file()
    ids = smollm2_ids[:, :64]
    ref = program.logits(ids)
    got = OrtModel(out, threads=2).logits(ids)
    assert np.isfinite(got.numpy()).all()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    if a == 16:
        assert err < 1e-4, err
        return
    # A8: an activation on a rounding boundary may take the neighbouring code in one of the two (the exported
    # Hadamard is matmuls and attention is onnxruntime's GroupQueryAttention; the reference uses the fast
    # transform and SDPA), and over 30 layers such flips move single logits by several percent; the model's loss
    # and its predictions must agree. The MatMulNBits route quantizes activations per block of K (onnxruntime's
    # int8), another quantizer with the same bound. Whole-model perplexity (4 windows of 2048, QuaRot+GPTQ W4A8,
    # 8-bit vocabulary tables): PyTorch 27.876, exact route 27.910, MatMulNBits 27.823 (benchmarks/results/onnx-cpu.md).
    # The first tokens have almost no context: their top candidates are near-ties that one flipped code reorders
    # (5 of the first 8 disagreed in one run), so predictions are compared from the 9th token on.
    nll = [torch.nn.functional.cross_entropy(x[0, :-1].float(), ids[0, 1:]).item() for x in (got, ref)]
    assert abs(nll[0] - nll[1]) / nll[1] < 0.01, nll
    assert (got[:, 8:].argmax(-1) == ref[:, 8:].argmax(-1)).float().mean() > 0.9
