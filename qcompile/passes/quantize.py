"""quantize: fake-quantize a Program as a recipe says (weights, per-token activations, K/V per head).

Activations and K/V become ``torch.ops.qcompile.fake_quant`` nodes in the graph (before each quantized
linear's input; on the attention op's k and v operands, i.e. after RoPE and R3), so the lowering later
knows exactly where to quantize for real. Weights are replaced by their dequantized values, and the
codes/grids are kept on the Program (``program.quantized``) for packing.

Weights that need calibration (GPTQ, LeanQuant) are quantized *sequentially* by running the graph one
node at a time over all calibration windows: when the interpreter reaches a quantized linear, the
Hessian of its input (shared by every linear reading the same value: [q, k, v], [gate, up]) is taken
from the activations produced by the already-quantized earlier layers, the weight is quantized, and
the node runs with the new weight. In graph order this is GPTQ's sequential groups
[k, v, q] → [o] → [up, gate] → [down], with each layer's outputs recomputed in between.

Routed experts (a stacked ``[E, out, in]`` weight run as one grouped matmul) get one Hessian per expert from
the rows routed to it (``passes.experts``); an expert that no calibration token reaches is quantized by RTN
and listed in the report's skipped sites.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx
from tqdm import tqdm

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.analysis.modelmap import Linear
from qcompile.errors import RecipeError
from qcompile.graph.edit import FakeQuant
from qcompile.graph.fx import CausalAttention
from qcompile.passes import experts as moe
from qcompile.passes.blockwise import quantize_blockwise, shared_input
from qcompile.passes.fold_norms import untie_embeddings
from qcompile.passes.vocab import quantize_vocab
from qcompile.program import PassReport, Program
from qcompile.quant.gptq import HessianAccumulator, gptq_quantize
from qcompile.quant.leanquant import leanquant_quantize
from qcompile.quant.rows import split_rows
from qcompile.quant.rtn import rtn_quantize
from qcompile.recipe import Recipe, WeightQuant, quantized_linears


def _insert_fake_quant(p: Program, consumer: str, pos: int, bits: int, symmetric: bool, clip: float) -> None:
    p.insert_on_operand(consumer, pos, FakeQuant(bits, symmetric, float(clip)))


def _quantize_weight(w: torch.Tensor, H: torch.Tensor | None, wq: WeightQuant, name: str):
    spec = wq.spec
    if wq.method == "rtn":
        return rtn_quantize(w, spec, clip_search=wq.clip_search)
    if wq.method == "gptq":
        return gptq_quantize(w, H, spec, block_size=wq.block_size, percdamp=wq.percdamp, act_order=wq.act_order,
                             static_groups=wq.static_groups, mse=wq.clip_search, name=name)
    return leanquant_quantize(w, H, spec, nonuniform=wq.method == "leanquant-nu", p=wq.p, act_order=wq.act_order,
                              block_size=wq.block_size, percdamp=wq.percdamp, name=name)


def _store_experts(p: Program, lin: Linear, hessians: moe.ExpertHessians, wq: WeightQuant,
                   report: PassReport) -> None:
    """Quantize each expert of a stacked weight on its own Hessian (RTN where it has none) and report it."""
    rtn = dataclasses.replace(wq, method="rtn")
    w = p.weight(lin.weight).detach().float()
    qw, fallback = moe.quantize_experts(w, hessians, lambda we, H, site: _quantize_weight(
        we, H, wq if H is not None else rtn, site))
    _store(p, lin, qw, report)
    report.count(f"{wq.method} experts (own routed tokens)", n=lin.experts - len(fallback))
    report.notes.setdefault("routed tokens per expert", []).extend(hessians.tokens)
    for e in fallback:
        report.count("RTN experts (no routed token)")
        report.skip(moe.expert_site(lin.weight, e), f"{wq.method}: {moe.RTN_REASON}")


def role(mm, node: str) -> str:
    """What linear ``node`` is in the map (q_proj, down_proj, ...), named as transformers names it, so that
    counts agree whatever the source graph calls its weights."""
    if node == mm.lm_head:
        return "lm_head"
    for b in mm.blocks:
        a, f = b.attention, b.ffn
        roles = {}
        if a is not None:
            for r, proj in (("q_proj", a.q), ("k_proj", a.k), ("v_proj", a.v)):
                roles.setdefault(proj.linear, []).append(r)
            roles[a.o] = ["o_proj"]
        for ffn in filter(None, (f, f.shared if f else None)):
            for r, proj in (("gate_proj", ffn.gate), ("up_proj", ffn.up)):
                if proj is not None:
                    roles.setdefault(proj.linear, []).append(r)
            roles[ffn.down] = ["down_proj"]
            if ffn.router:
                roles[ffn.router] = ["router"]
        if node in roles:
            return "+".join(dict.fromkeys(roles[node]))
    return "linear"


def _rows(p: Program, lin: Linear) -> torch.Tensor:
    """The weight as float32 rows [N, K] (experts: all their rows), whatever axes the source stores it in
    (an ONNX exporter's pre-transposed ``val_*`` initializer is [in, out])."""
    w = p.weight(lin.weight).detach().float().movedim((lin.out_axis, lin.in_axis), (-2, -1))
    return w.reshape(-1, lin.in_features)


def _store(p: Program, lin: Linear, qw, report: PassReport) -> None:
    w = p.weight(lin.weight).movedim((lin.out_axis, lin.in_axis), (-2, -1))
    p.set_weight(lin.weight, qw.weight.reshape(w.shape).movedim((-2, -1), (lin.out_axis, lin.in_axis)))
    p.quantized[lin.weight] = qw
    report.count(f"W{qw.spec.bits} {role(p.model_map, lin.node)}")


def _rtn_all(p: Program, targets: list[str], wq: WeightQuant, report: PassReport, progress: bool) -> None:
    for n in tqdm(targets, desc="rtn", unit="linear", disable=not progress):
        lin = p.model_map.linears[n]
        _store(p, lin, _quantize_weight(_rows(p, lin), None, wq, lin.weight), report)
        if p.lazy:  # kept as its codes at once, so host memory grows by codes, not by float32 weights
            from qcompile.lazy import keep_codes

            keep_codes(p, [lin.weight])


class _AllQuantized(Exception):
    """Raised by ``_SequentialQuantizer`` once every target is quantized: the nodes after it (the lm_head's
    logits, a third of SmolLM2's forward) feed no Hessian."""


class _SequentialQuantizer(CausalAttention, fx.Interpreter):
    """Runs the graph node by node over all calibration windows, quantizing linears as it meets them, and stops
    once the last is quantized (``quantize_all``)."""

    def __init__(self, p: Program, targets: list[str], wq: WeightQuant, report: PassReport, progress: bool):
        super().__init__(p.module, garbage_collect_values=True)
        self.p, self.wq, self.report = p, wq, report
        self.targets = {n: p.model_map.linears[n] for n in targets}
        self.stored: set[str] = set()  # linears already quantized (with the first reader of their input)
        self.done: set[str] = set()  # targets the run has passed
        # equal activation fake quantizations (one per reader: q/k/v, gate/up) computed once per run: the
        # same deterministic op on the same value; each kept until its last twin has run
        self.twins: dict[object, int] = {}
        for node in p.module.graph.nodes:
            key = shared_input(node)
            if key is not node:
                self.twins[key] = self.twins.get(key, 0) + 1
        self.shared: dict[object, list] = {}
        self.siblings: dict[object, list[fx.Node]] = {}  # the dense quantized readers of each input value
        for node in p.module.graph.nodes:
            if node.name in self.targets and not self.targets[node.name].experts:
                self.siblings.setdefault(shared_input(node.args[0]), []).append(node)
        self.bar = tqdm(total=len(targets), desc=wq.method, unit="linear", disable=not progress)

    def run_node(self, n: fx.Node):
        lin = self.targets.get(n.name)
        if lin is not None and lin.experts:
            hessians = moe.ExpertHessians.from_rows(lin, self.env[n.args[0]], self.env[moe.offsets_of(n)])
            _store_experts(self.p, lin, hessians, self.wq, self.report)
            self.bar.update(1)
        elif lin is not None and n.name not in self.stored:
            # every quantized reader of this input at once, as one stack of rows (they share H; GPTQ is row by
            # row, so each gets its own result), except per-row k-means, whose seeded draws depend on the rows
            x_node = n.args[0]
            acc = HessianAccumulator(lin.in_features, name=lin.weight, device=self.env[x_node].device)
            acc.add(self.env[x_node].detach().reshape(-1, lin.in_features))
            H = acc.hessian()
            group = [n] if self.wq.method == "leanquant-nu" else self.siblings[shared_input(x_node)]
            lins = [self.targets[u.name] for u in group]
            rows = [_rows(self.p, r) for r in lins]
            qw = _quantize_weight(torch.cat(rows) if len(rows) > 1 else rows[0], H, self.wq,
                                  "+".join(r.weight for r in lins))
            for r, part in zip(lins, split_rows(qw, [w.shape[0] for w in rows]) if len(rows) > 1 else [qw]):
                _store(self.p, r, part, self.report)
                self.bar.update(1)
            self.stored.update(u.name for u in group)
            del H, acc
        if lin is not None:
            self.done.add(n.name)
            if self.finished():
                raise _AllQuantized
        key = shared_input(n)
        if key is n or self.twins[key] < 2:
            return super().run_node(n)
        seen = self.shared.setdefault(key, [None, 0])
        if seen[1] == 0:
            seen[0] = super().run_node(n)
        seen[1] += 1
        value = seen[0]
        if seen[1] == self.twins[key]:
            del self.shared[key]
        return value

    def finished(self) -> bool:
        return len(self.done) == len(self.targets)

    def quantize_all(self, ids: torch.Tensor) -> None:
        try:
            self.run(ids)
        except _AllQuantized:
            pass
        finally:
            self.env = {}
            self.bar.close()


@torch.no_grad()
def quantize(program: Program, recipe: Recipe, calibration: torch.Tensor | None = None,
             progress: bool = True, device: torch.device | str | None = None, batch: int = 4,
             ranks=None, timings: dict | None = None) -> Program:
    """The fake-quantized Program; ``calibration`` holds token windows [n, seq] for GPTQ/LeanQuant.

    On an ONNX Program GPTQ/LeanQuant run block by block in onnxruntime (``graph.onnx_run``). With ``device``,
    GPTQ/LeanQuant run block by block (``passes.blockwise``): one block's weights on
    ``device`` at a time, calibration activations carried forward in batches of ``batch`` windows, the rest
    of the weights where they are. Without it, the whole graph runs at once on the Program's device over
    all windows (the reference path; the same weights up to float summation order). With ``ranks``
    (``passes.distributed.init_ranks()`` under torchrun) the block-by-block path is shared out among processes,
    each on ``ranks.device``, and every rank returns the same Program; ``timings`` gets the block-by-block
    path's seconds per phase.
    """
    p = program.clone()
    report = PassReport("quantize")
    if recipe.weights and recipe.weights.include_lm_head:
        untie_embeddings(p, report)  # the lm_head gets codes of its own; the embedding keeps its table
    mm = p.model_map
    targets = quantized_linears(mm, recipe)
    if recipe.activations:
        a = recipe.activations
        for n in targets:
            _insert_fake_quant(p, n, 0, a.bits, a.symmetric, a.clip_ratio)
        report.count(f"A{a.bits} per-token input", n=len(targets))
    if recipe.kv:
        kv = recipe.kv
        for b in mm.blocks:
            if b.attention is None:
                report.skip(f"KV block {b.index}", "attention not matched (no SDPA op with k, v operands)")
                continue
            for pos in (1, 2):
                _insert_fake_quant(p, b.attention.node, pos, kv.bits, kv.symmetric, kv.clip_ratio)
        report.count(f"KV{kv.bits} per (token, head)", n=2 * sum(b.attention is not None for b in mm.blocks))
    p.graph.finish()
    wq = recipe.weights
    if wq:
        if wq.method == "rtn":
            _rtn_all(p, targets, wq, report, progress)
        else:
            if calibration is None:
                raise RecipeError(f"weights.method {wq.method} needs calibration windows")
            if ranks is not None and ranks.distributed:
                device = ranks.device

            def quantize_linear(lin, H):
                _store(p, lin, _quantize_weight(_rows(p, lin), H, wq, lin.weight), report)

            dense = {n: mm.linears[n] for n in targets if not mm.linears[n].experts}
            routed = {n: mm.linears[n] for n in targets if mm.linears[n].experts}
            if p.ir == "onnx":
                from qcompile.graph.onnx_run import quantize_blockwise as onnx_blockwise

                if routed:  # per-expert Hessians need the routed rows, which the ONNX runner does not split yet
                    _rtn_all(p, list(routed), dataclasses.replace(wq, method="rtn"), report, progress)
                    for lin in routed.values():
                        report.skip(lin.weight, f"{wq.method}: stacked experts of an ONNX graph get RTN")
                # one window per run: onnxruntime's RotaryEmbedding refuses a batch over the [1, S, D] tables
                # that torch.onnx's optimized exports give it
                onnx_blockwise(p, dense, quantize_linear, calibration, batch=1, progress=progress)
                report.notes["execution"] = "onnxruntime, block by block, one window at a time"
            elif device is not None:
                # linears sharing an input are quantized as one stack of rows (same H; GPTQ is row by row),
                # except per-row k-means, whose seeded draws depend on the rows drawn before
                stack = {} if wq.method == "leanquant-nu" else dict(
                    rows_of=lambda lin: _rows(p, lin), quantize_rows=lambda w, H, name: _quantize_weight(w, H, wq, name))
                quantize_blockwise(p, dense, quantize_linear, calibration, device=device, batch=batch,
                                   progress=progress, ranks=ranks, store=lambda lin, qw: _store(p, lin, qw, report),
                                   timings=timings, **stack)
                if routed:
                    moe.quantize_blockwise(p, routed, lambda lin, h: _store_experts(p, lin, h, wq, report),
                                           calibration, device=device, batch=batch)
                report.notes["execution"] = f"block by block on {torch.device(device)}, batches of {batch} windows"
                if ranks is not None and ranks.distributed:
                    report.notes["execution"] += f", shared out among {ranks.world} ranks"
            else:
                _SequentialQuantizer(p, targets, wq, report, progress).quantize_all(calibration.to(p.device))
        tokens = sorted(report.notes.pop("routed tokens per expert", []))
        if tokens:
            report.notes["routed tokens per expert"] = (f"min {tokens[0]}, median {tokens[len(tokens) // 2]}, max "
                                                        f"{tokens[-1]} over {len(tokens)} experts")
        report.notes["weights"] = f"{wq.method} {wq.spec.bits}-bit {'g' + str(wq.group_size) if wq.group_size else 'per-channel'}"
        if wq.vocab_bits:
            quantize_vocab(p, wq.vocab_bits, report, lm_head=not wq.include_lm_head)
    p.rematch()
    return p.done(report)
