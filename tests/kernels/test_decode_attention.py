"""``decode_attention``: the split-key Triton kernel (interpreted) equals the reference, the reference equals
``scaled_dot_product_attention`` of the repeated cache, and the backend's fold rewrites a KV-cache decode step's
attention into it with the same logits."""

import pytest
import torch
import torch.nn.functional as F

from qcompile.errors import ShapeError
from qcompile.kernels import attention_fold, ops, reference
from qcompile.kernels.triton import decode_attention as tda


def _case(b, hq, hk, s, t, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hk, t, d, generator=g).to(dtype)
    v = torch.randn(b, hk, t, d, generator=g).to(dtype)
    seen = torch.randint(1, t + 1, (s,), generator=g)  # keys kept per query: a prefix, as a static cache's
    mask = (torch.arange(t)[None, :] < seen[:, None])[None, None]
    return q, k, v, mask


@pytest.mark.parametrize("b,hq,hk,s,t,d", [(1, 4, 4, 1, 100, 32), (1, 8, 2, 1, 67, 64), (2, 4, 1, 2, 40, 16)])
@pytest.mark.parametrize("one_launch,skip_masked", [(True, False), (False, False), (True, True), (False, True)])
def test_kernel_equals_reference(b, hq, hk, s, t, d, one_launch, skip_masked):
    """Every version (one launch or two, masked slots read or not) at several chunks per row; the one-launch
    combine leaves its counters at zero for the next call."""
    q, k, v, mask = _case(b, hq, hk, s, t, d, seed=t)
    ref = reference.decode_attention(q.double(), k.double(), v.double(), mask, 0.3)
    out = tda.decode_attention(q, k, v, mask, 0.3, chunk=16, one_launch=one_launch, skip_masked=skip_masked)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    if one_launch:
        assert not tda._COUNTERS[q.device].any()


def test_kernel_general_mask_and_splits():
    """A scattered mask (not a prefix) with several key chunks per head: chunks with no kept key combine to
    nothing, every kept key counts once, and masked slots holding NaN are never counted (by default) nor read
    (``skip_masked``)."""
    q, k, v, _ = _case(1, 2, 2, 1, 200, 16, seed=5)
    mask = torch.rand(1, 2, 1, 200, generator=torch.Generator().manual_seed(6)) < 0.3
    mask[..., 100:164] = False  # two whole 32-key blocks dropped
    assert tda.split_plan(2, 200)[1] > 1  # several chunks, two of them wholly masked
    want = reference.decode_attention(q, k, v, mask, 0.25)
    out = tda.decode_attention(q, k, v, mask, 0.25)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    k[~mask.expand(1, 2, 1, 200)[:, :, 0]] = float("nan")
    v[~mask.expand(1, 2, 1, 200)[:, :, 0]] = float("nan")
    for skip in (False, True):
        assert torch.allclose(tda.decode_attention(q, k, v, mask, 0.25, skip_masked=skip), want, atol=1e-5, rtol=1e-5)


def test_previous_kernel_by_environment(monkeypatch):
    """``QCOMPILE_ATTENTION_PREVIOUS=1`` (A/B timings) runs the two-launch version: no counters are made."""
    q, k, v, mask = _case(1, 2, 2, 1, 64, 16, seed=7)
    monkeypatch.setattr(tda, "_COUNTERS", {})
    monkeypatch.setenv("QCOMPILE_ATTENTION_PREVIOUS", "1")
    out = tda.decode_attention(q, k, v, mask, 0.25)
    assert not tda._COUNTERS
    monkeypatch.delenv("QCOMPILE_ATTENTION_PREVIOUS")
    assert torch.equal(tda.decode_attention(q, k, v, mask, 0.25), out) and tda._COUNTERS


def test_reference_is_sdpa_of_repeated_cache():
    q, k, v, mask = _case(1, 8, 2, 1, 30, 16, seed=1)
    rep = lambda x: x[:, :, None].expand(-1, -1, 4, -1, -1).flatten(1, 2)  # transformers' repeat_kv
    want = F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask, scale=0.2)
    assert torch.equal(ops.decode_attention(q, k, v, mask, 0.2), want)


def test_bad_input_names_the_op():
    q, k, v, mask = _case(1, 6, 4, 1, 10, 16, seed=2)
    with pytest.raises(ShapeError, match="decode_attention"):
        ops.decode_attention(q, k, v, mask)
    q, k, v, mask = _case(1, 4, 4, 1, 10, 16, seed=2)
    with pytest.raises(ShapeError, match="decode_attention: mask"):
        ops.decode_attention(q, k, v, mask.float())


def _decode_step(kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    import qcompile.api as qc
    from qcompile.decoding import StaticKVStep
    from qcompile.passes.kv_cache import CacheLayout, with_kv_cache

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                         num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, use_cache=False)
    program = qc.capture(LlamaForCausalLM(config).eval())
    layout = CacheLayout.of(program.model_map)
    return StaticKVStep(with_kv_cache(program.module, layout, static=True), layout, 1, 24, torch.float32, "cpu")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fold_rewrites_decode_step_same_logits(kv_heads):
    """Dynamo's graph of a static-cache decode step: every layer's attention becomes ``decode_attention`` (the
    repeat of a grouped-query cache gone), and the folded graph gives the unfolded one's logits at every step."""
    step = _decode_step(kv_heads)
    seen = {}

    def backend(gm, example_inputs):
        plain = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
        seen["n"] = attention_fold.fold_decode_attention(gm)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        seen["sdpa"] = targets.count(torch.ops.aten.scaled_dot_product_attention.default)
        seen["flatten"] = targets.count(torch.ops.aten.flatten.using_ints)
        seen["plain"] = plain
        return gm.forward

    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    ids = torch.tensor([[3]])
    with torch.no_grad():
        first = compiled(ids, torch.tensor([0]))
    assert seen["n"] == 2 and seen["sdpa"] == 0
    assert seen["flatten"] == 0  # the repeats of the cache (grouped-query) are gone    # same logits as the unfolded graph over several steps of one cache (the step writes the cache in place)
    folded, plain = _decode_step(kv_heads), _decode_step(kv_heads)
    run_f = torch.compile(folded, backend=lambda gm, ex: (attention_fold.fold_decode_attention(gm), gm.forward)[1],
                          fullgraph=True, dynamic=False)
    with torch.no_grad():
        for pos, tok in enumerate([3, 7, 11, 2, 9]):
            a = run_f(torch.tensor([[tok]]), torch.tensor([pos]))
            b = plain(torch.tensor([[tok]]), torch.tensor([pos]))
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (pos, (a - b).abs().max())
    assert first.shape == (1, 1, 100)
