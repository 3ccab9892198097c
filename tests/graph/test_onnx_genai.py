"""onnxruntime-genai's own decoder step as ONNX input (``graph/onnx_genai``), on a tiny build made here.

The fixture saves a tiny random Llama (tied embeddings, 4 heads over 2 KV heads) and a word-level tokenizer
built in code, and runs onnxruntime-genai's model builder on them (fp32, CPU): fused q|k|v MatMul against a
[K, N] weight, ``GroupQueryAttention`` with RoPE inside, ``SkipSimplifiedLayerNormalization``, the table read
as ``Gather(Transpose(lm_head))``. Exactness is max|Δ| ≤ 1e-4·max|logits| in float32 (measured: 4e-7).
"""

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from conftest import max_rel_error
from qcompile.api import compile
from qcompile.errors import CaptureError, RecipeError
from qcompile.export.onnx_program import save_onnx_program
from qcompile.export.runtime import OrtModel, genai_generate
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.lower import lower
from qcompile.passes.online_hadamard import R3_INSIDE, online_hadamard
from qcompile.passes.rotate import rotate
from qcompile.pipeline import plan
from qcompile.program import Program
from qcompile.recipe import load_recipe

TOL = 1e-4
VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 120, 64, 4, 2, 2


@pytest.fixture(scope="module")
def genai(tmp_path_factory):
    """(the HF model, the builder's folder): built once, from code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    # vocab ≠ every linear's width: the builder takes the first Linear as wide as the vocabulary for the lm_head
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "hf")
    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(97 + i % 26) * (1 + i // 26): 3 + i for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(root / "hf")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"), "-o",
                    str(root / "out"), "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)
    return model, root / "out"


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


def test_map_matches_the_fx_capture(genai, ids):
    """Same ModelMap as the fx capture of the HF model, but for the builder's fusion of q|k|v into one MatMul
    (2 linears fewer per layer): residual stream through the skip norms, attention through GroupQueryAttention
    with RoPE inside, the [K, N] weights, the tied table."""
    model, folder = genai
    p = Program.from_onnx(folder / "model.onnx")
    fx = Program.capture(model).model_map.summary()
    mm = p.model_map
    s = mm.summary()
    assert not mm.gaps() and s["tied"] and s["fused_qkv"] and not fx["fused_qkv"]
    assert s["linears"] == fx["linears"] - 2 * LAYERS and s["readers"] == fx["readers"] - 2 * LAYERS
    same = {k for k in s if k not in ("fused_qkv", "linears", "readers")}
    assert {k: s[k] for k in same} == {k: fx[k] for k in same}
    a, d = mm.blocks[0].attention, HIDDEN // HEADS
    assert a.rope_inside and (a.q.start, a.q.stop, a.k.stop, a.v.stop) == (0, HEADS * d, (HEADS + KV_HEADS) * d,
                                                                        (HEADS + 2 * KV_HEADS) * d)
    qkv = mm.linears[a.q.linear]
    assert (qkv.in_features, qkv.out_features) == (HIDDEN, (HEADS + 2 * KV_HEADS) * d)
    assert (qkv.in_axis, qkv.out_axis) == (-2, -1)  # the builder's [K, N] weight
    with torch.no_grad():
        assert max_rel_error(p.logits(ids), model(ids).logits) <= TOL  # empty past, mask of ones


def test_quarot_passes_exact_and_r3_dropped(genai, ids):
    model, folder = genai
    p = Program.from_onnx(folder / "model.onnx")
    ref = p.logits(ids)
    q = online_hadamard(rotate(fold_norms(p)))
    assert max_rel_error(q.logits(ids), ref) <= TOL
    report = q.reports[-1]
    assert report.counts == {"R4 down input": LAYERS}
    assert report.skipped == [(f"R3 block {i}", R3_INSIDE) for i in range(LAYERS)]
    ops = {n.op_type for n in q.graph.model.graph}
    assert "SkipSimplifiedLayerNormalization" not in ops and "GroupQueryAttention" in ops


def test_r3_changes_nothing_while_k_is_not_quantized(genai, ids):
    """Why dropping R3 is exact: on the fx capture of the same model, quantized W4A8 with K/V in float, R3 on and
    off give the same logits ((qH)(kH)ᵀ = q·kᵀ; A8 quantizes linear inputs only), while R4 does change them."""
    model, _ = genai
    recipe = load_recipe("quarot").with_bits(a=8, kv=16)
    from qcompile.passes.quantize import quantize

    def run(r3, r4=True):
        p = online_hadamard(rotate(fold_norms(Program.capture(model))), r3=r3, r4=r4)
        return quantize(p, recipe, None, progress=False).logits(ids)

    with_r3 = run(True)
    assert max_rel_error(run(False), with_r3) <= TOL
    assert max_rel_error(run(True, r4=False), with_r3) > 1e-3


def test_kv_quantization_refused_where_rope_is_inside(genai):
    p = Program.from_onnx(genai[1] / "model.onnx")
    with pytest.raises(RecipeError, match=r"KV4: attention .*GroupQueryAttention.* inside the op"):
        plan(p.model_map, load_recipe("quarot"))
    plan(p.model_map, load_recipe("quarot+gptq").with_bits(a=8, kv=16))


@pytest.mark.parametrize("a, vocab", [(8, 8), (16, 16)])
def test_genai_in_genai_out(genai, ids, tmp_path, a, vocab):
    """quarot+gptq W4A8 (MatMulNBits at accuracy_level 4) with 8-bit vocabulary tables / W4A16 with one float
    table: the folder keeps the cache signature, the fused skip norms, genai_config and the tokenizer;
    onnxruntime scores it as the Program does, a prompt fed in two chunks through the cache gives the full
    pass's logits, and onnxruntime-genai generates from it the tokens greedy recomputation picks."""
    _, folder = genai
    recipe = load_recipe("quarot+gptq").with_bits(a=a, kv=16, group=32, vocab=vocab)
    calib = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    low = lower(compile(Program.from_onnx(folder / "model.onnx"), recipe, progress=False, calibration=calib))
    out = save_onnx_program(low, tmp_path / "q", recipe, str(folder / "model.onnx"))
    assert sorted(f.name for f in out.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data",
                                                      "tokenizer.json", "tokenizer_config.json"]
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    src = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert [i.name for i in m.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in m.graph.output] == [o.name for o in src.graph.output]
    ops = [n.op_type for n in m.graph.node]
    tables = 0 if vocab == 8 else 1  # float [V, H] tables: the embedding and the lm_head made one (tie_lm_head)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS and ops.count("GroupQueryAttention") == LAYERS
    assert ops.count("MatMulNBits") == 5 * LAYERS + (vocab == 8) and ops.count("GatherBlockQuantized") == (vocab == 8)
    assert sum(sorted(i.dims) == [HIDDEN, VOCAB] and i.data_type == 1 for i in m.graph.initializer) == tables
    assert not any(n.domain == "qcompile" for n in m.graph.node)
    levels = {a_.i for n in m.graph.node if n.op_type == "MatMulNBits" for a_ in n.attribute
              if a_.name == "accuracy_level"}
    assert levels == ({4} if a == 8 else {0})
    om = OrtModel(out)
    full = om.logits(ids)
    # the file's 8-bit lm_head reads its input as int8 per block of 32 (accuracy_level 4), the Program's a float
    # one (measured 2.2e-3)
    assert max_rel_error(full, low.logits(ids)) <= (TOL if vocab == 16 else 1e-2)
    first, cache = om.step(ids[:1, :8], om.empty_cache(1))  # GroupQueryAttention: a chunk after a past, batch 1
    second, _ = om.step(ids[:1, 8:], cache)
    assert max_rel_error(torch.cat([first, second], 1), full[:1]) <= TOL
    prompt = ids[0, :6].tolist()
    new = genai_generate(out, prompt, 5)
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(om.logits(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(prompt):]


# --- bad input ---------------------------------------------------------------------------------------------


def _edited(folder, tmp_path, edit, name="bad.onnx"):
    model = ir.load(folder / "model.onnx")
    edit(model)
    path = tmp_path / name
    ir.save(model, path, external_data=name + ".data")
    return path


def test_unknown_step_input_is_named(genai, tmp_path):
    def add_position_ids(model):
        v = ir.Value(name="position_ids", shape=ir.Shape(["batch_size", "sequence_length"]),
                     type=ir.TensorType(ir.DataType.INT64))
        model.graph.inputs.append(v)

    path = _edited(genai[1], tmp_path, add_position_ids)
    with pytest.raises(CaptureError, match=r"bad\.onnx: graph input position_ids is none of input_ids"):
        Program.from_onnx(path)


def test_missing_past_value_is_refused(genai, tmp_path):
    def drop_value(model):
        v = next(v for v in model.graph.inputs if v.name == "past_key_values.1.value")
        gqa = next(u.node for u in v.uses())
        gqa.replace_input_with(4, None)
        model.graph.inputs.remove(v)

    path = _edited(genai[1], tmp_path, drop_value)
    with pytest.raises(CaptureError, match=r"bad\.onnx: past/present K/V are not one key and one value"):
        Program.from_onnx(path)


def test_skip_norm_statistics_read_are_refused(genai, tmp_path):
    def read_mean(model):
        node = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
        out = node.outputs[1]
        out.name, out.type = "mean", ir.TensorType(ir.DataType.FLOAT)
        model.graph.append(ir.node("Identity", [out]))

    path = _edited(genai[1], tmp_path, read_mean)
    with pytest.raises(CaptureError, match=r"bad\.onnx: .* \(SkipSimplifiedLayerNormalization\) output 1 is read"):
        Program.from_onnx(path)


def test_cache_feeds_are_empty(genai):
    p = Program.from_onnx(genai[1] / "model.onnx")
    sig = p.graph.cache
    assert sig.kv_heads == (KV_HEADS,) * LAYERS and sig.head_dim == HIDDEN // HEADS
    feeds = sig.feeds(np.zeros((3, 5), np.int64), ["attention_mask", "past_key_values.1.value"])
    assert feeds["attention_mask"].shape == (3, 5) and feeds["attention_mask"].all()
    assert feeds["past_key_values.1.value"].shape == (3, KV_HEADS, 0, HIDDEN // HEADS)
