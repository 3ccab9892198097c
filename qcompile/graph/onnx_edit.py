"""The ONNX implementation of ``graph.edit.GraphEdit`` over an ``onnx_ir.Model``.

Weights are the float initializers, held as torch tensors that share memory with the initializers'
numpy arrays: a pass's ``set_weight`` writes the model in place, under the initializer's own name
(generated ones like ``val_102`` included). The other initializers (shapes, axes, scalars) are constants.

Graph edits work on ONNX values by the OpGraph's names (the value a node produces): the OpGraph view
(``graph/onnx.onnx_view``) also says which ONNX nodes each OpGraph node stands for (a linear with its
bias Add, a decomposed attention), so an edit on "operand ``pos`` of ``consumer``" rewires exactly the
uses inside that pattern. An edit keeps the name of the value it replaces (a value that readers or the
graph outputs know by name, ``logits`` included), renaming the replaced one.

Online ops are calls of model-local functions of the ``qcompile`` domain, one per op and width
(``hadamard_n64_b0``, ``fake_quant_n576_b8_s_c1000000``): one node in the graph, so that the OpGraph reader
sees one ``hadamard``/``quant`` node as it does in fx, and onnxruntime runs their bodies, which are
``kernels/ort``'s translations of ``torch.ops.qcompile.*``. A lowered linear is those translations inlined
(``MatMulNBits``; per-token int8 codes and ``MatMulInteger``), as the ONNX export writes them.

The graph runs in onnxruntime on the CPU (``logits``); the session is rebuilt after an edit. A decoder step
with a KV cache (onnxruntime-genai's) runs from an empty cache (``cache``: ``graph/onnx_genai.Signature``), and
its A8 linears lower to ``MatMulNBits`` at accuracy_level 4, as the export's default int8 path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from qcompile.errors import CaptureError, QCompileError
from qcompile.graph.edit import FakeQuant, Hadamard, Online, Transform
from qcompile.graph.onnx import QCOMPILE_DOMAIN, _load, onnx_view, prepare
from qcompile.graph.onnx_genai import Signature, signature, unfuse_skip_norms
from qcompile.graph.opgraph import OpGraph

_FLOATS = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.DOUBLE: torch.float64}
_ONLINE = re.compile(r"^(hadamard|fake_quant)_n(\d+)_b(\d+)(?:_([sa])_c(\d+))?(?:_(\w+))?$")


def _is_weight(v: ir.Value) -> bool:
    """A float initializer that is not a scalar: what the OpGraph calls a param."""
    s = v.shape
    return v.dtype is not None and v.dtype.is_floating_point() and s is not None and len(s) > 0 and \
        not all(d == 1 for d in s)


def online_op(op_type: str) -> Online | None:
    """The online op a ``qcompile``-domain function name stands for (see the module docstring)."""
    m = _ONLINE.match(op_type)
    if m is None:
        return None
    if m.group(1) == "hadamard":
        return Hadamard(int(m.group(3)))
    return FakeQuant(int(m.group(3)), m.group(4) == "s", int(m.group(5)) / 1e6)


def _function_name(op: Online, n: int, dtype: ir.DataType) -> str:
    suffix = "" if dtype == ir.DataType.FLOAT else f"_{dtype.name.lower()}"
    if isinstance(op, Hadamard):
        return f"hadamard_n{n}_b{op.block}{suffix}"
    if isinstance(op, Transform):
        return f"duquant_n{n}_b{op.block}{suffix}"
    return f"fake_quant_n{n}_b{op.bits}_{'s' if op.symmetric else 'a'}_c{round(op.clip * 1e6)}{suffix}"


def record(opset: int, fn, *args):
    """(the ONNX nodes ``fn`` — a ``kernels/ort`` translation — emits for ``args``, its result): the
    onnxscript ops it calls are recorded as ``onnx_ir`` nodes, as the exporter records them."""
    import onnxscript
    from onnxscript import evaluator
    from torch.onnx._internal.exporter._building import OpRecorder

    rec = OpRecorder(onnxscript.values.Opset("", opset), {})
    with evaluator.default_as(rec):
        out = fn(*args)
    return rec.nodes, out


def _transform_body(x: ir.Value, w: list[ir.Value], c: int, op: Transform) -> tuple[list[ir.Node], ir.Value]:
    """The nodes of x·T (``graph.edit.Transform``), the same steps as fx's aten ops: x's full blocks as
    [N, K, b] · R₁ → [N, F] → ``Gather(perm, axis 1)`` → [N, K, b] · R₂ → their shape; a partial last block
    sliced off, ``MatMul(tail)`` and concatenated after."""

    def const(values):
        return ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(np.array(values, np.int64)))])

    def add(node):
        nodes.append(node)
        return node.outputs[0]

    f = op.full
    nodes: list[ir.Node] = []
    blocks, rows = add(const([-1, f // op.block, op.block])), add(const([-1, f]))
    head = x
    if op.tail is not None:
        lo, mid, hi, axis = add(const([0])), add(const([f])), add(const([c])), add(const([-1]))
        head = add(ir.Node("", "Slice", [x, lo, mid, axis]))
        tail = add(ir.Node("", "MatMul", [add(ir.Node("", "Slice", [x, mid, hi, axis])), w[3]]))
    shape = add(ir.Node("", "Shape", [head]))
    y = add(ir.Node("", "Reshape", [add(ir.Node("", "MatMul", [add(ir.Node("", "Reshape", [head, blocks])), w[0]])),
                                    rows]))
    y = add(ir.Node("", "Gather", [y, w[1]], attributes=[ir.AttrInt64("axis", 1)]))
    y = add(ir.Node("", "MatMul", [add(ir.Node("", "Reshape", [y, blocks])), w[2]]))
    y = add(ir.Node("", "Reshape", [y, shape]))
    if op.tail is not None:
        y = add(ir.Node("", "Concat", [y, tail], attributes=[ir.AttrInt64("axis", -1)]))
    for i, n in enumerate(nodes):
        n.outputs[0].name = f"t{i}"
    return nodes, y


class OnnxGraph:
    """``GraphEdit`` on an ONNX decoder (see the module docstring)."""

    ir = "onnx"

    def __init__(self, model: ir.Model, weights: dict[str, torch.Tensor], path: str = "model",
                 cache: Signature | None = None):
        self.model, self.weights, self.path = model, weights, path
        self.cache = cache  # a decoder step with a KV cache (onnxruntime-genai's): how to feed it an empty one
        self._view: tuple[OpGraph, dict] | None = None
        self._values: dict[str, ir.Value] | None = None
        self._session = None
        self._fresh = 0

    # --- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "OnnxGraph":
        """Read ``path`` (and its external data) into memory, refusing a file that is not a decoder
        ``input_ids [batch, seq] → logits [batch, seq, vocab]`` or whose data cannot be read, by name."""
        model = _load(path)
        where = str(path)
        ins = [v for v in model.graph.inputs if not v.is_initializer()]
        cache = signature(model, where, Path(path) if isinstance(path, (str, os.PathLike)) else None)
        if cache is None and (len(ins) != 1 or ins[0].dtype not in (ir.DataType.INT64, ir.DataType.INT32) or
                              (ins[0].shape is not None and len(ins[0].shape) != 2)):
            shown = [(v.name, str(v.dtype), str(v.shape)) for v in ins[:3]]
            more = f" and {len(ins) - 3} more" if len(ins) > 3 else ""
            raise CaptureError(f"{where} is not a decoder qcompile can read: its inputs are {shown}{more}; expected "
                               "one integer input_ids [batch, seq] (a graph without a KV cache, e.g. "
                               "torch.onnx.export(dynamo=True) of model(input_ids)), or onnxruntime-genai's "
                               "decoder step (input_ids, attention_mask, past K/V)")
        out = model.graph.outputs[0]
        if out.dtype not in _FLOATS or (out.shape is not None and len(out.shape) != 3):
            raise CaptureError(f"{where} is not a decoder qcompile can read: its first output {out.name} is "
                               f"{out.dtype} {out.shape}, expected float logits [batch, seq, vocab]")
        weights = {}
        base = Path(path).parent if not isinstance(path, ir.Model) else Path(".")
        for name, v in model.graph.initializers.items():
            try:
                array = np.array(v.const_value.numpy())  # reads external data now, not half-way through a pass
            except Exception as e:
                location = getattr(v.const_value, "location", None)
                hint = f" (external data {base / location})" if location else ""
                raise CaptureError(f"{where}: cannot read initializer {name}{hint}: {type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
            if _is_weight(v):
                if v.dtype not in _FLOATS:
                    raise CaptureError(f"{where}: weight {name} is {v.dtype}; qcompile edits float32/float16 weights")
                weights[name] = torch.from_numpy(array)
                v.const_value = ir.Tensor(weights[name].numpy(), name=name)
            else:
                v.const_value = ir.Tensor(array, name=name) if array.dtype != object else v.const_value
        if cache is not None:
            unfuse_skip_norms(model, where)
        prepare(model, where)
        return cls(model, weights, where, cache)

    # --- views ---------------------------------------------------------------------------------------------
    def opgraph(self) -> OpGraph:
        prepare(self.model, self.path)
        self._view = onnx_view(self.model)
        self._values = None
        return self._view[0]

    def members(self, node: str) -> list[ir.Node]:
        """The ONNX nodes OpGraph node ``node`` stands for (root first), per the last view."""
        if self._view is None:
            self.opgraph()
        members = self._view[1].get(node)
        if not members:
            raise QCompileError(f"{self.path}: no ONNX node stands for {node}")
        return members

    def _operand(self, consumer: str, pos: int) -> ir.Value:
        if self._view is None:
            self.opgraph()
        src = self._view[0].operand(consumer, pos)
        if src is None:
            raise QCompileError(f"{self.path}: {consumer} has no operand {pos}")
        return self.value(src)

    def _index(self) -> dict[str, ir.Value]:
        if self._values is None:
            g = self.model.graph
            self._values = {v.name: v for v in (*g.inputs, *g.initializers.values())}
            self._values.update({o.name: o for n in g for o in n.outputs})
        return self._values

    def value(self, name: str) -> ir.Value:
        v = self._index().get(name)
        if v is None:
            raise QCompileError(f"{self.path}: no ONNX value named {name}")
        return v

    def _name(self, stem: str) -> str:
        """A value name not used yet, from ``stem``."""
        values, name = self._index(), stem
        while name in values or name in self.model.graph.initializers:
            self._fresh += 1
            name = f"{stem}_{self._fresh}"
        return name

    def _changed(self, structure: bool = True) -> None:
        self._session = None
        if structure:
            self._values = None

    def clone(self) -> "OnnxGraph":
        model = self.model.clone()
        weights = {k: v.clone() for k, v in self.weights.items()}
        for name, t in weights.items():
            model.graph.initializers[name].const_value = ir.Tensor(t.numpy(), name=name)
        return OnnxGraph(model, weights, self.path, self.cache)

    @property
    def opset(self) -> int:
        return self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 18))

    # --- weights -------------------------------------------------------------------------------------------
    def weight(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            raise QCompileError(f"{self.path}: no weight (float initializer) named {name}")
        return self.weights[name]

    def has_weight(self, name: str) -> bool:
        return name in self.weights

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        old = self.weight(name)
        if old.shape != value.shape:
            raise QCompileError(f"new value for {name} has shape {tuple(value.shape)}, expected {tuple(old.shape)}")
        with torch.no_grad():
            old.copy_(value.detach().to(old.dtype))
        self._session = None

    def readers_of_weight(self, name: str) -> int:
        v = self.model.graph.initializers.get(name)
        return 0 if v is None else len(v.uses())

    def add_weight(self, name: str, value: torch.Tensor, replace: bool = False) -> ir.Value:
        """A new initializer ``name`` (``replace``: a fresh one under a name no node reads)."""
        inits = self.model.graph.initializers
        if name in inits:
            if not replace or inits[name].uses():
                raise QCompileError(f"a weight named {name} already exists")
            del inits[name]
            self.weights.pop(name, None)
        elif self._name(name) != name:
            raise QCompileError(f"{self.path}: {name} already names a value of the graph")
        t = value.detach().to("cpu", copy=True).contiguous()
        if t.dtype.is_floating_point:
            self.weights[name] = t
        v = ir.Value(name=name, shape=ir.Shape(t.shape), const_value=ir.Tensor(t.numpy(), name=name))
        v.type = ir.TensorType(v.const_value.dtype)
        self.model.graph.register_initializer(v)
        self._changed()
        return v

    def drop_weight(self, name: str) -> None:
        v = self.model.graph.initializers.get(name)
        if v is not None and not v.uses():
            del self.model.graph.initializers[name]
        self.weights.pop(name, None)

    # --- structure -----------------------------------------------------------------------------------------
    def _rewire(self, consumer: str, old: ir.Value, new: ir.Value) -> None:
        """Uses of ``old`` by the ONNX nodes of ``consumer`` read ``new`` instead."""
        uses = [(n, i) for n in self.members(consumer) for i, v in enumerate(n.inputs) if v is old]
        if not uses:
            raise QCompileError(f"{self.path}: the ONNX nodes of {consumer} do not read {old.name} directly")
        for n, i in uses:
            n.replace_input_with(i, new)

    def use_weight(self, consumer: str, pos: int, name: str) -> None:
        """Operand ``pos`` of ``consumer`` reads weight ``name``. Where it read a weight through a Transpose (the
        builder's tied table, ``Gather(Transpose(lm_head [K, N]))``), ``name`` is re-laid as the consumer reads it
        and read directly: the consumer's own table is [V, H], as an embedding's is everywhere else."""
        old = self._operand(consumer, pos)
        t = old.producer()
        if t is not None and t.op_type == "Transpose" and t.inputs[0].is_initializer() and name in self.weights:
            perm = list(t.attributes.get_ints("perm", list(reversed(range(len(old.shape or []))))))
            value = self.weights[name].permute(perm).contiguous()
            del self.model.graph.initializers[name]
            self.weights.pop(name)
            self._changed()
            self.add_weight(name, value)
        self._rewire(consumer, old, self.model.graph.initializers[name])
        self._changed()

    def _place(self, nodes: list[ir.Node], after: ir.Value) -> None:
        """Insert ``nodes`` where ``after`` is available: right after its producer, or first."""
        g = self.model.graph
        p = after.producer()
        if p is not None:
            g.insert_after(p, nodes)
        else:
            g.insert_before(next(iter(g)), nodes)

    def _function(self, op: Online, x: ir.Value) -> str:
        """The name of the ``qcompile`` function computing ``op`` on values like ``x`` (made on first use)."""
        from qcompile.kernels.ort import fake_quant_onnx, hadamard_onnx

        n = x.shape[-1] if x.shape is not None else None
        if not isinstance(n, int):
            raise QCompileError(f"{self.path}: {op.name} on {x.name} needs its last dimension known, got {x.shape}")
        name = _function_name(op, n, x.dtype)
        if (QCOMPILE_DOMAIN, name, "") in self.model.functions:
            return name
        arg = ir.Value(name="x", shape=ir.Shape([None] * (len(x.shape) - 1) + [n]), type=ir.TensorType(x.dtype))
        params = []
        if isinstance(op, Transform):
            params = [ir.Value(name=f"w{i}") for i in range(len(op.tensors()))]
            nodes, y = _transform_body(arg, params, n, op)
        elif isinstance(op, Hadamard):
            nodes, y = record(self.opset, hadamard_onnx, arg, op.block)
        else:
            nodes, y = record(self.opset, fake_quant_onnx, arg, op.bits, op.symmetric, op.clip)
        y.name = "y"
        body = ir.Graph([arg, *params], [y], nodes=nodes, opset_imports={"": self.opset}, name=name)
        fn = ir.Function(QCOMPILE_DOMAIN, name, "", graph=body, attributes=[])
        self.model.functions[fn.identifier()] = fn
        self.model.opset_imports.setdefault(QCOMPILE_DOMAIN, 1)
        return name

    def _online(self, x: ir.Value, op: Online, stem: str) -> ir.Value:
        extra = [self.add_weight(w, t) for w, t in op.tensors().items()] if isinstance(op, Transform) else []
        node = ir.Node(QCOMPILE_DOMAIN, self._function(op, x), [x, *extra], num_outputs=1, name=self._name(stem))
        out = node.outputs[0]
        out.name, out.shape, out.type = node.name, x.shape, x.type
        self._place([node], x)
        self._changed()
        return out

    def insert_on_operand(self, consumer: str, pos: int, op: Online) -> str:
        x = self._operand(consumer, pos)
        unsqueeze = x.producer()
        if pos == 0 and self._view[0].attr(consumer, "experts") and unsqueeze is not None and \
                unsqueeze.op_type == "Unsqueeze" and len(x.uses()) == 1:
            # an expert linear reads x as Unsqueeze(x) [T, K, 1] (or [T, 1, K]): the op goes on x [T, K]
            x = unsqueeze.inputs[0]
            new = self._online(x, op, f"{consumer}::{op.name}{pos}")
            unsqueeze.replace_input_with(0, new)
            return new.name
        new = self._online(x, op, f"{consumer}::{op.name}{pos}")
        self._rewire(consumer, x, new)
        return new.name

    def _take_over(self, old: ir.Value, new: ir.Value, suffix: str, keep: ir.Node | None = None,
                   rename: bool = True) -> None:
        """Readers of ``old`` (but ``keep``) and the graph outputs read ``new``, which takes ``old``'s name
        (with ``rename``, or where ``old`` is a graph output: outputs keep their names)."""
        name = old.name
        for user, i in list(old.uses()):
            if user is not keep:
                user.replace_input_with(i, new)
        outs = self.model.graph.outputs
        for i, v in enumerate(outs):
            if v is old:
                outs[i] = new
                rename = True
        if rename:
            old.name = self._name(name + suffix)
            new.name = name
        self._changed()

    def insert_after(self, node: str, op: Online) -> str:
        x = self.value(node)
        new = self._online(x, op, f"{node}::{op.name}")
        self._take_over(x, new, "::pre", keep=new.producer(), rename=False)
        return new.name

    def bypass(self, node: str) -> None:
        x, src = self.value(node), self._operand(node, 0)
        for user, i in list(x.uses()):
            user.replace_input_with(i, src)
        if x.is_graph_output():
            raise QCompileError(f"{self.path}: cannot bypass {node}: it is a graph output")
        self._changed()

    def to_rms(self, norm: str) -> None:
        old = self.members(norm)[0]
        if old.op_type != "LayerNormalization":
            raise QCompileError(f"{self.path}: norm {norm} is {old.op_type}, not LayerNormalization")
        eps = old.attributes.get_float("epsilon", 1e-5)
        axis = old.attributes.get_int("axis", -1)
        op_type = "RMSNormalization" if self.opset >= 23 else "SimplifiedLayerNormalization"
        new = ir.Node("", op_type, old.inputs[:2], attributes=[ir.AttrFloat32("epsilon", eps), ir.AttrInt64("axis", axis)],
                      num_outputs=1, name=self._name(f"{norm}::rms"))
        new.outputs[0].shape, new.outputs[0].type = old.outputs[0].shape, old.outputs[0].type
        self.model.graph.insert_after(old, new)
        self._take_over(old.outputs[0], new.outputs[0], "::layernorm")

    def add_bias(self, linear: str, name: str, value: torch.Tensor) -> None:
        root = self.members(linear)[0]
        y = root.outputs[0]
        b = self.add_weight(name, value.to(_FLOATS.get(y.dtype, torch.float32)))
        add = ir.Node("", "Add", [y, b], num_outputs=1, name=self._name(f"{linear}::bias"))
        add.outputs[0].shape, add.outputs[0].type = y.shape, y.type
        self.model.graph.insert_after(root, add)
        self._take_over(y, add.outputs[0], "::nobias", keep=add)

    def add_after(self, node: str, name: str, value: torch.Tensor) -> None:
        x = self.value(node)
        b = self.add_weight(name, value.to(_FLOATS.get(x.dtype, torch.float32)))
        add = ir.Node("", "Add", [x, b], num_outputs=1, name=self._name(f"{node}::shift"))
        add.outputs[0].shape, add.outputs[0].type = x.shape, x.type
        self._place([add], x)
        self._take_over(x, add.outputs[0], "::unshifted", keep=add, rename=False)

    def give_norm_weight(self, norm: str, name: str) -> None:
        """ONNX's norm ops (LayerNormalization, RMSNormalization, SimplifiedLayerNormalization) take their
        scale as a required input, so a norm without one is a decomposed one: refused, naming it."""
        raise QCompileError(f"{self.path}: norm {norm} ({self.members(norm)[0].op_type}) has no scale input to "
                            "divide by a smoothing scale; not supported")

    def lower_linear(self, linear: str, weight: str, packed) -> str:
        """The linear as ``kernels/ort``'s translation of the INT4 op its input calls for."""
        from qcompile.kernels.ort import _linear_w4a16, linear_w4ax_onnx, quantize_per_token_onnx

        members = self.members(linear)
        root, og = members[0], self._view[0]
        x = self._operand(linear, 0)
        bias = self._operand(linear, 2) if og.operand(linear, 2) is not None else None
        if og.attr(linear, "experts"):
            raise QCompileError(f"{self.path}: {linear} is a stacked expert linear; no INT4 op for it")
        wp = self.add_weight(f"{weight}_packed", packed.packed)
        ws = self.add_weight(f"{weight}_scales", packed.scales)
        wz = self.add_weight(f"{weight}_zeros", packed.zeros) if packed.zeros is not None else None
        fq = x.producer()
        quant = online_op(fq.op_type) if fq is not None and fq.domain == QCOMPILE_DOMAIN else None
        if isinstance(quant, FakeQuant):
            src, rotate, block = fq.inputs[0], False, 0
            h = src.producer()
            had = online_op(h.op_type) if h is not None and h.domain == QCOMPILE_DOMAIN else None
            if isinstance(had, Hadamard):
                src, rotate, block = h.inputs[0], True, had.block

            def emit():
                codes, scales, zeros = quantize_per_token_onnx(src, quant.bits, quant.symmetric, quant.clip, rotate,
                                                               block)
                codes.shape, codes.type = src.shape, ir.TensorType(ir.DataType.INT8)
                return linear_w4ax_onnx(codes, scales, None if quant.symmetric else zeros, wp, ws, wz,
                                        packed.group_size, bias)

            label = f"W4A{quant.bits}" + (" (fused R4)" if rotate else "")
            if self.cache is not None and quant.bits == 8:
                # a decoder step for onnxruntime-genai: the export's int8 path "matmulnbits"
                # (``kernels/ort.w4ax_as_matmulnbits``): the weights stay 4-bit in MatMulNBits and onnxruntime
                # quantizes the (rotated) input to int8 itself at accuracy_level 4, symmetric per block of K
                rotated = fq.inputs[0]

                def emit():  # noqa: F811 - the int8 path chosen for a KV-cache step
                    return _linear_w4a16(4)(rotated, wp, ws, wz, packed.group_size, bias)

                label += " as MatMulNBits accuracy_level 4"
                self.model.opset_imports.setdefault("com.microsoft", 1)
        else:
            def emit():
                return _linear_w4a16(0)(x, wp, ws, wz, packed.group_size, bias)

            label = "W4A16"
            self.model.opset_imports.setdefault("com.microsoft", 1)
        nodes, y = record(self.opset, emit)
        for n in nodes:
            n.version = None
        self.model.graph.insert_before(root, nodes)
        out = root.outputs[0]
        y.shape, y.type = out.shape, out.type
        self._take_over(out, y, "::float")
        return label

    def eliminate_dead_code(self) -> None:
        from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(self.model)
        RemoveUnusedFunctionsPass()(self.model)
        for name in [n for n in self.weights if n not in self.model.graph.initializers]:
            del self.weights[name]
        self._changed()

    def finish(self) -> None:
        """Re-lay the packed weights of new MatMulNBits nodes (``kernels/ort.pack_matmulnbits``)."""
        from qcompile.kernels.ort import pack_matmulnbits

        if pack_matmulnbits(self.model):  # their initializers are re-laid: no longer weights to edit
            for node in self.model.graph:
                if node.op_type == "MatMulNBits":
                    for v in node.inputs[1:]:
                        if v is not None:
                            self.weights.pop(v.name, None)
            self._changed()

    # --- running -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device) -> None:
        if torch.device(device).type != "cpu":
            raise QCompileError(f"an ONNX Program runs in onnxruntime on the CPU; cannot move it to {device}")

    def session(self):
        """An onnxruntime session of the graph as it is now (rebuilt after an edit)."""
        if self._session is None:
            self._session = ort_session(self.model, self.path)
        return self._session

    def feeds(self, ids: np.ndarray, names) -> dict[str, np.ndarray]:
        """Graph inputs ``names`` of a run over token ids ``ids``: the ids, and for a KV-cache step an empty cache
        (``onnx_genai.Signature.feeds``)."""
        return self.cache.feeds(ids, names) if self.cache is not None else {n: ids for n in names}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = self.session()
        feed = self.feeds(_ids(input_ids, s), [i.name for i in s.get_inputs()])
        out = s.run([s.get_outputs()[0].name], feed)[0]
        return torch.from_numpy(out)


    def torch_forward(self):
        """``forward(input_ids, params) → logits``, differentiable in ``params``: the graph evaluated by torch ops
        (``graph.onnx_torch``; onnxruntime has no gradients), weights by source name, ``params`` first."""
        from qcompile.graph.onnx_torch import TorchForward

        return TorchForward(self)


def _ids(input_ids, session) -> np.ndarray:
    dtype = np.int32 if "int32" in session.get_inputs()[0].type else np.int64
    return np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=dtype)


def ort_session(model: ir.Model, where: str, threads: int | None = None):
    """An onnxruntime CPU session of ``model`` (serialized in memory: models under 2 GB)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    proto = ir.to_proto(model)
    proto.graph.ClearField("value_info")  # inferred types of intermediates (a sequence's may be misread); ORT infers
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QCompileError(f"onnxruntime cannot run the graph of {where}: {first}") from None
