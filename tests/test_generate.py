"""The KV-cache pass and the decoding loop: a cached step is the full-sequence graph, token by token."""

import copy

import pytest
import torch

import qcompile.api as qc
from qcompile import artifact
from qcompile.errors import QCompileError, UnsafeRewriteError
from qcompile.decoding import CachedDecoder, Recompute, Sampling, StaticCachedDecoder, StaticKVStep, generate
from qcompile.models import tiny
from qcompile.passes.kv_cache import CacheLayout, add_kv_cache, with_kv_cache
from qcompile.passes.lower import lower
from qcompile.program import Program
from qcompile.recipe import load_recipe
from tests.conftest import max_rel_error


def _decode_logits(step: CachedDecoder, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position: ``prefill`` tokens in one step, then one token per step."""
    cache = step.empty_cache(ids.shape[0])
    logits, cache = step.step(ids[:, :prefill], cache)
    out = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step.step(ids[:, t:t + 1], cache)
        out.append(logits)
    return torch.cat(out, dim=1)


def _cached(program: Program) -> CachedDecoder:
    return CachedDecoder(add_kv_cache(program).module, CacheLayout.of(program.model_map))


def test_empty_cache_step_is_the_captured_graph(tiny_programs, tiny_ids):
    _, program = tiny_programs["llama"]
    step = _cached(program)
    logits, cache = step.step(tiny_ids, step.empty_cache(tiny_ids.shape[0]))
    assert torch.equal(logits, program.logits(tiny_ids))
    a = program.model_map.blocks[0].attention
    assert len(cache) == 2 * len(program.model_map.blocks)
    assert cache[0].shape == (tiny_ids.shape[0], a.n_kv_heads, tiny_ids.shape[1], a.head_dim)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma", "mixtral"])
def test_cached_decoding_matches_full_sequence_w4a4kv4(arch, tiny_programs, tiny_ids):
    """QuaRot W4A4KV4 lowered (R3 and K/V quantization on the attention operands): the cache holds the
    values attention reads, so decoding token by token reproduces full-sequence scoring."""
    _, program = tiny_programs[arch]
    recipe = load_recipe("quarot").with_bits(kv=4, group=16)
    lowered = lower(qc.compile(program, recipe, progress=False))
    full = lowered.logits(tiny_ids)
    decoded = _decode_logits(_cached(lowered), tiny_ids, prefill=20)
    assert max_rel_error(decoded, full) < 1e-5


def test_static_cache_decodes_like_the_growing_cache(tiny_programs, tiny_ids):
    """The preallocated cache (written in place at cache_position, all slots masked by position) gives the
    full-sequence logits too, and refuses to run past its slots."""
    _, program = tiny_programs["qwen2"]
    lowered = lower(qc.compile(program, load_recipe("quarot").with_bits(kv=4, group=16), progress=False))
    layout = CacheLayout.of(lowered.model_map)
    step = StaticKVStep(with_kv_cache(copy.deepcopy(lowered.module), layout, static=True), layout,
                        batch=tiny_ids.shape[0], max_len=tiny_ids.shape[1])
    static = StaticCachedDecoder(step, max_len=tiny_ids.shape[1], batch=tiny_ids.shape[0])
    assert max_rel_error(_decode_logits(static, tiny_ids, prefill=20), lowered.logits(tiny_ids)) < 1e-5
    with pytest.raises(QCompileError, match="holds 37 tokens"):
        generate(static, tiny_ids, 2)
    with pytest.raises(QCompileError, match="batch 2, not 1"):
        generate(static, tiny_ids[:1], 2)


def test_greedy_tokens_same_with_and_without_cache(tiny_programs):
    _, program = tiny_programs["qwen2"]
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    with_cache = generate(_cached(program), prompt, 16)
    without = generate(Recompute(program.logits), prompt, 16)
    assert with_cache.shape == (2, 21)
    assert torch.equal(with_cache, without)


def test_saved_model_generates_with_its_recorded_cache_layout(tiny_programs, tmp_path):
    _, program = tiny_programs["llama"]
    recipe = load_recipe("rtn").with_bits(group=16, a=8)
    lowered = lower(qc.compile(program, recipe, progress=False))
    loaded = artifact.load(artifact.save(lowered, tmp_path / "m", recipe, "tiny:llama"))
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(loaded.decoder(), prompt, 16), generate(Recompute(lowered.logits), prompt, 16))


def test_sampling_is_seeded_and_respects_top_k(tiny_programs):
    _, program = tiny_programs["llama"]
    step = _cached(program)
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(5))
    s = Sampling(temperature=1.0, top_k=3, seed=7)
    a, b = generate(step, prompt, 12, sampling=s), generate(step, prompt, 12, sampling=s)
    assert torch.equal(a, b)
    logits, _ = step.step(prompt, step.empty_cache(1))
    allowed = set(logits[0, -1].topk(3).indices.tolist())
    assert a[0, 4].item() in allowed


def test_eos_stops_generation(tiny_programs):
    _, program = tiny_programs["llama"]
    step = _cached(program)
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(6))
    first = generate(step, prompt, 1)[0, -1].item()
    out = generate(step, prompt, 16, eos_token_id=first)
    assert out.shape[1] == 5 and out[0, -1].item() == first


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_options_are_refused(kwargs, message):
    with pytest.raises(QCompileError, match=message):
        Sampling(**kwargs)


def test_kv_cache_refuses_models_without_rope(tiny_programs):
    _, program = tiny_programs["opt"]
    with pytest.raises(UnsafeRewriteError, match="RoPE"):
        add_kv_cache(program)


@pytest.mark.real
def test_smollm2_greedy_same_with_and_without_cache(smollm2, smollm2_program):
    _, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with_cache = generate(_cached(smollm2_program), prompt, 16)
    assert torch.equal(with_cache, generate(Recompute(smollm2_program.logits), prompt, 16))
    assert "Paris" in tokenizer.decode(with_cache[0, prompt.shape[1]:])


def test_kv_cache_refuses_unmatched_attention_and_saving_still_works(tmp_path):
    """Gemma-2's eager attention is not matched: no cache layout (refused by name), but the model still
    quantizes, saves and loads; its directory records no layout and generation asks for use_cache=False."""
    program = Program.capture(tiny("gemma2"))
    with pytest.raises(UnsafeRewriteError, match="attention is not matched"):
        CacheLayout.of(program.model_map)
    recipe = load_recipe("rtn").with_bits(group=16)
    loaded = artifact.load(artifact.save(lower(qc.compile(program, recipe, progress=False)), tmp_path / "g", recipe,
                                         "tiny:gemma2"))
    with pytest.raises(QCompileError, match="use_cache=False"):
        loaded.decoder()


def test_saved_model_loads_in_a_fresh_process(tiny_programs, tmp_path):
    """``qcompile eval DIR`` / ``export DIR`` start in a process that has not imported transformers: loading
    must register the output classes the saved graph names (it failed before: CausalLMOutputWithPast)."""
    import subprocess
    import sys

    _, program = tiny_programs["llama"]
    recipe = load_recipe("rtn").with_bits(group=16)
    out = artifact.save(lower(qc.compile(program, recipe, progress=False)), tmp_path / "m", recipe, "tiny:llama")
    code = ("import torch; from qcompile import artifact; m = artifact.load(%r); "
            "print(m.logits(torch.zeros(1, 5, dtype=torch.long)).shape)" % str(out))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1, 5, 256])" in done.stdout
