"""duquant: DuQuant's dual transformation T = R₁·P·R₂ (``quant/duquant.py``) placed in a Program.

For a linear input X and its readers W, X ↦ X·T with W ↦ W·T is exact (T orthogonal). Placements:

- ``duquant`` (the official code): four transforms per layer, on the inputs of q (k, v share it), o_proj,
  gate (up, and a router, share it) and down_proj. The weights are stored pre-transformed; the activation
  side runs *online* as plain aten ops in the graph, before per-token quantization:
  ``unflatten(-1, (K, b)) → matmul R₁ → flatten → index_select(perm) → unflatten → matmul R₂ → flatten``
  with R₁, R₂ (b×b) and perm registered as parameters; where the width is not a multiple of the block, its
  partial last block (which P leaves in place) is sliced off, multiplied by its own R₁·R₂ block and
  concatenated after. 4 online ops per layer.
- ``duquant-fused``: one residual-stream transform in place of R1, fused like R1 (norms folded first:
  x/rms(x) commutes with an orthogonal T): embeddings E·T, readers W·T, writers Tᵀ·W; per head within
  v→o a head_dim transform (R₁ only: one block, no permutation) like R2, shared by the heads of a layer;
  the down input online (as R4). 1 online op per layer.

Each transform is computed from the calibration inputs of its site (up to ``tokens`` token rows, the
FP model's); the fused stream transform from the inputs of every norm reader. The online ops go in through the
graph interface (``graph.edit.Transform``: marked aten ops in fx, a ``qcompile`` function call in ONNX) and
appear to the matcher as kind ``transform`` (transparent: it sees
through them as through views), so ``rematch`` still works; passes that assume a linear's input is the
norm output (fold_norms, smooth, shift_scale, rotate) refuse to run after this one.
Departure from the official code: the greedy exchange is channel-indexed (``index: row`` for the code's
behaviour); rotations are computed from token rows rather than the official per-layer mean.
"""

from __future__ import annotations

import concurrent.futures

import torch
from tqdm import tqdm

from qcompile.errors import UnsafeRewriteError
from qcompile.graph.edit import Transform
from qcompile.passes import weights
from qcompile.passes.calibrate import collect
from qcompile.passes.fold_norms import untie_embeddings
from qcompile.passes.options import DuQuantOptions, check_can_run, history
from qcompile.program import PassReport, Program
from qcompile.quant.duquant import DuQuantTransform, duquant_transform

def online_transform(t: DuQuantTransform, name: str) -> Transform:
    """x ↦ x·T as the graph interface's online op: R₁, perm, R₂ on the full blocks, and a partial last block's
    own (C mod b)² matrix (its R₁·R₂ block; P leaves its channels in place) where the width is not a multiple of
    the block: C·b + (C mod b)² multiply-adds a row, not C²."""
    c = t.perm.numel()
    b = min(t.block, c)  # a width under the block is one full block (``quant.duquant.blocks_of``)
    full = c // b * b
    assert torch.equal(t.perm[full:].cpu(), torch.arange(full, c)), "DuQuant's permutation keeps the partial block"
    r1, r2 = (x.float() for x in t.blocks())
    tail = (t.r1[full:, full:] @ t.r2[full:, full:]).float() if full < c else None
    return Transform(name, b, r1=r1, perm=t.perm[:full].clone(), r2=r2, tail=tail)


def _ops(op: Transform) -> int:
    return 7 if op.tail is None else 11


def _rows(stats, node: str) -> torch.Tensor:
    return stats[node].kept().double()


def _search(jobs: dict, opts: dict, progress: bool) -> dict[object, DuQuantTransform]:
    """``duquant_transform(rows, seed=seed, **opts)`` for every job {key: (rows, seed)}. The searches are
    independent, so with T > 1 intra-op threads they run T at a time on single-threaded ops rather than one at a
    time on T-thread ones: the search is a long chain of small products, where threads that meet at every
    product lose most of their time waiting (and far more when other processes share the cores). Each search
    computes exactly what it computes alone."""
    threads = torch.get_num_threads()
    bar = tqdm(total=len(jobs), desc="duquant", unit="site", disable=not progress)

    def one(key):
        rows, seed = jobs[key]
        t = duquant_transform(rows, seed=seed, **opts)
        bar.update(1)
        return t

    try:
        if threads <= 1 or len(jobs) <= 1:
            return {k: one(k) for k in jobs}
        torch.set_num_threads(1)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return dict(zip(jobs, pool.map(one, jobs)))
    finally:
        torch.set_num_threads(threads)
        bar.close()


def _first_windows(calibration: torch.Tensor, tokens: int) -> torch.Tensor:
    """The windows the kept token rows come from: statistics keep the first ``tokens`` rows in window order, so
    only the first ⌈tokens/seq⌉ windows matter and the greedy search reads nothing else (at 2048 tokens, one
    window instead of a batch of four). Each window's rows are its own (no op mixes windows), the same values
    as in a run over every window wherever the matrix products' rows do not depend on the batch (bit for bit on
    the CPU, tested; else up to float summation order)."""
    return calibration[: -(-tokens // calibration.shape[1])]


@torch.no_grad()
def duquant(program: Program, options: DuQuantOptions | None = None, *, calibration: torch.Tensor,
            progress: bool = True, **overrides) -> Program:
    """DuQuant's transforms placed as ``DuQuantOptions`` (or its fields as keywords) say."""
    o = DuQuantOptions.of(options, overrides)
    check_can_run(history(program), o)
    placement, block, steps, permute, index = o.placement, o.block, o.steps, o.permute, o.index
    tokens, seed, batch = o.tokens, o.seed, o.batch
    p = program.clone()
    report = PassReport("duquant")
    mm = p.model_map
    opts = dict(block=block, steps=steps, permute=permute, index=index)
    if placement == "duquant":
        watch = {}
        for b in mm.blocks:
            watch.update({b.attn_norm.readers[0]: 0, b.attention.o: 0, b.ffn_norm.readers[0]: 0})
            if b.ffn.kind != "moe":
                watch[b.ffn.down] = 0
        stats = collect(p, _first_windows(calibration, tokens), watch, batch=batch, keep_tokens=tokens,
                        progress=False, device=p.device)  # block by block: the same rows, no logits computed
        jobs = {}
        for b in mm.blocks:
            for what, norm in (("qkv", b.attn_norm), ("gate/up", b.ffn_norm)):
                jobs[b.index, what] = (norm.readers[0], seed + b.index)
            for what, lin in (("o", b.attention.o), ("down", b.ffn.down)):
                if not (what == "down" and b.ffn.kind == "moe"):
                    jobs[b.index, what] = (lin, seed + 1000 + b.index)
        found = _search({k: (_rows(stats, node), s) for k, (node, s) in jobs.items()}, opts, progress)
        for b in mm.blocks:
            for what, norm in (("qkv", b.attn_norm), ("gate/up", b.ffn_norm)):
                t = found[b.index, what]
                op = online_transform(t, f"duquant.{b.index}.{what.replace('/', '_')}")
                p.graph.insert_after(norm.node, op)
                n = _ops(op)
                m = t.matrix()
                for r in norm.readers:
                    weights.transform_inputs(p, mm.linears[r], m)
                report.count("online transform", f"block {b.index} {what} input ({n} aten ops, kept steps {t.steps})")
            for what, lin in (("o", b.attention.o), ("down", b.ffn.down)):
                if what == "down" and b.ffn.kind == "moe":
                    report.skip(f"block {b.index} down", "MoE experts read gathered inputs; not transformed")
                    continue
                t = found[b.index, what]
                op = online_transform(t, f"duquant.{b.index}.{what}")
                p.insert_on_operand(lin, 0, op)
                n = _ops(op)
                weights.transform_inputs(p, mm.linears[lin], t.matrix())
                report.count("online transform", f"block {b.index} {what} input ({n} aten ops, kept steps {t.steps})")
    else:
        _fused(p, calibration, report, opts, tokens, seed, batch, progress)
    report.notes["placement"] = placement
    report.notes["greedy"] = f"block {block}, {steps} steps, {'R·P·R' if permute else 'R'}, {index}-indexed"
    p.rematch()
    return p.done(report)


def _fused(p: Program, calibration, report, opts, tokens, seed, batch, progress) -> None:
    untie_embeddings(p, report)
    mm = p.model_map
    for norm in mm.norms:
        if norm.kind != "rms" or norm.bias or (norm.weight and not bool(torch.all(p.weight(norm.weight) + norm.offset == 1))):
            raise UnsafeRewriteError(f"norm {norm.node} is not a plain RMSNorm after folding; the fused stream "
                                     "transform would not be exact")
    watch = {n.readers[0]: 0 for n in mm.norms if n is not mm.final_norm}
    for b in mm.blocks:
        watch[b.attention.o] = 0
        if b.ffn.kind != "moe":
            watch[b.ffn.down] = 0
    per = max(1, tokens // max(1, len(mm.norms) - 1))
    stats = collect(p, _first_windows(calibration, per), watch, batch=batch, keep_tokens=per, progress=False,
                    device=p.device)
    stream = torch.cat([_rows(stats, n.readers[0]) for n in mm.norms if n is not mm.final_norm])
    t = duquant_transform(stream, seed=seed, **opts)
    q = t.matrix()
    for emb in filter(None, (mm.embedding, mm.positional)):
        p.set_weight(emb.weight, p.weight(emb.weight).detach().double() @ q)
        report.count("fused stream: embedding", emb.weight)
    for r in mm.readers:
        weights.transform_inputs(p, mm.linears[r], q)
    for w in mm.writers:
        weights.transform_outputs(p, mm.linears[w], q)
    report.count("fused stream: reader", n=len(mm.readers))
    report.count("fused stream: writer", n=len(mm.writers))
    report.notes["stream kept steps"] = t.steps
    for b in tqdm(mm.blocks, desc="duquant-fused", unit="block", disable=not progress):
        a = b.attention
        proof = mm.holds(f"v_to_o:{a.node}")
        if proof is None or not proof.holds:
            raise UnsafeRewriteError(f"duquant-fused at attention {a.node}: {proof.reason if proof else 'not proved'}")
        heads = _rows(stats, a.o).reshape(-1, a.head_dim)
        th = duquant_transform(heads, block=a.head_dim, steps=opts["steps"], permute=False, index=opts["index"],
                               seed=seed + 1 + b.index)
        qh = th.matrix()
        v = mm.linears[a.v.linear]
        for h in range(a.n_kv_heads):
            start = a.v.start + h * a.head_dim
            weights.transform_outputs(p, v, qh, start, start + a.head_dim)
        weights.transform_inputs(p, mm.linears[a.o], torch.block_diag(*[qh] * a.n_heads))
        report.count("fused head pair", f"{a.v.linear}→{a.o}")
        if b.ffn.kind == "moe":
            report.skip(f"block {b.index} down", "MoE experts read gathered inputs; not transformed")
            continue
        # the down input keeps the model's stream-independent FFN width: online, like R4
        td = duquant_transform(_rows(stats, b.ffn.down), seed=seed + 1000 + b.index, **opts)
        op = online_transform(td, f"duquant.{b.index}.down")
        p.insert_on_operand(b.ffn.down, 0, op)
        n = _ops(op)
        weights.transform_inputs(p, mm.linears[b.ffn.down], td.matrix())
        report.count("online transform", f"block {b.index} down input ({n} aten ops)")


def plan(mm, options: DuQuantOptions | None = None) -> list[str]:
    o = options or DuQuantOptions()
    placement, block, steps, permute, index = o.placement, o.block, o.steps, o.permute, o.index
    layers = len(mm.blocks)
    dense_moe = [b for b in mm.blocks if b.ffn.kind != "moe"]
    widths = {"hidden": mm.hidden, "o": mm.linears[mm.blocks[0].attention.o].in_features,
              "down": mm.linears[mm.blocks[0].ffn.down].in_features}
    shape = ", ".join(f"{k} {c} = {c // block}×{block}" + (f" + {c % block} (a block of its own)" if c % block else "")
                      if c >= block else f"{k} {c} (one block of {c})" for k, c in widths.items())
    greedy = f"greedy {steps} steps, block {block}, {'R·P·R' if permute else 'R'}, {index}-indexed; {shape}"
    if placement == "duquant":
        online = 3 * layers + len(dense_moe)
        return [greedy, f"{online} online transforms (q, o, gate, down inputs per layer), weights pre-transformed"]
    for b in mm.blocks:
        proof = mm.holds(f"v_to_o:{b.attention.node}")
        if proof is None or not proof.holds:
            raise UnsafeRewriteError(f"duquant-fused at attention {b.attention.node}: "
                                     f"{proof.reason if proof else 'not proved'}")
    return [greedy, f"stream transform fused into {len(mm.readers)} readers, {len(mm.writers)} writers and the "
                    f"embeddings; {layers} v→o head transforms fused; {len(dense_moe)} online transforms on down inputs"]
