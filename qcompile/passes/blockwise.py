"""blockwise: run a Program's graph one transformer block at a time, on a chosen device.

The captured graph is one flat fx graph. ``Segments`` cuts it after each block's residual add
(``Block.ffn_add``): segment 0 runs from the inputs through block 0 (embeddings, rotary tables, the
mask, block 0), segment i is block i, and a tail holds the final norm and the lm_head. Between segments,
for every calibration batch, only the values that later segments read are kept (the residual stream,
the rotary tables, the mask): the activations are carried block to block.

``BlockRunner`` runs one segment over every batch with the segment's weights moved to the compute
device and back afterwards, into the very tensors they left (changed weights copied in place, the others
only pointed at again: no fresh host memory), so the device holds one block's weights, the
carried activations and one batch's working values. A lazy weight (``Program.lazy``: still in the checkpoint's
shards) is read into a float32 tensor on the device when its block loads and left as it was when the block is
done; one the block changed goes to host memory, and a quantized one is kept as its codes alone
(``lazy_weights.keep_as_codes``), so host memory holds the codes and one block, whatever the number of
blocks. Running segment by segment computes exactly what the whole graph computes (the same ops on the
same values); only the order in which batches and blocks interleave changes, so reductions over batches
(Hessians, statistics) are summed in the same order as in a whole-graph run per batch.

``quantize_blockwise`` is GPTQ/LeanQuant layer by layer: within a block, the linears that share an
input (q/k/v, o, gate/up, down, in graph order: GPTQ's sequential groups) are a *stage*; for each stage
the block runs from its input up to the stage's input over all batches (earlier stages already
quantized), the Hessian is summed, the stage's weights are quantized on the device, and after the last
stage the whole block runs once more to carry its output forward. With several processes
(``passes.distributed.Ranks``) each carries its share of the batches, copies its share of each block's weights to
its GPU (the rest arrives over NCCL), the Hessian sums are all-reduced and
a stage's linears are dealt out and broadcast; every local step is agreed on, so one rank's error stops all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import fx
from tqdm import tqdm

import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.fake_quant)
from qcompile.errors import QCompileError
from qcompile.graph.fx import CausalAttention
from qcompile.graph.lazy_weights import keep_as_codes, put_param
from qcompile.passes.distributed import SINGLE, Ranks, SummedHessian
from qcompile.program import Program, move_quantized
from qcompile.quant.gptq import factor_shared_by
from qcompile.quant.rows import cat_rows, row_runs, split_rows


class DeviceMemoryError(QCompileError):
    """The plan's per-block memory does not fit the device; raised before the heavy step starts."""


def _owner(gm: torch.nn.Module, target: str):
    *path, leaf = target.split(".")
    obj = gm
    for part in path:
        obj = getattr(obj, part)
    return obj, leaf


def _tensor_of(gm: torch.nn.Module, target: str) -> torch.Tensor | None:
    """The tensor behind one parameter (its ``data``), buffer or tensor constant."""
    value = _attr(gm, target)
    if isinstance(value, torch.nn.Parameter):
        return value.data
    return value if isinstance(value, torch.Tensor) else None


def put_attr(gm: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    """Make one parameter (keeping the Parameter object), buffer or tensor constant hold ``tensor``."""
    owner, leaf = _owner(gm, target)
    if leaf in owner._parameters and owner._parameters[leaf] is not None:
        put_param(gm, target, tensor)
    elif leaf in owner._buffers and owner._buffers[leaf] is not None:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)


def move_attr(gm: torch.nn.Module, target: str, device: torch.device) -> None:
    """Move one parameter, buffer or tensor constant to ``device``, keeping the Parameter object."""
    value = _tensor_of(gm, target)
    if value is not None and value.device != device:
        put_attr(gm, target, value.to(device))


def attr_device(gm: torch.nn.Module, target: str) -> torch.device | None:
    owner, leaf = _owner(gm, target)
    value = getattr(owner, leaf, None)
    return value.device if isinstance(value, torch.Tensor) else None


class Segments:
    """The graph's nodes cut after each block's residual add; what each segment reads and leaves behind."""

    def __init__(self, gm: fx.GraphModule, model_map):
        nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        by_name = {n.name: n for n in nodes}
        ends = [index[by_name[b.ffn_add]] for b in model_map.blocks]
        if ends != sorted(ends):
            raise QCompileError("blockwise: the blocks' residual adds are not in graph order; run the whole graph")
        cuts = [-1, *ends, len(nodes)]
        self.nodes: list[list[fx.Node]] = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            self.nodes.append([n for n in nodes[a + 1 : b + 1] if n.op in ("call_function", "call_method",
                                                                              "call_module")])
        self.names = [f"block {i}" for i in range(len(ends))] + ["tail"]
        self.inputs = [n for n in nodes if n.op == "placeholder"]
        seg_of = {n: k for k, seg in enumerate(self.nodes) for n in seg}
        for n in self.inputs:
            seg_of[n] = -1
        # the weights each segment reads, and the values that outlive each segment
        self.attrs: list[list[str]] = [sorted({a.target for n in seg for a in n.all_input_nodes if a.op == "get_attr"})
                                       for seg in self.nodes]
        last_reader: dict[fx.Node, int] = {}
        for k, seg in enumerate(self.nodes):
            for n in seg:
                for a in n.all_input_nodes:
                    if a.op != "get_attr":
                        last_reader[a] = max(last_reader.get(a, -1), k)
        self.live_out: list[set[fx.Node]] = [
            {v for v, last in last_reader.items() if seg_of.get(v, -1) <= k < last} for k in range(len(self.nodes))
        ]
        # within a segment: after which node each value is dead (unless it lives on)
        self.free_after: list[dict[fx.Node, list[fx.Node]]] = []
        for k, seg in enumerate(self.nodes):
            last: dict[fx.Node, fx.Node] = {}
            for n in seg:
                for a in n.all_input_nodes:
                    if a.op != "get_attr":
                        last[a] = n
            free: dict[fx.Node, list[fx.Node]] = {}
            for v, n in last.items():
                if v not in self.live_out[k]:
                    free.setdefault(n, []).append(v)
            self.free_after.append(free)

    def __len__(self) -> int:
        return len(self.nodes)


class BlockRunner(CausalAttention, fx.Interpreter):
    """Runs the segments of ``program``'s graph over batches of windows on ``device``."""

    def __init__(self, program: Program, device: torch.device | str | None = None, segments: Segments | None = None):
        super().__init__(program.module, garbage_collect_values=False)
        self.program = program
        self.device = torch.device(device) if device is not None else program.device
        self.segments = segments or Segments(program.module, program.model_map)
        self.on_node: Callable[[fx.Node, dict], None] | None = None  # called before a node runs

    def start(self, windows: torch.Tensor, batch: int) -> list[dict]:
        """One environment per batch of windows: the graph's input on the device."""
        if len(self.segments.inputs) != 1:
            raise QCompileError("blockwise: the graph must take input_ids alone")
        ids = self.segments.inputs[0]
        return [{ids: windows[s : s + batch].to(self.device)} for s in range(0, windows.shape[0], batch)]

    def load(self, k: int, ranks: Ranks = SINGLE) -> dict:
        """Move segment ``k``'s weights to the device; returns the tensors they leave behind (for ``unload``).

        With several ranks on GPUs (NCCL), each rank copies only its share of the weights from its host (dealt
        by bytes) and receives the others' from their owners over NCCL: every rank ends with the same tensors,
        the host-to-device copies split among ranks (the link between GPUs is the faster one)."""
        gm = self.module
        home = {}
        lazy = self.program.lazy
        for t in self.segments.attrs[k]:
            if t in lazy:  # every rank reads its own copy from the shards (no dealing)
                home[t] = _tensor_of(gm, t)
                put_attr(gm, t, lazy[t].materialize(self.device))
        moving = [(t, v) for t in self.segments.attrs[k]
                  if t not in lazy and (v := _tensor_of(gm, t)) is not None and v.device != self.device]
        shared = ranks.distributed and self.device.type == "cuda" and len(moving) > 1
        owners = ranks.deal([_bytes(v) for _, v in moving]) if shared else [ranks.rank] * len(moving)
        for (t, value), owner in zip(moving, owners):
            home[t] = value
            put_attr(gm, t, value.to(self.device) if owner == ranks.rank
                     else torch.empty(value.shape, dtype=value.dtype, device=self.device))
        if shared:
            for (t, _), owner in zip(moving, owners):
                ranks.broadcast_(_tensor_of(gm, t), owner)
        return home

    def unload(self, home: dict, changed: set[str] | None = None) -> None:
        """The weights back on the tensors they left, in place (no new host memory): those in ``changed`` (all
        by default) copied into them, the others, unchanged, just pointed at them again. A lazy weight is left
        lazy when unchanged; a changed one is copied to host memory and is no longer lazy."""
        for t, host in home.items():
            if t in self.program.lazy:
                if changed is None or t in changed:
                    put_attr(self.module, t, _tensor_of(self.module, t).to("cpu"))
                    del self.program.lazy[t]
                else:
                    put_attr(self.module, t, host)
                continue
            if changed is None or t in changed:
                host.copy_(_tensor_of(self.module, t))
            put_attr(self.module, t, host)

    @contextlib.contextmanager
    def weights_on_device(self, k: int, changed: set[str] | None = None):
        """Segment ``k``'s weights on the device while the block runs, back where they were after (``unload``:
        the ``changed`` ones, all by default, copied back)."""
        home = self.load(k)
        try:
            yield
        finally:
            self.unload(home, changed)

    def run_segment(self, k: int, envs: list[dict], until: fx.Node | None = None,
                    consume: Callable[[torch.Tensor], None] | None = None) -> list[dict]:
        """Run segment ``k`` over every batch; with ``until``, only up to that node and hand each batch's value
        of it to ``consume`` (the carried environments are untouched); else return the new carried ones."""
        seg = self.segments.nodes[k]
        stop = len(seg) if until is None else (seg.index(until) + 1 if until in seg else 0)
        attrs = {a: self.fetch_attr(a.target) for n in seg[:stop] for a in n.all_input_nodes if a.op == "get_attr"}
        free = self.segments.free_after[k]
        out = []
        for env in envs:
            self.env = {**env, **attrs}
            for n in seg[:stop]:
                if self.on_node is not None:
                    self.on_node(n, self.env)
                self.env[n] = self.run_node(n)
                if until is None:
                    for v in free.get(n, ()):
                        self.env.pop(v, None)
            if until is not None:
                consume(self.env[until])
            else:
                out.append({v: self.env[v] for v in self.segments.live_out[k]})
            self.env = {}
        return out


def shared_input(x: fx.Node):
    """What identifies the value a linear reads, so that linears reading equal values share one Hessian: the
    node itself, or for an activation fake-quantization (one per reader, inserted by ``quantize``) the op and
    its operands: ``fake_quant(v, bits, sym, clip)`` of the same ``v`` is the same tensor for every reader."""
    if x.op == "call_function" and x.target is torch.ops.qcompile.fake_quant.default:
        return ("fake_quant", x.args, tuple(sorted(x.kwargs.items())))
    return x


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def check_memory(program: Program, segments: Segments, device: torch.device, calibration: torch.Tensor,
                 batch: int, hessian_width: int) -> int:
    """Predicted peak bytes on ``device`` for the largest block; raises ``DeviceMemoryError`` when it exceeds
    the device's free memory. Counts the block's weights, the carried residual stream of every window (in
    the weights' dtype), one batch's widest values (×6 live at once), and GPTQ's Hessian and its factors (×4)."""
    gm = program.module
    weights = max(sum(_bytes(_attr(gm, t)) for t in attrs) for attrs in segments.attrs)
    mm = program.model_map
    itemsize = _tensor_of(gm, mm.linears[next(iter(mm.linears))].weight).element_size()
    n, seq = calibration.shape
    widest = max(lin.out_features for lin in mm.linears.values() if lin.node != mm.lm_head)
    carried = n * seq * mm.hidden * itemsize
    working = 6 * min(batch, n) * seq * max(widest, mm.hidden) * itemsize
    # a materialized mask/score; an attention the matcher did not prove (multi-head latent attention) is
    # counted with one head per 64 channels of the residual stream
    heads = max((b.attention.n_heads for b in mm.blocks if b.attention is not None), default=max(1, mm.hidden // 64))
    attention = min(batch, n) * heads * seq * seq * itemsize
    hessian = 4 * hessian_width ** 2 * 4
    need = weights + carried + working + attention + hessian
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if need > free:
            raise DeviceMemoryError(
                f"blockwise on {device}: the largest block needs about {need / 2**30:.1f} GiB (weights "
                f"{weights / 2**30:.1f}, carried activations {carried / 2**30:.1f}, working {working / 2**30:.1f}, "
                f"attention {attention / 2**30:.1f}, Hessians {hessian / 2**30:.1f}) but {free / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} are free; use fewer calibration windows or a smaller batch")
    return need


def _attr(gm, target):
    owner, leaf = _owner(gm, target)
    return getattr(owner, leaf, None)


@torch.no_grad()
def collect_blockwise(program: Program, windows: torch.Tensor, on_node: Callable[[fx.Node, dict], None],
                      watched: set[str], batch: int = 4, device=None, progress: bool = False,
                      segments: Segments | None = None) -> None:
    """Run the graph block by block over ``windows`` calling ``on_node(node, env)`` before each node; stops
    after the last segment that holds a watched node."""
    runner = BlockRunner(program, device, segments)
    segs = runner.segments
    last = max((k for k, seg in enumerate(segs.nodes) if any(n.name in watched for n in seg)), default=-1)
    envs = runner.start(windows, batch)
    runner.on_node = on_node
    for k in tqdm(range(last + 1), desc="calibrate", unit="block", disable=not progress):
        with runner.weights_on_device(k, changed=set()):  # statistics only: no weight changes
            envs = runner.run_segment(k, envs)


class _Clock:
    """Seconds per phase (``timings`` of ``quantize_blockwise``), the device synchronized at each boundary."""

    def __init__(self, into: dict | None, device: torch.device):
        self.into, self.cuda = into, device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.into is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.into[phase] = self.into.get(phase, 0.0) + time.perf_counter() - t


def _quantize_dealt(program, lins, acc, quantize_linear, store, ranks, clock, bar, what: str) -> None:
    """A stage's linears one by one, whole linears dealt out among ranks (longest first) and broadcast."""
    owners = ranks.deal([lin.in_features * (lin.out_features + 4096) for lin in lins])
    with clock("quantize"), ranks.step(what):
        H = acc.hessian()
        for lin, owner in zip(lins, owners):
            if owner == ranks.rank:
                quantize_linear(lin, H)
                bar.update(1)
    del H
    if ranks.distributed:
        with clock("broadcast"):
            for lin, owner in zip(lins, owners):
                mine = program.quantized[lin.weight] if owner == ranks.rank else None
                qw = ranks.broadcast_quantized(mine, owner)
                if owner != ranks.rank:
                    store(lin, qw)
                    bar.update(1)


def _quantize_stacked(lins, acc, rows_of, quantize_rows, store, ranks, clock, bar, what: str) -> None:
    """A stage's linears as one stacked matrix; rank r quantizes run r of its rows; every rank stores all."""
    with clock("stack"):
        parts = [rows_of(lin) for lin in lins]
        sizes = [w.shape[0] for w in parts]
        W = torch.cat(parts) if len(parts) > 1 else parts[0]
        del parts
    runs = row_runs(W.shape[0], ranks.world)
    name = "+".join(lin.weight for lin in lins)
    share = ranks if all(hi > lo for lo, hi in runs) else None  # every rank then computes the stage's factor
    with clock("quantize"), ranks.step(what), factor_shared_by(share):
        lo, hi = runs[ranks.rank]
        mine = quantize_rows(W[lo:hi], acc.hessian(), name) if hi > lo else None
    del W
    if ranks.distributed:
        with clock("broadcast"):
            parts = [ranks.broadcast_quantized(mine, r) for r, (lo, hi) in enumerate(runs) if hi > lo]
        qw = cat_rows(parts)
    else:
        qw = mine
    with clock("store"):
        for lin, part in zip(lins, split_rows(qw, sizes) if len(lins) > 1 else [qw]):
            store(lin, part)
            bar.update(1)


def _store(program: Program, lin, qw) -> None:
    program.set_weight(lin.weight, qw.weight.reshape(program.weight(lin.weight).shape))
    program.quantized[lin.weight] = qw


@torch.no_grad()
def quantize_blockwise(program: Program, targets: dict, quantize_linear: Callable, calibration: torch.Tensor,
                       device=None, batch: int = 4, progress: bool = True, ranks: Ranks | None = None,
                       store: Callable | None = None, timings: dict | None = None,
                       rows_of: Callable | None = None, quantize_rows: Callable | None = None) -> None:
    """Quantize the linears ``targets`` {node name: Linear} of ``program`` in place, block by block.

    ``quantize_linear(lin, H)`` quantizes one linear's weight (on the device while its block runs) against
    Hessian ``H`` and stores it in the Program (``program.quantized[weight]``); the codes then leave the
    device with their block, for the weights' home device.

    With ``ranks`` of a world larger than one (``passes.distributed``), this process carries its share of the
    windows, the Hessians are all-reduced, each rank quantizes its share of a stage's linears and receives the
    others' through ``store(lin, qw)`` (default: set the weight and ``program.quantized``); ``device`` is then
    ``ranks.device``. ``timings`` (a dict) receives seconds per phase: forward (the block up to each stage and
    the Hessian sums), reduce, quantize, broadcast, carry (the whole block, for the next one), weights in,
    weights out (a block's weights to the device and home), codes home.

    With ``rows_of(lin)`` (a linear's weight as float rows ``[N, K]``) and ``quantize_rows(W, H, name)`` (a
    QuantizedWeight of any rows against ``H``), a stage is quantized as one matrix: its linears' rows stacked
    (they share ``H``, and GPTQ is row by row: ``quant.rows``), the stack's rows dealt out among ranks in even
    contiguous runs, and each linear's rows stored from the joined result. Without them each linear is
    quantized on its own by ``quantize_linear(lin, H)``, whole linears dealt out among ranks.
    """
    stacked = rows_of is not None and quantize_rows is not None
    ranks = ranks or SINGLE
    if ranks.distributed:
        device = ranks.device
        calibration = ranks.windows(calibration, batch)
    store = store or (lambda lin, qw: _store(program, lin, qw))
    runner = BlockRunner(program, device)
    segs, dev = runner.segments, runner.device
    clock = _Clock(timings, dev)
    widths = [lin.in_features for lin in targets.values()]
    with ranks.step("checking device memory"):
        check_memory(program, segs, dev, calibration, batch, max(widths, default=0))
    envs = runner.start(calibration, batch)
    todo = [k for k, seg in enumerate(segs.nodes) if any(n.name in targets for n in seg)]
    bar = tqdm(total=len(targets), desc="blockwise", unit="linear", disable=not (progress and ranks.lead))
    for k in range(max(todo, default=-1) + 1):
        stages: dict[object, list[fx.Node]] = {}  # readers of one value (GPTQ's sequential group), graph order
        for n in segs.nodes[k]:
            if n.name in targets:
                stages.setdefault(shared_input(n.args[0]), []).append(n)
        with clock("weights in"):
            lazy = {t for t in segs.attrs[k] if t in program.lazy}
            home = runner.load(k, ranks)
        try:
            for readers in stages.values():
                x_node = readers[0].args[0]  # the first reader's input (the others' are equal to it)
                lin0 = targets[readers[0].name]
                acc = SummedHessian(lin0.in_features, name=lin0.weight, device=dev)
                def add(v, acc=acc, k_in=lin0.in_features):
                    acc.add(v.reshape(-1, k_in))

                with clock("forward"), ranks.step(f"calibrating {segs.names[k]}"):
                    if x_node in segs.nodes[k]:  # one batch at a time: only its input is alive at once
                        runner.run_segment(k, envs, until=x_node, consume=add)
                    else:
                        for env in envs:
                            add(env[x_node])
                with clock("reduce"):
                    acc.all_reduce(ranks)
                lins = [targets[n.name] for n in readers]
                what = f"quantizing {segs.names[k]}"
                if stacked:
                    _quantize_stacked(lins, acc, rows_of, quantize_rows, store, ranks, clock, bar, what)
                else:
                    _quantize_dealt(program, lins, acc, quantize_linear, store, ranks, clock, bar, what)
                del acc
            if k < len(segs) - 1 and k < max(todo):
                with clock("carry"), ranks.step(f"running {segs.names[k]}"):
                    envs = runner.run_segment(k, envs)
        finally:
            lins = [targets[n.name] for n in segs.nodes[k] if n.name in targets]
            with clock("weights out"):
                shared = {lin.weight for lin in lins if _weight_view(program, lin) is not None}
                runner.unload(home, changed={lin.weight for lin in lins})
        with clock("codes home"):
            for lin in lins:  # the codes leave the device with their block
                # a shared dequantized weight is the Program's, now home: not copied twice
                codes_home(program, lin.weight, lin.weight in lazy,
                           _weight_view(program, lin) if lin.weight in shared else None)
    bar.close()


def codes_home(program: Program, weight: str, was_lazy: bool, dequantized: torch.Tensor | None = None) -> None:
    """A weight quantized on the device, its block done: one read from the shards (``was_lazy``) kept as its codes
    alone, dequantized when read (``keep_as_codes``), where that is exact; else its QuantizedWeight moved where
    the Program's weight lives, with ``dequantized`` as its weight if given."""
    qw = program.quantized[weight]
    if was_lazy:
        program.quantized[weight] = keep_as_codes(program.lazy, program.module, weight, qw)
        if weight in program.lazy:
            return
    if dequantized is not None:
        qw = dataclasses.replace(qw, weight=dequantized)
    program.quantized[weight] = move_quantized(qw, attr_device(program.module, weight))


def _weight_view(program: Program, lin):
    """The Program's weight of ``lin`` viewed as its QuantizedWeight's dequantized ``weight`` [rows, K], where
    the two are equal bit for bit (the store sets one from the other), else None."""
    qw = program.quantized.get(lin.weight)
    w = program.weight(lin.weight).detach()
    if qw is None or not isinstance(getattr(qw, "weight", None), torch.Tensor) or qw.weight.dtype != w.dtype \
            or qw.weight.numel() != w.numel():
        return None
    view = w.movedim((lin.out_axis, lin.in_axis), (-2, -1)).reshape(qw.weight.shape)
    if view.device == qw.weight.device and not torch.equal(view, qw.weight):
        return None
    return view


@torch.no_grad()
def logits_blockwise(program: Program, input_ids: torch.Tensor, device=None, batch: int = 4) -> torch.Tensor:
    """The graph's logits for ``input_ids`` run one block at a time on ``device`` (default: the Program's), each
    block's weights there only while it runs: how a Program with lazy weights runs. The same ops on the same
    values as the whole graph."""
    runner = BlockRunner(program, device)
    segs = runner.segments
    output = next(n for n in program.module.graph.nodes if n.op == "output")
    flat = []
    fx.node.map_arg(output.args, flat.append)
    logits = flat[0]  # the first tensor the graph returns (a causal LM's output starts with its logits)
    envs = runner.start(input_ids, batch)
    out = []
    for k in range(len(segs)):
        with runner.weights_on_device(k, changed=set()):
            if k < len(segs) - 1:
                envs = runner.run_segment(k, envs)
            else:
                runner.run_segment(k, envs, until=logits, consume=out.append)
    return torch.cat(out)
