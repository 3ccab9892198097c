"""The KV-cache rewrite on ONNX decoders without a cache (``graph/onnx_cache`` through ``add_kv_cache``).

Each tiny RoPE model is exported with ``torch.onnx.export(dynamo=True)`` (opset 23, ``input_ids → logits``):
with an empty past (P = 0) the step gives the source's logits, and decoding a prefix then one token at a time
through the cache gives the full-sequence logits (≤ 1e-4 of max|logits|), also after quarot with K/V quantized
to 4 bits (R3 and the fake quantization on the new tokens only, before the Concat). The folder
``quantize_to`` writes is genai's step: ``og.Model`` greedy-decodes the tokens qcompile's own uncached decode
gives. What the rewrite cannot prove is refused by name, and the writer then keeps the scoring graph.
"""

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from conftest import max_rel_error
from qcompile.api import compile, decoder, quantize_to
from qcompile.decoding import Recompute, generate
from qcompile.errors import UnsafeRewriteError
from qcompile.export.onnx import META_NOTES
from qcompile.export.runtime import OrtModel, genai_generate
from qcompile.graph.onnx import export_tiny_onnx
from qcompile.graph.onnx_cache import with_kv_cache
from qcompile.models import tiny
from qcompile.passes.kv_cache import CacheLayout, add_kv_cache
from qcompile.passes.lower import lower
from qcompile.program import Program
from qcompile.recipe import load_recipe

TOL = 1e-4
ROPE_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "mixtral")


@pytest.fixture(scope="module")
def onnx_file(tiny_programs, tmp_path_factory):
    cache = {}

    def get(arch, opset=23, optimize=False):
        if (arch, opset, optimize) not in cache:
            path = tmp_path_factory.mktemp("onnx") / f"{arch}-{opset}{'-opt' if optimize else ''}.onnx"
            cache[arch, opset, optimize] = export_tiny_onnx(tiny_programs[arch][0], path, opset=opset,
                                                            optimize=optimize)
        return cache[arch, opset, optimize]

    return get


def _ids(seed=1, n=2, s=21):
    return torch.randint(3, 256, (n, s), generator=torch.Generator().manual_seed(seed))  # no special ids


def _decode(graph, ids, prefix):
    """Logits of ``ids`` from the step: ``prefix`` tokens at once, then one token a step, through the cache."""
    s = graph.session()
    names = [o.name for o in s.get_outputs()]
    sig = graph.cache
    cache = {n: np.zeros((ids.shape[0], h, 0, sig.head_dim), np.float32) for pair, h in zip(sig.past, sig.kv_heads)
             for n in pair}
    cuts = [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]
    out = []
    for a, b in cuts:
        r = s.run(None, {"input_ids": ids[:, a:b].numpy(), "attention_mask": np.ones((ids.shape[0], b), np.int64),
                         **cache})
        out.append(r[0])
        for (k, v), (pk, pv) in zip(sig.present, sig.past):
            cache[pk], cache[pv] = r[names.index(k)], r[names.index(v)]
    return torch.from_numpy(np.concatenate(out, 1))


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_step_gives_the_source_logits_at_p0_and_token_by_token(arch, onnx_file):
    src = Program.from_onnx(onnx_file(arch))
    step = add_kv_cache(src)
    ids = _ids()
    ref = src.graph.logits(ids)
    assert src.graph.cache is None and step.graph.cache is not None  # the source is left as it was
    assert max_rel_error(step.graph.logits(ids), ref) <= 1e-6
    assert max_rel_error(_decode(step.graph, ids, 7), ref) <= TOL
    assert step.reports[-1].counts["attention with cache"] == len(src.model_map.blocks)
    s = step.graph.session()
    layers = len(src.model_map.blocks)
    assert [i.name for i in s.get_inputs()] == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [o.name for o in s.get_outputs()] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def test_cache_after_quarot_and_kv4_holds_the_quantized_new_tokens(onnx_file):
    recipe = load_recipe("quarot").with_bits(a=16, kv=4, group=32)
    full = lower(compile(Program.from_onnx(onnx_file("llama")), recipe, progress=False))
    step = add_kv_cache(full)
    ids = _ids(2)
    ref = full.graph.logits(ids)
    assert max_rel_error(step.graph.logits(ids), ref) <= 1e-6
    assert max_rel_error(_decode(step.graph, ids, 5), ref) <= TOL
    # what the recipe put on K (R3, then 4-bit fake quantization) runs before the Concat: on the new tokens only
    for k, _ in step.graph.cache.present:
        concat = step.graph.value(k).producer()
        new = concat.inputs[1]
        while new.producer().op_type == "Slice":  # the distinct kv heads of the repeated operand
            new = new.producer().inputs[0]
        assert concat.op_type == "Concat" and new.producer().op_type.startswith("fake_quant_n16_b4")


def test_folder_runs_in_genai_as_qcompile_decodes(onnx_file, tmp_path):
    recipe = load_recipe("quarot").with_bits(a=16, kv=4, group=32)
    out = quantize_to(str(onnx_file("llama")), recipe, str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data"]
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and not config["search"]["past_present_share_buffer"]
    om = OrtModel(out)
    assert om.cached and om.kv_heads == [2, 2] and om.head_dim == 16
    dec, _ = decoder(str(out))  # what `qcompile generate OUT` decodes with
    assert isinstance(dec, OrtModel) and dec.cached
    for seed in range(3):
        prompt = _ids(seed, 1, 6)
        ours = generate(Recompute(om.logits), prompt, 8, None)[0, 6:].tolist()  # uncached: the reference
        assert generate(dec, prompt, 8, None)[0, 6:].tolist() == ours
        theirs = genai_generate(out, prompt[0].tolist(), 8)
        stop = config["model"]["eos_token_id"]
        assert theirs and theirs == ours[:len(theirs)] and (len(theirs) == 8 or theirs[-1] == stop)


def test_no_rope_positions_are_refused_and_the_scoring_graph_written(onnx_file, tmp_path):
    with pytest.raises(UnsafeRewriteError, match=r"no Range\(0, S\) .* reaches RoPE's Cos/Sin .*attention "):
        add_kv_cache(Program.from_onnx(onnx_file("opt")))  # learned positions
    recipe = load_recipe("rtn").with_bits(a=16, kv=16, group=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = quantize_to(str(onnx_file("opt")), recipe, str(tmp_path / "out"), progress=False)
    assert any("without a KV cache" in str(w.message) for w in caught)
    assert not OrtModel(out).cached and not (out / "genai_config.json").exists()
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert meta[META_NOTES].startswith("no KV cache: kv_cache: no Range(0, S)")


def test_sliding_window_is_refused(tmp_path):
    model = tiny("mistral")
    model.config.sliding_window = 4
    path = export_tiny_onnx(model, tmp_path / "sw.onnx")
    with pytest.raises(UnsafeRewriteError, match="mask of attention .* is not the plain causal mask"):
        add_kv_cache(Program.from_onnx(path))


def test_attention_not_matched_is_refused_by_name(onnx_file):
    p = Program.from_onnx(onnx_file("llama"))
    names = [b.attention.node for b in p.model_map.blocks]
    layout = CacheLayout.of(p.model_map)
    with pytest.raises(UnsafeRewriteError, match="attention op .* is not one the matcher found"):
        with_kv_cache(p.graph.clone(), layout, names[:1])


def test_decomposed_attention_is_refused_by_name(onnx_file):
    p = Program.from_onnx(onnx_file("llama", opset=18, optimize=True))
    with pytest.raises(UnsafeRewriteError, match="is MatMul .*opset-23 Attention"):
        add_kv_cache(p)
