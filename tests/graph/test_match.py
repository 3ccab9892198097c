"""The matcher finds the same structure from the graph alone, whatever the modules are called."""

import pytest
import torch

from qcompile.analysis.match import match
from qcompile.errors import MatchError, UnsafeRewriteError
from qcompile.graph.fx import capture, to_opgraph
from qcompile.models import TINY_ARCHS, tiny
from qcompile.program import Program

FFN_KIND = {"mixtral": "moe", "opt": "mlp"}
BIASED = {"qwen2": 3, "opt": 6}  # biased linears per layer


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_roles_and_geometry_match_the_config(arch, tiny_programs):
    model, program = tiny_programs[arch]
    c = model.config
    s = program.model_map.summary()
    heads = c.num_attention_heads
    assert s["hidden"] == c.hidden_size
    assert s["layers"] == c.num_hidden_layers
    assert s["n_heads"] == heads
    assert s["n_kv_heads"] == (getattr(c, "num_key_value_heads", None) or heads)
    assert s["head_dim"] == (getattr(c, "head_dim", None) or c.hidden_size // heads)
    assert s["ffn_width"] == getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim")
    assert s["ffn"] == FFN_KIND.get(arch, "gated")
    assert s["tied"] == bool(c.tie_word_embeddings)
    assert s["rope"] == (arch != "opt")
    assert s["qk_norm"] == (arch == "qwen3")
    assert s["norm"] == ("layer" if arch == "opt" else "rms")
    assert s["norm_offset"] == (1.0 if arch == "gemma" else 0.0)
    assert s["fused_qkv"] == (arch == "phi3")
    assert s["positional_embedding"] == (arch == "opt")
    assert s["biases"] == BIASED.get(arch, 0) * c.num_hidden_layers
    assert s["writers"] == 2 * c.num_hidden_layers
    assert all(inv.holds for inv in program.model_map.invariances)


def test_moe_router_and_experts_are_readers_and_writers(tiny_programs):
    _, p = tiny_programs["mixtral"]
    mm = p.model_map
    ffn = mm.blocks[0].ffn
    assert ffn.router in mm.blocks[0].ffn_norm.readers
    assert mm.linears[ffn.down].experts == 4 and ffn.down in mm.writers
    assert ffn.gate.linear in mm.readers


def test_weights_are_named_by_source_parameter(tiny_programs):
    model, p = tiny_programs["llama"]
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for lin in p.model_map.linears.values():
        assert lin.weight in names


class _Wrapped(torch.nn.Module):
    """A container that renames every parameter (``net.inner.…``) without changing the computation."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class _Outer(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.net = lm
        self.config = lm.config

    def forward(self, input_ids):
        return self.net(input_ids=input_ids).logits


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_renamed_and_wrapped_modules_give_the_same_map(arch, tiny_programs):
    _, reference = tiny_programs[arch]
    model = tiny(arch)
    layers = model.model.decoder.layers if arch == "opt" else model.model.layers
    for i in range(len(layers)):
        layers[i] = _Wrapped(layers[i])
    program = Program.capture(_Outer(model))
    assert program.model_map.summary() == reference.model_map.summary()
    weights = {lin.weight for lin in program.model_map.linears.values()}
    assert any(".inner." in w and w.startswith("net.") for w in weights)


def _edited_map(model, edit):
    gm = capture(model)
    edit(gm)
    gm.graph.lint()
    gm.recompile()
    return match(to_opgraph(gm))


def _first(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_unknown_op_on_the_residual_stream_keeps_the_linears_and_refuses_rewrites():
    from qcompile.passes.fold_norms import fold_norms

    def edit(gm):
        add = [n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor and n.meta["val"].dim() == 3
               and n.meta["val"].shape[-1] == 64][0]
        with gm.graph.inserting_after(add):
            t = gm.graph.call_function(torch.ops.aten.tanh.default, (add,))
        t.meta["val"] = add.meta["val"]
        add.replace_all_uses_with(t, delete_user_cb=lambda u: u is not t)

    mm = _edited_map(tiny("llama"), edit)
    assert not mm.stream_matched and mm.blocks == () and len(mm.linears) == 15 and mm.lm_head
    assert "tanh" in mm.unmatched[0][1]
    p = Program.capture(tiny("llama"))
    edit(p.module)
    p.module.recompile()
    p.rematch()
    with pytest.raises(UnsafeRewriteError, match="fold_norms needs every reader .*tanh"):
        fold_norms(p)


def test_post_norm_between_branch_and_residual_add_is_recorded():
    from transformers import Gemma2Config, AutoModelForCausalLM

    cfg = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    mm = Program.capture(model).model_map
    assert mm.stream_matched and all(len(b.post_norms) == 2 for b in mm.blocks)
    assert {w for b in mm.blocks for _, ws in b.post_norms for w in ws} == set(mm.writers)


def test_nonlinearity_between_v_and_o_is_recorded_and_skipped_by_rotate():
    from qcompile.passes.fold_norms import fold_norms
    from qcompile.passes.rotate import rotate

    def edit(gm):
        v = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("v_proj.weight")][0]
        lin = next(iter(v.users))
        with gm.graph.inserting_after(lin):
            r = gm.graph.call_function(torch.ops.aten.relu.default, (lin,))
        r.meta["val"] = lin.meta["val"]
        lin.replace_all_uses_with(r, delete_user_cb=lambda u: u is not r)

    model = tiny("llama")
    mm = _edited_map(model, edit)
    broken = [i for i in mm.invariances if not i.holds]
    assert len(broken) == 1 and "activation" in broken[0].reason
    p = Program.capture(model)
    edit(p.module)
    p.module.recompile()
    p.rematch()
    out = rotate(fold_norms(p))
    report = out.reports[-1]
    assert [s for s, _ in report.skipped] == ["R2 block 0"] and "activation" in report.skipped[0][1]
    assert report.counts["R2 head pair"] == 1  # block 1 is still rotated
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    assert (out.logits(ids) - p.logits(ids)).abs().max() <= 1e-4 * p.logits(ids).abs().max()


def test_capture_failure_names_the_construct():
    from qcompile.errors import CaptureError

    class Branchy(torch.nn.Module):
        def forward(self, input_ids):
            if input_ids.sum() > 0:  # data-dependent Python control flow
                return input_ids * 2
            return input_ids

    with pytest.raises(CaptureError, match="Branchy"):
        capture(Branchy(), torch.ones(2, 8, dtype=torch.long))


def test_graph_without_token_embedding_is_a_match_error():
    class NoEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 8)

        def forward(self, input_ids):
            return self.lin(input_ids.float().unsqueeze(-1))

    with pytest.raises(MatchError, match="token embedding"):
        match(to_opgraph(capture(NoEmbedding(), torch.ones(2, 8, dtype=torch.long))))
