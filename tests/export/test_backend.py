"""The torch.compile backend "qcompile": registered by entry point, quantizes a float model's graph, compiles
an already-lowered one (the KV-cache decoder step too), and refuses what it cannot honour by name."""

import pytest
import torch
import torch._dynamo

import qcompile.api as qc
from qcompile.decoding import CachedDecoder, generate
from qcompile.models import tiny
from qcompile.passes.kv_cache import CacheLayout, add_kv_cache
from qcompile.passes.lower import lower
from tests.conftest import max_rel_error

RECIPE = {"recipe": "rtn", "group": 16, "a": 8}


def _lowered(model):
    recipe = qc.as_recipe("rtn").with_bits(group=16, a=8)
    return lower(qc.compile(qc.capture(model), recipe, progress=False))


def test_entry_point_registers_the_backend():
    assert "qcompile" in torch._dynamo.list_backends()


def test_float_model_is_quantized_by_the_backend():
    torch._dynamo.reset()
    model = tiny("llama")
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="qcompile", fullgraph=True, options=RECIPE)
    with torch.no_grad():
        logits = compiled(input_ids=ids).logits
    assert max_rel_error(logits, _lowered(model).logits(ids)) < 1e-5


def test_decoder_step_compiles_and_decodes_like_eager():
    """The KV-cache step of a lowered model, compiled with fullgraph=True: prefill and 16 decode steps give
    the eager step's tokens and logits."""
    torch._dynamo.reset()
    lowered = _lowered(tiny("qwen2"))
    layout = CacheLayout.of(lowered.model_map)
    step = add_kv_cache(lowered).module
    eager = CachedDecoder(step, layout)
    fast = CachedDecoder(torch.compile(step, backend="qcompile", fullgraph=True, dynamic=True), layout)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(fast, prompt, 16), generate(eager, prompt, 16))
    cache = eager.empty_cache(1)
    a, cache_a = eager.step(prompt, cache)
    b, cache_b = fast.step(prompt, cache)
    assert max_rel_error(b, a) < 1e-5
    a, _ = eager.step(prompt[:, :1], cache_a)
    b, _ = fast.step(prompt[:, :1], cache_b)
    assert max_rel_error(b, a) < 1e-5


def test_unknown_option_is_named():
    torch._dynamo.reset()
    compiled = torch.compile(tiny("llama"), backend="qcompile", fullgraph=True, options={"recipe": "rtn", "bits": 3})
    with pytest.raises(Exception, match="unknown option.*bits"):
        compiled(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_float_model_without_recipe_is_refused():
    torch._dynamo.reset()
    compiled = torch.compile(tiny("llama"), backend="qcompile", fullgraph=True)
    with pytest.raises(Exception, match="needs options"):
        compiled(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_recipe_on_a_quantized_graph_is_refused():
    torch._dynamo.reset()
    lowered = _lowered(tiny("llama"))
    step, layout = add_kv_cache(lowered).module, CacheLayout.of(lowered.model_map)
    compiled = torch.compile(step, backend="qcompile", fullgraph=True, options={"recipe": "rtn"})
    with pytest.raises(Exception, match="already quantized"):
        compiled(torch.zeros(1, 4, dtype=torch.long), *layout.empty(1))


def test_hugging_face_cache_inputs_are_refused():
    torch._dynamo.reset()
    model = tiny("llama")
    model.config.use_cache = True
    compiled = torch.compile(model, backend="qcompile", fullgraph=True, options=RECIPE)
    with pytest.raises(Exception, match="only logits|only token ids"):
        compiled(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=True)
