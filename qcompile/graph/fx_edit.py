"""The fx implementation of ``graph.edit.GraphEdit`` over a captured ``fx.GraphModule``.

Weights are the module's parameters (and constants) under their source names; online ops are
``torch.ops.qcompile.hadamard`` / ``fake_quant`` calls; a lowered linear is a ``torch.ops.qcompile.linear_w4a*``
call on packed weights stored as ``<weight>_packed/_scales/_zeros``.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from qcompile.errors import QCompileError
from qcompile.graph import fx as fx_ir
from qcompile.graph.edit import FakeQuant, Hadamard, Online, Transform
from qcompile.graph.opgraph import OpGraph

aten = torch.ops.aten


def _qops():
    import qcompile.kernels.ops  # noqa: F401  (registers torch.ops.qcompile.*)

    return torch.ops.qcompile


def _call(op: Online):
    """(torch op, its arguments after x) for an online op."""
    q = _qops()
    if isinstance(op, Hadamard):
        return q.hadamard.default, (op.block,)
    if isinstance(op, FakeQuant):
        return q.fake_quant.default, (op.bits, op.symmetric, float(op.clip))
    raise TypeError(f"not an online op: {op!r}")


class FxGraph:
    """``GraphEdit`` on an fx GraphModule (see the module docstring)."""

    ir = "fx"

    def __init__(self, module: fx.GraphModule):
        self.module = module

    def opgraph(self) -> OpGraph:
        self.module.graph.lint()
        return fx_ir.to_opgraph(self.module)

    def clone(self) -> "FxGraph":
        return FxGraph(copy.deepcopy(self.module))

    def finish(self) -> None:
        self.module.recompile()

    def node(self, name: str) -> fx.Node:
        return fx_ir.node_by_name(self.module, name)

    # --- weights -------------------------------------------------------------------------------------------
    def weight(self, name: str) -> torch.Tensor:
        obj = self.module
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def has_weight(self, name: str) -> bool:
        return fx_ir._attr(self.module, name) is not None

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        old = self.weight(name)
        if old.shape != value.shape:
            raise QCompileError(f"new value for {name} has shape {tuple(value.shape)}, expected {tuple(old.shape)}")
        with torch.no_grad():
            old.copy_(value.to(old.dtype))

    def users_of_weight(self, name: str) -> list[fx.Node]:
        return [u for n in self.module.graph.nodes if n.op == "get_attr" and n.target == name for u in n.users]

    def readers_of_weight(self, name: str) -> int:
        return len(self.users_of_weight(name))

    def add_weight(self, name: str, value: torch.Tensor, replace: bool = False) -> fx.Node:
        """Register a new parameter (or, with ``replace``, a fresh copy under an existing name that no graph
        node reads yet, e.g. a tied alias) and return a get_attr node for it."""
        *path, leaf = name.split(".")
        mod = self.module
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if hasattr(mod, leaf) and not (replace and not self.users_of_weight(name)):
            raise QCompileError(f"a weight named {name} already exists")
        if hasattr(mod, leaf):
            delattr(mod, leaf)
        value = value.detach().to(self.device, copy=True)  # new weights live with the others
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        first = next(n for n in self.module.graph.nodes if n.op != "placeholder")
        with self.module.graph.inserting_before(first):
            return self.module.graph.get_attr(name)

    def drop_weight(self, name: str) -> None:
        *path, leaf = name.split(".")
        mod = self.module.get_submodule(".".join(path)) if path else self.module
        if hasattr(mod, leaf):
            delattr(mod, leaf)

    # --- structure -----------------------------------------------------------------------------------------
    def use_weight(self, consumer: str, pos: int, name: str) -> None:
        node = self.node(consumer)
        with self.module.graph.inserting_before(node):
            node.update_arg(pos, self.module.graph.get_attr(name))

    def _transform(self, src: fx.Node, op: Transform, anchor: fx.Node) -> fx.Node:
        """x·T as aten ops before ``anchor``, each marked ``online`` (the OpGraph's kind ``transform``):
        ``unflatten(-1, (K, b)) → matmul R₁ → flatten → index_select(perm) → unflatten → matmul R₂ →
        flatten`` on the full blocks; with a partial last block, x is sliced into the two parts first, the tail
        is ``matmul tail`` and the parts are concatenated."""
        g = self.module.graph
        w = [self.add_weight(name, t) for name, t in op.tensors().items()]

        def mark(n):
            n.meta["qcompile"] = "online"
            n.meta["val"] = src.meta.get("val")
            return n

        def call(target, *args):
            return mark(g.call_function(target, args))

        with g.inserting_before(anchor):
            f, k = op.full, op.full // op.block
            x = src if op.tail is None else call(aten.slice.Tensor, src, -1, 0, f)
            x = call(aten.unflatten.int, x, -1, [k, op.block])
            x = call(aten.flatten.using_ints, call(aten.matmul.default, x, w[0]), -2, -1)
            x = call(aten.unflatten.int, call(aten.index_select.default, x, -1, w[1]), -1, [k, op.block])
            x = call(aten.flatten.using_ints, call(aten.matmul.default, x, w[2]), -2, -1)
            if op.tail is None:
                return x
            tail = call(aten.matmul.default, call(aten.slice.Tensor, src, -1, f, op.full + op.tail.shape[0]), w[3])
            return call(aten.cat.default, [x, tail], -1)

    def insert_on_operand(self, consumer: str, pos: int, op: Online) -> str:
        node = self.node(consumer)
        src = node.args[pos]
        if isinstance(op, Transform):
            new = self._transform(src, op, node)
            node.update_arg(pos, new)
            return new.name
        target, args = _call(op)
        with self.module.graph.inserting_before(node):
            new = self.module.graph.call_function(target, (src, *args))
        new.meta["val"] = src.meta.get("val")
        node.update_arg(pos, new)
        return new.name

    def insert_after(self, node: str, op: Online) -> str:
        n = self.node(node)
        if isinstance(op, Transform):
            users = list(n.users)
            new = self._transform(n, op, n.next)
            for u in users:
                u.replace_input_with(n, new)
            return new.name
        target, args = _call(op)
        with self.module.graph.inserting_after(n):
            new = self.module.graph.call_function(target, (n, *args))
        new.meta["val"] = n.meta.get("val")
        n.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return new.name

    def bypass(self, node: str) -> None:
        n = self.node(node)
        n.replace_all_uses_with(n.args[0])

    def to_rms(self, norm: str) -> None:
        node = self.node(norm)
        if node.target != aten.layer_norm.default:
            raise QCompileError(f"norm {norm} is {node.target}, not a LayerNorm op")
        node.target = aten.rms_norm.default
        node.args = (node.args[0], node.args[1], None, node.args[4] if len(node.args) > 4 else 1e-5)

    def add_bias(self, linear: str, name: str, value: torch.Tensor) -> None:
        bias_node = self.add_weight(name, value)
        node = self.node(linear)
        if node.target != aten.linear.default or len(node.args) > 2 and node.args[2] is not None:
            raise QCompileError(f"cannot add a bias to {node.name} ({node.target})")
        node.args = (node.args[0], node.args[1], bias_node)

    def add_after(self, node: str, name: str, value: torch.Tensor) -> None:
        n = self.node(node)
        beta = self.add_weight(name, value)
        beta.meta["val"] = self.weight(name).detach()
        with self.module.graph.inserting_after(n):
            add = self.module.graph.call_function(aten.add.Tensor, (n, beta))
        add.meta["val"] = n.meta.get("val")
        n.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)

    def give_norm_weight(self, norm: str, name: str) -> None:
        node = self.node(norm)
        if node.target not in (aten.rms_norm.default, aten.layer_norm.default) or \
                (len(node.args) > 2 and node.args[2] is not None):
            raise QCompileError(f"norm {norm} ({node.target}) cannot be given a scale parameter")
        val = node.meta["val"]
        gamma = self.add_weight(name, torch.ones(int(val.shape[-1]), dtype=val.dtype))
        gamma.meta["val"] = self.weight(name).detach()
        node.update_arg(2, gamma)

    def add_packed(self, weight: str, packed, rows: tuple[int, ...] = ()) -> tuple:
        """get_attr nodes of a ``formats.PackedWeight``'s packed codes, scales and zeros (None when symmetric),
        stored as ``<weight>_packed/_scales/_zeros``; ``rows`` reshapes their leading dim (stacked experts)."""
        def add(suffix, t):
            return None if t is None else self.add_weight(f"{weight}_{suffix}", t.reshape(*rows, -1) if rows else t)

        return add("packed", packed.packed), add("scales", packed.scales), add("zeros", packed.zeros)

    def lower_linear(self, linear: str, weight: str, packed) -> str:
        """The linear as a ``qcompile.linear_w4a*`` op on ``packed`` (a ``formats.PackedWeight``)."""
        qops = _qops()
        graph = self.module.graph
        node = self.node(linear)
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else None
        w_packed, w_scales, w_zeros = self.add_packed(weight, packed)
        out_dtype = node.meta["val"].dtype
        fq = quantized_input(x)
        with graph.inserting_before(node):
            if fq:
                codes, scales, zeros = per_token_codes(graph, fq)
                _, bits, symmetric, _, rotate, _ = fq
                op = qops.linear_w4a8.default if bits > 4 else qops.linear_w4a4.default
                new = graph.call_function(op, (codes, scales, None if symmetric else zeros, w_packed, w_scales,
                                               w_zeros, packed.group_size, bias, out_dtype))
                label = f"W4A{bits}" + (" (fused R4)" if rotate else "")
            else:
                new = graph.call_function(qops.linear_w4a16.default,
                                          (x, w_packed, w_scales, w_zeros, packed.group_size, bias))
                label = "W4A16"
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return label

    def eliminate_dead_code(self) -> None:
        self.module.graph.eliminate_dead_code()
        self.module.graph.lint()

    # --- running -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return fx_ir.module_device(self.module)

    def to(self, device: torch.device) -> None:
        """Every weight, buffer and tensor constant of the graph on ``device`` (in place)."""
        self.module.to(device)
        for n in self.module.graph.nodes:  # constants registered as plain attributes (not parameters/buffers)
            if n.op != "get_attr":
                continue
            *path, leaf = n.target.split(".")
            owner = self.module
            for part in path:
                owner = getattr(owner, part)
            value = getattr(owner, leaf, None)
            if isinstance(value, torch.Tensor) and value.device != device and leaf not in owner._parameters \
                    and leaf not in owner._buffers:
                setattr(owner, leaf, value.to(device))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.module(input_ids=input_ids.to(self.device))
        return out.logits if hasattr(out, "logits") else out[0]

    def torch_forward(self):
        """``forward(input_ids, params) → logits``, differentiable in ``params`` (weights by source name, used
        in place of the module's: ``functional_call``); the module's own weights are frozen (no gradient)."""
        from torch.func import functional_call

        for param in self.module.parameters():
            param.requires_grad_(False)

        def forward(input_ids: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            out = functional_call(self.module, params, args=(), kwargs={"input_ids": input_ids})
            return out.logits if hasattr(out, "logits") else out[0]

        return forward


def _is(node, op) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target == op


def per_token_codes(graph: fx.Graph, fq) -> tuple:
    """``quantize_per_token`` of a ``quantized_input`` match (at the graph's insertion point): its (codes, scales,
    zeros) nodes, the operands of the ``linear_w4a8/w4a4`` ops."""
    src, bits, symmetric, clip, rotate, block = fq
    q = graph.call_function(_qops().quantize_per_token.default, (src, bits, symmetric, clip, rotate, block))
    return tuple(graph.call_function(operator.getitem, (q, i)) for i in range(3))


def quantized_input(x):
    """(src, bits, symmetric, clip, rotate, block) when x = fake_quant(src) or fake_quant(hadamard(src)), else None."""
    qops = _qops()
    if not _is(x, qops.fake_quant.default):
        return None
    src, bits, symmetric, clip = x.args
    rotate, block = False, 0
    if _is(src, qops.hadamard.default):
        rotate, block, src = True, src.args[1], src.args[0]
    return src, bits, symmetric, clip, rotate, block
