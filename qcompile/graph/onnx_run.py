"""Run an ONNX Program's graph one transformer block at a time in onnxruntime, for calibration and GPTQ.

The ONNX twin of ``passes/blockwise``. Segment k is the sub-graph that computes block k's residual-stream
output (``Block.ffn_add``) from block k−1's and the input ids (the rotary tables and the mask are
recomputed from the ids in every segment: they cost little); segment 0 starts from the ids (embedding
included), a tail computes the logits. Each segment becomes its own onnxruntime session whose extra
outputs are the inputs of the linears it quantizes, and whose weights are *graph inputs* fed from the
Program's tensors at every run: a weight quantized a moment ago is what the next run reads, without
rebuilding the session. Between segments only the residual stream of every window is kept, so memory
holds one block's activations for one batch plus the carried stream, whatever the depth.

Within a segment the linears that read one value (q/k/v, o, gate/up, down) are a *stage*, in graph order:
for each stage the segment runs over every batch up to the stage's input, the Hessian is summed, the
stage's weights are quantized; after the last stage the segment runs once more to carry its output
forward. That is GPTQ's sequential order, with each layer's input computed by the already-quantized
layers before it, as in the fx path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from tqdm import tqdm

from qcompile.errors import QCompileError


def _info(v: ir.Value) -> onnx.ValueInfoProto:
    dims = None if v.shape is None else [d if isinstance(d, int) else None for d in v.shape]
    return onnx.helper.make_tensor_value_info(v.name, v.dtype.value if v.dtype else 0, dims)


class Segment:
    """The nodes that compute ``outputs`` from ``stream_in`` (None: from the ids) and the constants."""

    def __init__(self, graph, stream_in: ir.Value | None, stream_out: ir.Value | None, order: dict):
        self.graph, self.stream_in, self.stream_out = graph, stream_in, stream_out
        stop = {stream_in} if stream_in is not None else set()
        seen, stack = set(), [stream_out if stream_out is not None else graph.model.graph.outputs[0]]
        while stack:
            v = stack.pop()
            p = v.producer()
            if v in stop or p is None or p in seen:
                continue
            seen.add(p)
            stack.extend(i for i in p.inputs if i is not None)
        self.nodes = sorted(seen, key=order.__getitem__)
        self.node_set = seen
        self._sessions: dict[tuple[str, ...], object] = {}

    def session(self, outputs: list[ir.Value]):
        """An onnxruntime session computing ``outputs``; the segment's weights are its inputs."""
        key = tuple(v.name for v in outputs)
        if key not in self._sessions:
            self._sessions[key] = self._build(outputs)
        return self._sessions[key]

    def _build(self, outputs: list[ir.Value]):
        import onnxruntime as ort

        g = self.graph
        stack, nodes = list(outputs), set()
        while stack:  # only the nodes the outputs need
            v = stack.pop()
            p = v.producer()
            if v is self.stream_in or p is None or p in nodes or p not in self.node_set:
                continue
            nodes.add(p)
            stack.extend(i for i in p.inputs if i is not None)
        ordered = [n for n in self.nodes if n in nodes]
        read = {i for n in ordered for i in n.inputs if i is not None}
        ids = [v for v in g.model.graph.inputs if v in read]
        self.weights = sorted(v.name for v in read if v.is_initializer() and v.name in g.weights)
        consts = [v for v in read if v.is_initializer() and v.name not in g.weights]
        inputs = [_info(v) for v in ids] + ([_info(self.stream_in)] if self.stream_in in read else [])
        inputs += [_info(g.model.graph.initializers[w]) for w in self.weights]
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in ordered], "segment", inputs, [_info(v) for v in outputs],
            initializer=[ir.serde.serialize_tensor(v.const_value) for v in consts])
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in g.model.opset_imports.items()],
            functions=[ir.serde.serialize_function(f) for f in g.model.functions.values()],
            ir_version=g.model.ir_version)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = False  # an arena per segment session would keep each one's peak
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        session.qcompile_feeds = ([v.name for v in ids], self.stream_in.name if self.stream_in in read else None,
                                  list(self.weights))
        return session

    def release(self) -> None:
        """Drop the segment's sessions (their memory) once its block is done."""
        self._sessions.clear()

    def run(self, outputs: list[ir.Value], ids: np.ndarray, stream: np.ndarray | None,
            weights: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """``outputs`` for token ids ``ids`` and the carried ``stream``; ``weights`` replace the Program's."""
        s = self.session(outputs)
        id_names, stream_name, names = s.qcompile_feeds
        feed = self.graph.feeds(ids, id_names)
        if stream_name is not None:
            feed[stream_name] = stream
        weights = weights or {}
        feed |= {w: weights[w] if w in weights else self.graph.weights[w].numpy() for w in names}
        return s.run([v.name for v in outputs], feed)


def segments(graph, model_map) -> list[Segment]:
    """One segment per block (cut after its residual add ``ffn_add``) and a tail to the logits."""
    order = {n: i for i, n in enumerate(graph.model.graph)}
    cuts = [graph.value(b.ffn_add) for b in model_map.blocks]
    bounds = [None, *cuts, None]
    return [Segment(graph, a, b, order) for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def quantize_blockwise(program, targets: dict, quantize_linear: Callable, calibration: torch.Tensor,
                       batch: int = 4, progress: bool = True) -> None:
    """GPTQ/LeanQuant on an ONNX Program, segment by segment (see the module docstring).

    ``targets`` {OpGraph linear: Linear}; ``quantize_linear(lin, H)`` quantizes one weight against Hessian H
    and writes it into the Program (``set_weight``), where the next run of the segment reads it.
    """
    from qcompile.quant.gptq import HessianAccumulator

    graph, og = program.graph, program.graph.opgraph()
    segs = segments(graph, program.model_map)
    owner = {}
    for name in targets:
        root = graph.members(name)[0]
        k = next((k for k, s in enumerate(segs) if root in s.node_set), None)
        if k is None:
            raise QCompileError(f"{graph.path}: linear {name} lies in no block of the residual stream")
        owner.setdefault(k, []).append(name)
    ids_dtype = np.int32 if graph.model.graph.inputs[0].dtype == ir.DataType.INT32 else np.int64
    batches = [calibration[s:s + batch].numpy().astype(ids_dtype) for s in range(0, calibration.shape[0], batch)]
    carried: list = [None] * len(batches)
    last = max(owner, default=-1)
    bar = tqdm(total=len(targets), desc="gptq (onnxruntime)", unit="linear", disable=not progress)
    for k in range(last + 1):
        seg = segs[k]
        stages: dict[str, list[str]] = {}
        for name in sorted(owner.get(k, []), key=lambda n: seg.nodes.index(graph.members(n)[0])):
            stages.setdefault(og.operand(name, 0), []).append(name)
        for x_name, readers in stages.items():
            x = graph.value(x_name)
            lin0 = targets[readers[0]]
            acc = HessianAccumulator(lin0.in_features, name=lin0.weight)
            for ids, stream in zip(batches, carried):
                (value,) = seg.run([x], ids, stream)
                acc.add(torch.from_numpy(value).reshape(-1, lin0.in_features))
            H = acc.hessian()
            for name in readers:
                quantize_linear(targets[name], H)
                bar.update(1)
        if k < last:
            carried = [seg.run([seg.stream_out], ids, stream)[0] for ids, stream in zip(batches, carried)]
        seg.release()
    bar.close()


@torch.no_grad()
def collect_values(program, windows: torch.Tensor, watch: dict[str, str],
                   on_value: Callable[[str, torch.Tensor], None], progress: bool = False) -> None:
    """Calibration statistics on an ONNX Program: ``on_value(key, x)`` for each watched ``{key: ONNX value
    name}`` and every window, with x that value in float32 (``calibrate.collect``'s ONNX path).

    Segment by segment as GPTQ runs (see the module docstring), one window at a time: each segment's session
    computes its watched values and its residual-stream output, which alone is carried to the next; the
    segments after the last watched value are not run. A value is read from the first segment that
    computes it (the rotary tables and the mask are recomputed in each).
    """
    graph = program.graph
    segs = segments(graph, program.model_map)
    by_value: dict[str, list[str]] = {}
    for key, name in watch.items():
        by_value.setdefault(name, []).append(key)
    owner: dict[int, list[ir.Value]] = {}
    for name in by_value:
        v = graph.value(name)
        k = next((k for k, s in enumerate(segs) if v.producer() in s.node_set), None)
        if k is None:
            raise QCompileError(f"{graph.path}: value {name} is computed by no node of the model's blocks")
        owner.setdefault(k, []).append(v)
    ids_dtype = np.int32 if graph.model.graph.inputs[0].dtype == ir.DataType.INT32 else np.int64
    # one window per run: onnxruntime's RotaryEmbedding refuses a batch over [1, S, D] tables
    ids = [w[None].numpy().astype(ids_dtype) for w in windows]
    carried: list = [None] * len(ids)
    last = max(owner, default=-1)
    for k in tqdm(range(last + 1), desc="calibrate (onnxruntime)", unit="block", disable=not progress):
        seg, values = segs[k], owner.get(k, [])
        outputs = values + ([seg.stream_out] if k < last else [])
        if not outputs:
            continue
        for i, (w, stream) in enumerate(zip(ids, carried)):
            results = seg.run(outputs, w, stream)
            for v, x in zip(values, results):
                for key in by_value[v.name]:
                    on_value(key, torch.from_numpy(x))
            if k < last:
                carried[i] = results[-1]
        seg.release()


_PASS_THROUGH = ("Cast", "CastLike", "Identity", "Reshape")  # per-token quantization commutes with them


class Cone:
    """The sub-graph from value ``start`` to value ``end`` (OS+'s search: a norm's output to the attention
    output, or to act(gate)·up; down's input to its output), run in onnxruntime with ``start`` fed and the
    readers' weights replaced. The other values it reads (rotary tables, the mask) are recomputed from the
    search windows' ids. The twin of ``passes/shift_scale._Cone``: ``start``/``end`` name the recorded
    values, ``run`` computes ``end``.

    The readers' input fake quantization is applied to the fed ``start`` value, so every node of the cone
    that reads ``start``'s values must be a reader, possibly through casts and reshapes (refused otherwise,
    naming the node); ``Shape`` and ``CastLike``'s type operand read none."""

    def __init__(self, program, start: str, end: str, readers, windows: torch.Tensor):
        g = program.graph
        self.program, self.start, self.end = program, start, end
        self.reader_names = list(readers)
        order = {n: i for i, n in enumerate(g.model.graph)}
        self.segment = Segment(g, g.value(start), g.value(end), order)
        members = {n for r in self.reader_names for n in g.members(r)}
        stack = [g.value(start)]
        while stack:
            for user, pos in stack.pop().uses():
                if user not in self.segment.node_set or user in members or user.op_type == "Shape" or \
                        (user.op_type == "CastLike" and pos == 1):
                    continue  # outside, a reader, or reads only the shape or type
                if user.op_type in _PASS_THROUGH and pos == 0:
                    stack.append(user.outputs[0])  # a cast or reshape on the way to the readers
                    continue
                raise QCompileError(f"{g.path}: {user.name} ({user.op_type}) reads {start} inside the search cone "
                                    f"{start}→{end} but is none of its readers {self.reader_names}")
        ids_dtype = np.int32 if g.model.graph.inputs[0].dtype == ir.DataType.INT32 else np.int64
        self.ids = [w[None].numpy().astype(ids_dtype) for w in windows]

    def run(self, x: torch.Tensor, values: dict, linears: dict | None = None, a_quant=None) -> torch.Tensor:
        """``end`` with ``start`` = x [windows, ...]; ``linears`` {reader: (W [out, in], b)} replace the
        readers' weights (and biases) and ``a_quant`` fake-quantizes their input."""
        mm = self.program.model_map
        x = a_quant(x) if a_quant else x
        feed = {}
        for name, (w, b) in (linears or {}).items():
            lin = mm.linears[name]
            feed[lin.weight] = w.float().movedim((-2, -1), (lin.out_axis, lin.in_axis)).contiguous().numpy()
            if b is not None:
                if not lin.bias:
                    raise QCompileError(f"{self.program.graph.path}: reader {name} has no bias to replace")
                feed[lin.bias] = b.float().numpy()
        end = self.program.graph.value(self.end)
        # x holds the windows' values concatenated on axis 0, [n, S, K] or [n·S, K] (a graph that flattens tokens)
        outs = [self.segment.run([end], ids, xi.float().contiguous().numpy(), feed)[0]
                for ids, xi in zip(self.ids, x.chunk(len(self.ids)))]
        return torch.from_numpy(np.concatenate(outs))
