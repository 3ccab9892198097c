"""vocab: the token embedding table and the lm_head weight on a symmetric RTN grid (groups of 32 along H).

The two ``V × H`` tables are a third of a small model's file and, for the lm_head, the largest matmul of a decode
step (SmolLM2: 113 MB of float32 read per token). ``weights.vocab_bits`` (4 or 8) replaces each by its
fake-quantized value — ``s·(round(W/s))`` with ``s = max|W_group| / (2^(b−1) − 1)`` rounded through float16 — so
the PyTorch program computes what the ONNX export's ``GatherBlockQuantized`` and ``MatMulNBits`` compute from
the stored codes (the export re-derives the codes and checks they reproduce the table exactly). Plain RTN without
a clip search: the grid is then idempotent, so the codes are a function of the stored table. A tied table is
quantized once. The tables stay out of ``program.quantized``: the INT4 lowering leaves them to the export.
"""

from __future__ import annotations

import torch

from qcompile.program import PassReport, Program
from qcompile.quant.formats import Granularity, QuantSpec
from qcompile.quant.rtn import rtn_quantize

VOCAB_GROUP = 32


def vocab_spec(bits: int) -> QuantSpec:
    return QuantSpec(bits, True, Granularity.GROUP, VOCAB_GROUP)


def vocab_rtn(table: torch.Tensor, bits: int):
    """RTN of a ``[V, H]`` table on the vocabulary grid (a ``QuantizedWeight``: codes, scales, dequantized)."""
    return rtn_quantize(table.detach().float(), vocab_spec(bits), clip_search=False)


def quantize_vocab(p: Program, bits: int, report: PassReport, lm_head: bool = True) -> None:
    """Fake-quantize, in place, the embedding table and (``lm_head``) the lm_head weight of ``p`` (rows [V, H]).
    ``lm_head=False``: the recipe quantized the lm_head with the other linears (``include_lm_head``)."""
    mm = p.model_map
    sites = {mm.embedding.weight: (0, 1)} if mm.embedding is not None else {}
    if mm.lm_head is not None and lm_head:
        head = mm.linears[mm.lm_head]
        sites.setdefault(head.weight, (head.out_axis, head.in_axis))
    for name, axes in sites.items():
        w = p.weight(name)
        rows = w.detach().float().movedim(axes, (0, 1))
        p.set_weight(name, vocab_rtn(rows, bits).weight.movedim((0, 1), axes).to(w.dtype))
        report.count(f"W{bits} vocabulary table (RTN g{VOCAB_GROUP} sym)", name)
