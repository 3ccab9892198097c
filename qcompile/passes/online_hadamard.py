"""online_hadamard: R3 on q and k after RoPE, R4 on the down projection's input.

Neither can be fused: RoPE sits between q/k_proj and attention, and the FFN's activation sits between
up/gate and down. So the graph gets ``torch.ops.qcompile.hadamard`` nodes:
- R3: q ↦ q·H, k ↦ k·H over head_dim, which cancels in the scores: (qH)(kH)ᵀ = q·H·Hᵀ·kᵀ = q·kᵀ.
  It makes K (and Q) easy to quantize for a KV cache.
- R4: x ↦ x·H on down's input, with W_down ← W_down·H so that (xH)(W H)ᵀ = x·Wᵀ.
H is the plain orthogonal Hadamard (no random signs: they would need another online op), or a
block-diagonal one for sizes with no Hadamard of their own (chosen by ``online_choice``).
"""

from __future__ import annotations

import torch

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.errors import UnsafeRewriteError
from qcompile.passes import weights
from qcompile.passes.rotate import RotationChoice, choose_rotation
from qcompile.program import PassReport, Program
from qcompile.quant import hadamard as had


def online_choice(n: int) -> RotationChoice:
    """The Hadamard applied online for size n: exact size, else the largest block-diagonal one."""
    choice = choose_rotation(n, "hadamard", min_block=2)
    if choice.kind == "orthogonal":
        raise UnsafeRewriteError(f"no Hadamard (not even block-diagonal) of size {n} for an online rotation")
    return choice


def _matrix(choice: RotationChoice) -> torch.Tensor:
    b = choice.block or choice.size
    return torch.block_diag(*[had.hadamard_matrix(b)] * (choice.size // b))


def _insert(p: Program, consumer: str, pos: int, choice: RotationChoice) -> str:
    return p.insert_on_operand(consumer, pos, torch.ops.qcompile.hadamard.default, choice.block or 0).name


def online_hadamard(program: Program, r3: bool = True, r4: bool = True) -> Program:
    p = program.clone()
    report = PassReport("online_hadamard")
    mm = p.model_map
    for block in mm.blocks:
        a = block.attention
        if r3:
            choice = online_choice(a.head_dim)
            for pos in (0, 1):
                _insert(p, a.node, pos, choice)
            report.count("R3 q/k pair", a.node)
            report.notes["R3"] = choice.describe()
        if r4:
            down = mm.linears[block.ffn.down]
            choice = online_choice(down.in_features)
            _insert(p, down.node, 0, choice)
            weights.transform_inputs(p, down, _matrix(choice))
            report.count("R4 down input", down.node)
            report.notes["R4"] = choice.describe()
    p.rematch()
    return p.done(report)


def plan(mm, r3: bool = True, r4: bool = True) -> list[str]:
    lines = []
    if r3:
        a = mm.blocks[0].attention
        c = online_choice(a.head_dim)
        where = "after RoPE" if a.rope else "before attention"
        lines.append(f"R3 {c.describe()}: {2 * len(mm.blocks)} online ops on q and k {where}")
    if r4:
        widths = sorted({mm.linears[b.ffn.down].in_features for b in mm.blocks})
        for w in widths:
            c = online_choice(w)
            lines.append(f"R4 {c.describe()}: {len(mm.blocks)} online ops on down inputs, inverse fused into the weights")
    return lines
