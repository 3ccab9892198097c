"""online_hadamard: R3 on q and k after RoPE, R4 on the down projection's input.

Neither can be fused: RoPE sits between q/k_proj and attention, and the FFN's activation sits between
up/gate and down. So the graph gets online Hadamard ops (``graph.edit.Hadamard``):
- R3: q ↦ q·H, k ↦ k·H over head_dim, which cancels in the scores: (qH)(kH)ᵀ = q·H·Hᵀ·kᵀ = q·kᵀ.
  It makes K (and Q) easy to quantize for a KV cache.
- R4: x ↦ x·H on down's input, with W_down ← W_down·H so that (xH)(W H)ᵀ = x·Wᵀ.
H is the plain orthogonal Hadamard (no random signs: they would need another online op), or a
block-diagonal one for sizes with no Hadamard of their own (chosen by ``online_choice``).
Both are per site: R3 needs the block's attention op matched (q and k as its operands), R4 each down
projection of a matched FFN (a shared expert's too); a site without them is skipped with the reason.
"""

from __future__ import annotations

import torch

from qcompile.errors import UnsafeRewriteError
from qcompile.graph.edit import Hadamard
from qcompile.passes import weights
from qcompile.passes.options import OnlineHadamardOptions, check_can_run, history
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
    return p.insert_on_operand(consumer, pos, Hadamard(choice.block or 0))


R3_INSIDE = ("RoPE is inside the attention op (GroupQueryAttention do_rotary=1): no value between RoPE and the "
             "scores to rotate; R3 dropped, exact while K is not quantized ((qH)(kH)ᵀ = q·kᵀ, and the plan refuses "
             "KV quantization on such a graph: onnx_genai.check_recipe)")


def _r3_refusal(block) -> str | None:
    if block.attention is None:
        return next((r for _, r in block.unmatched if "attention" in r), "attention not matched")
    if block.attention.rope_inside:
        return R3_INSIDE
    return None


def _r4_refusal(block) -> str | None:
    if block.ffn is None:
        return next((r for _, r in block.unmatched if "FFN" in r), "FFN not matched")
    return None


def online_hadamard(program: Program, options: OnlineHadamardOptions | None = None, **overrides) -> Program:
    """R3 and/or R4 as ``OnlineHadamardOptions`` (or its fields as keywords) say."""
    opts = OnlineHadamardOptions.of(options, overrides)
    check_can_run(history(program), opts)
    r3, r4 = opts.r3, opts.r4
    p = program.clone()
    report = PassReport("online_hadamard")
    mm = p.model_map
    matrices: dict[RotationChoice, torch.Tensor] = {}  # built once per size, on the compute device
    for block in mm.blocks:
        if r3 and (why := _r3_refusal(block)):
            report.skip(f"R3 block {block.index}", why)
        elif r3:
            a = block.attention
            choice = online_choice(a.head_dim)
            for pos in (0, 1):
                _insert(p, a.node, pos, choice)
            report.count("R3 q/k pair", a.node)
            report.notes["R3"] = choice.describe()
        if r4 and (why := _r4_refusal(block)):
            report.skip(f"R4 block {block.index}", why)
        elif r4:
            for name in block.downs:
                down = mm.linears[name]
                choice = online_choice(down.in_features)
                _insert(p, down.node, 0, choice)
                if choice not in matrices:
                    matrices[choice] = _matrix(choice).to(weights.compute_device(p, down.weight))
                weights.transform_inputs(p, down, matrices[choice])
                report.count("R4 down input", down.node)
                report.notes["R4"] = choice.describe()
    p.rematch()
    return p.done(report)


def plan(mm, options: OnlineHadamardOptions | None = None) -> list[str]:
    opts = options or OnlineHadamardOptions()
    r3, r4 = opts.r3, opts.r4
    lines = []
    if r3:
        done = [b for b in mm.blocks if not _r3_refusal(b)]
        if done:
            a = done[0].attention
            c = online_choice(a.head_dim)
            where = "after RoPE" if a.rope else "before attention"
            lines.append(f"R3 {c.describe()}: {2 * len(done)} online ops on q and k {where}")
        inside = [b for b in mm.blocks if _r3_refusal(b) == R3_INSIDE]
        if inside:
            lines.append(f"R3 dropped in {len(inside)} blocks: {R3_INSIDE}")
        lines += [f"R3 refused in block {b.index}: {_r3_refusal(b)}" for b in mm.blocks
                  if _r3_refusal(b) not in (None, R3_INSIDE)]
    if r4:
        downs = [mm.linears[d].in_features for b in mm.blocks if not _r4_refusal(b) for d in b.downs]
        for w in sorted(set(downs)):
            c = online_choice(w)
            lines.append(f"R4 {c.describe()}: {downs.count(w)} online ops on down inputs, inverse fused into the weights")
        lines += [f"R4 refused in block {b.index}: {_r4_refusal(b)}" for b in mm.blocks if _r4_refusal(b)]
    return lines
