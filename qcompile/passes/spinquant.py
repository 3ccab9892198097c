"""spinquant: R1 and R2 learned by Cayley SGD through the fake-quantized model, then fused like ``rotate``.

SpinQuant (arXiv 2405.16406) keeps QuaRot's placement (R1 on the residual stream, R2 per layer on v→o,
R3/R4 online Hadamards) but *learns* R1 (hidden × hidden) and the R2s (head_dim × head_dim, one per layer)
instead of drawing them at random. With the norms folded and the weights frozen, the weights are a
function of the rotations,
    E(R1) = E·R1,   W_reader(R1) = W·R1,   W_writer(R1) = R1ᵀ·W (b·R1),
    W_v(R1, R2) = blockdiag(R2)ᵀ·W_v·R1,   W_o(R1, R2) = R1ᵀ·W_o·blockdiag(R2)
(``rotate.rotated_weights``, the same algebra ``rotate`` writes), so the loss
    L(R1, R2) = CE(model_{W(R1, R2)}(x), x)      (labels = inputs, shifted by one)
with fake quantization in the forward — weights RTN per channel symmetric with a clip search recomputed
every step (``fake_quantize_mse``; off with ``learn_weights_16bit`` for when GPTQ/LeanQuant quantizes the
weights later), every quantized linear's input per token asymmetric (clip 1.0), K (after RoPE and R3) and V
asymmetric per (token, head) — and straight-through gradients is differentiable in R1, R2. Each step
recomputes the rotated weights in float64 from the frozen ones (cast to the weights' dtype for the forward)
and moves every R by a Cayley step on the Stiefel manifold (``quant/cayley.py``: A skew from G·Rᵀ,
α = min(lr, 1/(‖A‖ + ε)), R ← (I + α/2·A)⁻¹(I − α/2·A)·R), lr cosine-decayed from ``lr`` to 0, no momentum.
R3/R4 are in the training forward (a training copy gets ``online_hadamard``'s ops, which the recipe adds to
the result afterwards; the recipe checks that the two agree). The learned R1/R2 are then fused exactly as
``rotate`` fuses its Hadamards: with quantization off the result computes the same logits. The training
forward is ``GraphEdit.torch_forward``: ``functional_call`` on a torch.fx capture; on an ONNX Program the
graph itself evaluated by torch ops (``graph/onnx_torch``; onnxruntime computes no gradients), so both IRs
learn the same rotations up to float rounding and fuse them through the same edits.

Memory: the backward needs every block's activations (≈ 11.6 GiB a block at 8 × 2048 tokens on the
Llama-2-7B shape, ≈ 360 GiB for 32 blocks). On CUDA the loss is therefore computed block by block
(``passes.blockwise.Segments``), each block — its rotated, fake-quantized weights included — under
``torch.utils.checkpoint``: only the stream between blocks is kept and a block's forward is run again in the
backward, one block's activations alive at a time (the official code sets ``--gradient_checkpointing True``
too); the recomputation reuses each weight's clip-search grid from the step's forward (the same weight, so
the same grid) instead of searching again. The block-by-block forward runs the graph's own ops on the same
values (no causal-attention rewrite), so the loss and the R2 gradients equal the whole-graph forward's bit
for bit and R1's to float64 rounding (its per-weight contributions are summed in another order). The
whole-graph forward (``checkpoint=False``) stays the default on the CPU, where host memory is ample and the
recomputation would cost time (on the 7B shape on an H200: 15.8 s a step against ≈ 13.3). The frozen
weights stay in their own dtype (float32 here; the official code loads the model in bfloat16 with ``--bf16 True`` and
rotates each weight in float64 before casting back), and the training copy lives on the compute device
(``weights.computed_on``) while the Program it came from may stay on the host.

Departures from the official code (``facebookresearch/SpinQuant``): the Cayley transform is solved exactly
(the official SGDG takes 2 fixed-point iterations and re-orthonormalizes by QR at random steps), so
‖RᵀR − I‖ stays at rounding level; o_proj's input is quantized per token over all heads, like the rest of
qcompile's activation quantizer (the official code uses groups of head_dim there, having no online
Hadamard on o_proj); calibration windows come from the pipeline (WikiText-2 validation, random offsets)
rather than the train split.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils.checkpoint import checkpoint as checkpointed
from tqdm import tqdm

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.passes import weights
from qcompile.passes.blockwise import BlockRunner
from qcompile.passes.online_hadamard import online_choice, online_hadamard
from qcompile.passes.options import SpinQuantOptions, check_can_run, history
from qcompile.passes.quantize import _insert_fake_quant
from qcompile.passes.rotate import check_v_to_o, choose_rotation, fuse_rotations, prepare_rotations, rotated_weights
from qcompile.program import PassReport, Program
from qcompile.quant.cayley import CayleySGD
from qcompile.quant.formats import Granularity, QuantSpec
from qcompile.quant.rtn import coarse_to_fine_mse_qparams, fake_quantize_mse, fake_quantize_on_grid

ACT_CLIP = 1.0  # SpinQuant's a_clip_ratio, k_clip_ratio and v_clip_ratio defaults


def _weight_spec(w_bits: int) -> QuantSpec | None:
    """The training forward's weight quantizer: RTN per channel symmetric (None: weights in float)."""
    return QuantSpec(w_bits, True, Granularity.CHANNEL) if w_bits < 16 else None


def _fake_quant_weight(w: torch.Tensor, lin, spec: QuantSpec, grids: dict | None = None) -> torch.Tensor:
    """RTN per output channel with the clip search, in ``lin``'s layout (stacked experts: every row). With
    ``grids``, the grid found for ``lin`` is kept there and reused when the same weight comes again (a block's
    recomputation in the backward under checkpointing: the same rotated weight, so the same grid, without the
    search)."""
    c = w.movedim((lin.out_axis, lin.in_axis), (-2, -1))
    rows = c.reshape(-1, lin.in_features)
    if grids is None:
        q = fake_quantize_mse(rows, spec)
    else:
        if lin.weight not in grids:
            grids[lin.weight] = coarse_to_fine_mse_qparams(rows, spec)
        q = fake_quantize_on_grid(rows, spec, *grids[lin.weight])
    return q.reshape(c.shape).movedim((-2, -1), (lin.out_axis, lin.in_axis))


def _training_program(p: Program, a_bits: int, kv_bits: int, r3: bool, r4: bool):
    """A copy of ``p`` whose graph computes the quantized forward: R3/R4 online Hadamards (as the recipe's
    online_hadamard adds them later, with R4's inverse in the down weights) and the activation and K/V
    fake-quant ops the quantize pass inserts. Returns it, the linears whose weights are quantized, and its
    differentiable forward (``GraphEdit.torch_forward``: fx through ``functional_call``, ONNX evaluated by
    torch ops; the graph's own weights frozen, gradients only through the rotated ones passed in)."""
    t = online_hadamard(p, r3=r3, r4=r4)
    mm = t.model_map
    targets = [n for n in mm.linears if n != mm.lm_head]  # SpinQuant keeps the lm_head in 16 bits
    if a_bits < 16:
        for n in targets:
            _insert_fake_quant(t, n, 0, a_bits, False, ACT_CLIP)
    if kv_bits < 16:
        for b in mm.blocks:
            for pos in (1, 2):
                _insert_fake_quant(t, b.attention.node, pos, kv_bits, False, ACT_CLIP)
    t.graph.finish()
    return t, targets, t.graph.torch_forward()


def _params(t: Program, q1, q2, spec: QuantSpec | None, targets: list[str], names=None,
            grids: dict | None = None) -> dict:
    """The training forward's weights (those in ``names``, default all): rotated by q1/q2 in float64, cast to the
    weights' dtype, and the targets' fake-quantized (differentiable in q1/q2; ``grids``: see
    ``_fake_quant_weight``)."""
    params = {name: v.to(t.weight(name).dtype) for name, v in rotated_weights(t, q1, q2, names).items()}
    if spec is not None:
        for n in targets:
            lin = t.model_map.linears[n]
            if names is not None and lin.weight not in names:
                continue
            w = params[lin.weight] if lin.weight in params else t.weight(lin.weight)
            params[lin.weight] = _fake_quant_weight(w, lin, spec, grids)
    return params


def _cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _loss(t: Program, forward, q1, q2, ids: torch.Tensor, spec: QuantSpec | None, targets: list[str]) -> torch.Tensor:
    """Cross-entropy of the next token under the fake-quantized forward with the weights rotated by q1/q2."""
    if isinstance(forward, BlockwiseForward):  # each weight's grid searched once a step, not again in the backward
        grids = {}
        return _cross_entropy(forward(ids, lambda names: _params(t, q1, q2, spec, targets, names, grids)), ids)
    return _cross_entropy(forward(ids, _params(t, q1, q2, spec, targets)), ids)


class _ParamsRunner(BlockRunner):
    """A ``BlockRunner`` that reads the weights in ``params`` instead of the module's, and runs every op as
    captured (no causal-attention rewrite: the same ops as the whole graph's forward)."""

    call_function = fx.Interpreter.call_function

    def __init__(self, program: Program):
        super().__init__(program, program.device)
        self.params: dict = {}

    def fetch_attr(self, target: str):
        value = self.params.get(target)
        return value if value is not None else super().fetch_attr(target)


@dataclass
class BlockwiseForward:
    """``forward(ids, params_of) → logits`` block by block: segment k's weights are ``params_of(its weight
    names)``, computed inside the segment so that, under ``torch.utils.checkpoint`` (when gradients are on),
    neither they nor the segment's activations are kept for the backward: only the values passed between
    segments (the stream, the rotary tables, the mask). The same ops on the same values as the whole graph."""

    program: Program
    checkpoint: bool = True
    runner: _ParamsRunner = field(init=False)

    def __post_init__(self):
        self.runner = _ParamsRunner(self.program)
        output = next(n for n in self.program.module.graph.nodes if n.op == "output")
        flat = []
        fx.node.map_arg(output.args, flat.append)
        self.logits_node = flat[0]  # a causal LM's output starts with its logits

    def _segment(self, k: int, params_of, envs: list[dict]):
        segs, runner = self.runner.segments, self.runner
        runner.params = params_of(set(segs.attrs[k]))
        try:
            if k < len(segs) - 1:
                return runner.run_segment(k, envs)
            out = []
            runner.run_segment(k, envs, until=self.logits_node, consume=out.append)
            return out[0]
        finally:  # a recomputation stopped early (checkpoint's early stop) leaves no values behind
            runner.params, runner.env = {}, {}

    def __call__(self, ids: torch.Tensor, params_of) -> torch.Tensor:
        envs = self.runner.start(ids, ids.shape[0])
        for k in range(len(self.runner.segments)):
            if self.checkpoint and torch.is_grad_enabled():
                envs = checkpointed(self._segment, k, params_of, envs, use_reentrant=False)
            else:
                envs = self._segment(k, params_of, envs)
        return envs


def _order(n: int, draws: int, seed: int) -> torch.Tensor:
    """Which window each draw takes: seeded permutations of the n windows, one per epoch."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(max(1, math.ceil(draws / n)))])


@dataclass
class Learned:
    """The learned rotations (float64, on the weights' device) and the fake-quant losses along the way."""

    r1: torch.Tensor
    r2: list[torch.Tensor]
    loss_before: float  # on the first batch, initial rotations
    loss_after: float  # on the same batch, learned rotations
    losses: list[float]  # each step's batch loss (before its update)
    seconds: list[float] = field(default_factory=list)  # each step's wall time (the loss read back ends it)


def learn_rotations(p: Program, q1: torch.Tensor, q2: list[torch.Tensor], calibration: torch.Tensor, *,
                    steps: int = 100, lr: float = 1.5, batch: int = 8, seq: int = 2048, w_bits: int = 4,
                    a_bits: int = 4, kv_bits: int = 4, learn_weights_16bit: bool = False, r3: bool = True,
                    r4: bool = True, seed: int = 0, progress: bool = True, checkpoint: bool | None = None) -> Learned:
    """Learn R1 (from ``q1``) and one R2 per block (from ``q2``) on ``p`` as ``prepare_rotations`` left it
    (norms folded, embeddings untied); ``p`` is not changed. Deterministic under ``seed`` (window order).

    The training copy of ``p`` is put on the compute device (``weights.computed_on``, default where ``p`` is).
    ``checkpoint`` (default: on CUDA, for fx graphs) computes the loss block by block with each block
    recomputed in the backward (``BlockwiseForward``): the same loss and gradients in a fraction of the memory."""
    SpinQuantOptions(steps=steps, lr=lr, batch=batch, seq=seq, w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits,
                     learn_weights_16bit=learn_weights_16bit, r3=r3, r4=r4, seed=seed)  # validates
    spec = _weight_spec(w_bits)
    if learn_weights_16bit:
        spec = None
    t, targets, forward = _training_program(p, a_bits, kv_bits, r3, r4)
    device = weights.compute_device(t, t.model_map.embedding.weight)
    if t.device != device:
        t.to(device)  # the training copy only: ``p`` stays where it is
    if checkpoint is None:
        checkpoint = device.type == "cuda" and t.ir == "fx"
    if checkpoint:
        forward = BlockwiseForward(t)
    ids = calibration[:, :seq].to(device)
    order = _order(ids.shape[0], max(steps, 1) * batch, seed)
    first = ids[order[:batch]]
    rs = [r.detach().to(device, copy=True).requires_grad_() for r in (q1, *q2)]  # the caller's stay as given
    optimizer = CayleySGD(rs, lr=lr)

    with torch.no_grad():
        before = _loss(t, forward, rs[0], rs[1:], first, spec, targets).item()
    losses, seconds = [], []
    bar = tqdm(range(steps), desc="spinquant", unit="step", disable=not progress)
    for step in bar:
        start = time.perf_counter()
        for group in optimizer.param_groups:  # cosine from lr to 0 (HF's "cosine" schedule, no warm-up)
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        loss = _loss(t, forward, rs[0], rs[1:], ids[order[step * batch:(step + 1) * batch]], spec, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    with torch.no_grad():
        after = _loss(t, forward, rs[0], rs[1:], first, spec, targets).item()
    learned = [r.detach() for r in rs]
    del t, forward, optimizer, rs
    gc.collect()  # the training copy (a whole model on the device) leaves now, not at the next collection:
    # a captured graph holds reference cycles, and the fusion that follows needs the room
    return Learned(learned[0], learned[1:], before, after, losses, seconds)


def spinquant(program: Program, options: SpinQuantOptions | None = None, *, calibration: torch.Tensor,
              progress: bool = True, **overrides) -> Program:
    """R1/R2 learned as ``SpinQuantOptions`` (or its fields as keywords) say, then fused."""
    opts = SpinQuantOptions.of(options, overrides)
    check_can_run(history(program), opts)
    steps, lr, batch, seq, seed = opts.steps, opts.lr, opts.batch, opts.seq, opts.seed
    a_bits, kv_bits, r3, r4, learn_weights_16bit = opts.a_bits, opts.kv_bits, opts.r3, opts.r4, opts.learn_weights_16bit
    spec = _weight_spec(opts.w_bits)
    p = program.clone()
    report = PassReport("spinquant")
    q1, q2 = prepare_rotations(p, "hadamard", seed, True, True, report)  # unties, checks the norms and v→o
    learned = learn_rotations(p, q1, q2, calibration, progress=progress, **opts.to_dict())
    fuse_rotations(p, learned.r1, learned.r2, report)

    n, length = calibration.shape[0], min(seq, calibration.shape[1])
    report.count("learned R1")
    report.count("learned R2", n=len(learned.r2))
    report.notes["R1"] = "learned, from " + report.notes["R1"]
    report.notes["R2"] = "learned per layer, from " + report.notes["R2"]
    report.notes["schedule"] = (f"{steps} Cayley SGD steps × {batch} windows of {length} tokens "
                                f"({steps * batch / n:.2f} epochs of {n} windows), lr {lr} cosine, seed {seed}")
    report.notes["training quantizers"] = _describe_quant(None if learn_weights_16bit else spec, a_bits, kv_bits,
                                                          r3, r4)
    report.notes["loss"] = (f"{learned.loss_before:.4f} → {learned.loss_after:.4f} (fake-quant CE on the first "
                            f"batch, initial → learned rotations)")
    if learned.losses:
        report.notes["step losses"] = f"{learned.losses[0]:.4f} → {learned.losses[-1]:.4f}"
    worst = max(_orthogonality_error(r) for r in [learned.r1, *learned.r2])
    report.notes["orthogonality"] = f"max |RᵀR − I| = {worst:.1e}"
    return p.done(report)


def _orthogonality_error(r: torch.Tensor) -> float:
    """max |RᵀR − I|."""
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return float((r.T @ r - eye).abs().max())


def _describe_quant(spec, a_bits, kv_bits, r3, r4) -> str:
    w = f"W{spec.bits} per-channel sym RTN, clip search each step" if spec else "W16 (weights in float)"
    a = f"A{a_bits} per-token asym clip {ACT_CLIP}" if a_bits < 16 else "A16"
    kv = f"KV{kv_bits} asym per (token, head) clip {ACT_CLIP}" if kv_bits < 16 else "KV16"
    online = "+".join(n for n, on in (("R3", r3), ("R4", r4)) if on) or "no online Hadamard"
    return f"{w}, {a}, {kv}; {online} in the forward; straight-through gradients"


def plan(mm, options: SpinQuantOptions | None = None) -> list[str]:
    opts = options or SpinQuantOptions()
    steps, lr, batch, seq, seed = opts.steps, opts.lr, opts.batch, opts.seq, opts.seed
    a_bits, kv_bits, r3, r4, learn_weights_16bit = opts.a_bits, opts.kv_bits, opts.r3, opts.r4, opts.learn_weights_16bit
    spec = _weight_spec(opts.w_bits)
    quant = _describe_quant(None if learn_weights_16bit else spec, a_bits, kv_bits, r3, r4)
    check_v_to_o(mm)
    a = mm.blocks[0].attention
    if r3:
        online_choice(a.head_dim)
    if r4:
        for b in mm.blocks:
            online_choice(mm.linears[b.ffn.down].in_features)
    c1, c2 = choose_rotation(mm.hidden), choose_rotation(a.head_dim, min_block=1)
    n_emb = 1 + (mm.positional is not None)
    return [
        f"learns R1 (from {c1.describe()}, random signs, seed {seed}) and {len(mm.blocks)} R2 (from "
        f"{c2.describe()}) by Cayley SGD: {steps} steps × {batch} windows of ≤ {seq} tokens, lr {lr} cosine to 0, "
        f"no momentum; weights frozen",
        f"training loss: next-token cross-entropy with {quant} on {len(mm.linears) - 1} linears (lm_head in float)",
        f"then fused like rotate: {n_emb} embedding(s), {len(mm.readers)} readers, {len(mm.writers)} writers, "
        f"{len(mm.blocks)} v→o pairs ({a.n_kv_heads} kv heads shared by {a.n_heads} heads)",
    ]
