"""The calibration interpreters run an attention whose mask is causal as ``is_causal=True`` (``graph.fx.
CausalAttention``): the same values as the captured graph bit for bit, and any other mask runs as captured."""

import pytest
import torch
from torch import fx

from qcompile.graph.fx import CausalAttention, is_causal_mask

aten = torch.ops.aten


class _Runner(CausalAttention, fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.causal_calls = 0

    def call_function(self, target, args, kwargs):
        if target is aten.scaled_dot_product_attention.default:
            self.causal_calls += int(self._causal_form(args, kwargs)[1].get("is_causal", False))
        return super().call_function(target, args, kwargs)


def _logits(out):
    return out if torch.is_tensor(out) else (out[0] if isinstance(out, (tuple, list)) else out.logits)


def test_is_causal_mask():
    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    assert is_causal_mask(tril.expand(2, 1, 5, 5), 5, 5)
    flipped = tril.clone()
    flipped[4, 0] = False  # a padded/packed position: not the causal mask
    assert not is_causal_mask(flipped.expand(2, 1, 5, 5), 5, 5)
    assert not is_causal_mask(tril.float(), 5, 5)  # an additive mask is left alone
    assert not is_causal_mask(torch.ones(4, 5, dtype=torch.bool).tril(1), 4, 5)  # a cache offset


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graph_values_unchanged(tiny_programs, tiny_ids, arch):
    _, program = tiny_programs[arch]
    gm = program.module
    with torch.no_grad():
        ref = _logits(gm(input_ids=tiny_ids))
        runner = _Runner(gm)
        got = _logits(runner.run(tiny_ids, enable_io_processing=False))
    n_attn = sum(n.target is aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
    assert n_attn > 0 and runner.causal_calls == n_attn  # every attention took the mask-free kernel
    assert torch.equal(ref, got)
