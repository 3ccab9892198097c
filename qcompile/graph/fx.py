"""The torch.fx side: capture a model with ``torch.export``, view it as an OpGraph, edit it.

The captured graph is the *unlifted* module of the ExportedProgram (``ep.module()``): weights stay
``get_attr`` nodes whose targets are the model's own parameter names, so the source name of a weight
is its identity from capture to the saved file. The sequence length is a dynamic dimension, so one
capture serves calibration, evaluation and generation lengths alike.

A captured graph belongs to no device. Two things would otherwise tie it to the one it was traced on:

- **fused-attention guards.** ``scaled_dot_product_attention`` stays one op in the graph, but the exporter
  computes its output shape by running the kernel choice of the tracing device; on CUDA the memory-efficient
  kernel pads a mask whose last dimension is not a multiple of its alignment, and that branch becomes the
  guard ``seq % 8 == 0``, which the dynamic ``seq`` dimension then violates. The shape of attention does not
  depend on the kernel, so tracing runs under the math reference (``portable_tracing``); at run time the
  op still picks the fastest kernel of the device it runs on.
- **device constants.** Factory ops and casts record the tracing device (``arange(..., device=cpu)``,
  ``to(inv_freq, cpu)``, ``_assert_tensor_metadata(device=cpu)``); ``follow_input_device`` rewrites every
  such constant to ``input_ids.device``, so the graph runs wherever its input and weights are.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import fx

from qcompile.errors import CaptureError
from qcompile.graph.opgraph import OpGraph

aten = torch.ops.aten

_KIND = {
    aten.linear.default: "linear",
    aten.embedding.default: "embedding",
    aten.scaled_dot_product_attention.default: "attention",
    aten.add.Tensor: "add",
    aten.add_.Tensor: "add",  # Falcon's ``mlp_output += attention_output``; its output is what later ops read
    aten.sub.Tensor: "sub",
    aten.mul.Tensor: "mul",
    aten.div.Tensor: "div",
    aten.neg.default: "neg",
    aten.pow.Tensor_Scalar: "pow",
    aten.mean.dim: "mean",
    aten.rsqrt.default: "rsqrt",
    aten.sqrt.default: "sqrt",
    aten.reciprocal.default: "reciprocal",
    aten.softmax.int: "softmax",
    aten._softmax.default: "softmax",
    aten.layer_norm.default: "layernorm",
    aten.rms_norm.default: "rmsnorm",
    aten.slice.Tensor: "slice",
    aten.index.Tensor: "index",
    aten.cat.default: "cat",
    aten.chunk.default: "split",
    aten.split.Tensor: "split",
    aten.split_with_sizes.default: "split",
    aten.sum.dim_IntList: "sum",
    aten.matmul.default: "matmul",  # of two activations (a matmul against a weight is made a linear at capture)
    aten.bmm.default: "matmul",
}
_ACTIVATIONS = {
    aten.silu.default: "silu",
    aten.gelu.default: "gelu",
    aten.relu.default: "relu",
    aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid",
}
_VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.expand.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.alias.default,
    aten.t.default,
    aten.flatten.using_ints,
    aten.dropout.default,  # captured in eval mode: identity
    aten.type_as.default,
    aten.numpy_T.default,
    aten.lift_fresh_copy.default,
}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int}


def export_inputs(model: torch.nn.Module, example_ids: torch.Tensor | None = None, max_seq: int = 8192):
    """(example ids, their dynamic dims {0: batch, 1: seq}) for exporting a causal LM without a KV cache.

    Shared by the fx capture, the ONNX export and the saved artifact, so all three trace the same
    signature. The example batch is 2 so that torch.export does not specialize the batch to 1.
    """
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    if example_ids is None:
        vocab = getattr(config, "vocab_size", 256)
        example_ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("seq", min=2, max=max_seq - 1)}
    return example_ids, dims


def export_error(what: str, model, e: Exception) -> CaptureError:
    """A CaptureError that names the model and the first line of what the exporter reported."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CaptureError(
        f"{what} could not capture {type(model).__name__}: {type(e).__name__}: {first}. "
        "The model must run input_ids → logits without data-dependent Python control flow."
    )


@contextlib.contextmanager
def portable_tracing():
    """Trace attention through its math reference, so no fused kernel's alignment rule becomes a shape guard."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a module that has none)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def export(model: torch.nn.Module, example_ids: torch.Tensor, dims: dict) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``model(input_ids=…)`` with ``portable_tracing``; the example ids are
    moved to the model's device (meta models trace too: their graph is the same).

    Some torch releases (2.11) cannot prove guards that hold for every positive length, such as
    ``min(16·seq, 32·seq) == 16·seq`` from the view of an expanded GQA key (``repeat_kv``): export then
    refuses the dynamic ``seq``. Such a capture is retried with those guards deferred to run-time asserts
    in the graph (``prefer_deferred_runtime_asserts_over_guards``); they hold for every length in range.
    """
    example_ids = example_ids.to(module_device(model))
    kwargs = {"input_ids": example_ids}
    shapes = {"input_ids": dims}
    with torch.no_grad(), portable_tracing():
        try:
            return torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - only the unprovable-guard case is retried
            if "Constraints violated" not in str(e):
                raise
            return torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False,
                                       prefer_deferred_runtime_asserts_over_guards=True)


def follow_input_device(gm: fx.GraphModule) -> int:
    """Rewrite every ``torch.device`` constant in ``gm``'s ops to the first tensor input's device (one
    ``getattr(input, "device")`` node); returns how many constants were rewritten."""
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    source = next((n for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)), inputs[0] if inputs else None)
    if source is None:
        return 0
    device_node = None
    count = 0

    def sub(a):
        nonlocal device_node, count
        if not isinstance(a, torch.device):
            return a
        if device_node is None:
            with graph.inserting_after(inputs[-1]):
                device_node = graph.call_function(getattr, (source, "device"))
        count += 1
        return device_node

    for n in list(graph.nodes):
        if n.op == "call_function" and n is not device_node:
            n.args = fx.node.map_aggregate(n.args, sub)
            n.kwargs = fx.node.map_aggregate(n.kwargs, sub)
    if count:
        gm.recompile()
    return count


def is_causal_mask(mask, q_len: int, k_len: int) -> bool:
    """Whether ``mask`` (an SDPA ``attn_mask``) is exactly the causal mask: boolean, ``[..., L, L]`` with
    ``L = q_len = k_len``, true on and below the diagonal and false above it in every batch and head."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or q_len != k_len or mask.dim() < 2 \
            or tuple(mask.shape[-2:]) != (q_len, k_len):
        return False
    tril = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril_()
    return torch.equal(mask, tril.expand_as(mask))


class CausalAttention:
    """An ``fx.Interpreter`` mixin: an attention whose mask is the causal mask runs as ``is_causal=True``
    without it, so the fused kernel skips the masked half of the scores instead of computing and discarding
    it (SmolLM2's captured graph builds the mask from positions, so the graph itself cannot say it is causal).

    Exact: with ``M = tril(1)``, ``softmax(QKᵀ·s + log M)`` and the causal softmax are the same function, and
    the check runs on the mask's values (once per mask tensor: every block of a batch reads the same one). Any
    other mask (padding, packed documents, a cache offset) runs as captured."""

    _causal_seen: dict | None = None

    def call_function(self, target, args, kwargs):
        if target is aten.scaled_dot_product_attention.default:
            args, kwargs = self._causal_form(args, kwargs)
        return super().call_function(target, args, kwargs)

    def _causal_form(self, args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = {**dict(zip(names, args)), **kwargs}
        mask = bound.get("attn_mask")
        if mask is None or bound.get("is_causal", False) or len(args) > 4:
            return args, kwargs
        if self._causal_seen is None:
            self._causal_seen = {}
        seen = self._causal_seen.get(id(mask))
        if seen is None or seen[0] is not mask:
            if len(self._causal_seen) >= 8:  # a few batches' masks alive at once; keep the cache small
                self._causal_seen.clear()
            seen = self._causal_seen[id(mask)] = (mask, is_causal_mask(mask, args[0].shape[-2], args[1].shape[-2]))
        if not seen[1]:
            return args, kwargs
        rest = {k: v for k, v in kwargs.items() if k != "attn_mask"}
        return tuple(args[:3]), {**rest, "is_causal": True}


def capture(model: torch.nn.Module, example_ids: torch.Tensor | None = None, max_seq: int = 8192) -> fx.GraphModule:
    """``torch.export`` the model (input_ids → logits, no KV cache) with dynamic batch and sequence length,
    on the model's device, into a graph that runs on any device (see the module docstring)."""
    example_ids, dims = export_inputs(model, example_ids, max_seq)
    try:
        ep = export(model, example_ids, dims)
    except Exception as e:  # torch.export raises many types; name the construct it reports
        raise export_error("torch.export", model, e) from e
    gm = ep.module()
    follow_input_device(gm)
    return gm


def _shape(node: fx.Node):
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) if isinstance(s, int) else None for s in val.shape)
    return None


def _is_tensor_node(node: fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) or (
        isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)
    )


def _operand_nodes(node: fx.Node):
    """(pos, node) for each fx.Node operand; list operands get positions 100·i + j (cat's list: j)."""
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            yield i, a
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, fx.Node):
                    yield (j if i == 0 else 100 * i + j), b


def _scalar(node: fx.Node):
    nums = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return nums[0] if nums else None


def _getitem_attrs(node: fx.Node) -> tuple[str, dict]:
    """A getitem of chunk/split is a slice of its source along the split dim; others are opaque."""
    src, idx = node.args
    if src.target in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default):
        dim = src.args[2] if len(src.args) > 2 else 0
        vals = src.meta["val"]
        rank = vals[0].dim()
        dim = dim % rank
        sizes = [int(v.shape[dim]) for v in vals]
        start = sum(sizes[:idx])
        return "slice", {"dim": dim - rank, "start": start, "stop": start + sizes[idx]}
    return "other", {}


def _linear_attrs(node: fx.Node, params: dict[fx.Node, str]) -> dict:
    w = node.args[1]
    if node.target == aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else None
        return {"weight": params.get(_through_casts(w)),
                "bias": params.get(_through_casts(bias)) if bias is not None else None, "in_axis": -1,
                "out_axis": -2, "experts": None}
    # grouped expert matmul x @ transpose(W[E, out, in]) (transformers' grouped_mm)
    src = w
    while src.op == "call_function" and src.target in _VIEWS | {aten.transpose.int}:
        src = src.args[0]
    return {"weight": params.get(src), "bias": None, "in_axis": -1, "out_axis": -2,
            "experts": int(src.meta["val"].shape[0]) if "val" in src.meta else None}


_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default, aten.type_as.default}


def _through_casts(node):
    """The node a chain of dtype casts starts from (a router's ``weight.float()`` is still the weight)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def _param_2d(gm: fx.GraphModule, node) -> torch.Tensor | None:
    node = _through_casts(node)
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = _attr(gm, node.target)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return value
    return None


def canonicalize_linears(gm: fx.GraphModule) -> list[str]:
    """Rewrite every matmul against a 2-D weight into ``aten.linear(x, W[out, in], b)``; return the weights
    whose storage was transposed.

    - ``matmul(x, Wᵀ)`` / ``mm(x, Wᵀ)`` (Falcon's ``x @ W.T``) is ``linear(x, W)``: no data moves;
    - ``addmm(b, x, W)`` and ``matmul(x, W)`` with W stored [in, out] (GPT-2's Conv1D) is ``linear(x, Wᵀ, b)``:
      the parameter is replaced, under its source name, by its transpose (W is read nowhere else; a weight
      read by other nodes too is left as it is, and stays an unmatched matmul).
    Afterwards every weight of the graph is [out, in], so passes and kernels see one layout.
    """
    transposed = []
    graph = gm.graph
    readers: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            readers[n.target] = readers.get(n.target, 0) + len(n.users)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            bias, x, w = node.args
        elif node.target in (aten.matmul.default, aten.mm.default):
            (x, w), bias = node.args, None
        else:
            continue
        if _param_2d(gm, x) is not None or (bias is not None and (
                not isinstance(bias, fx.Node) or _through_casts(bias).op != "get_attr")):
            continue
        if isinstance(w, fx.Node) and w.op == "call_function" and w.target in _TRANSPOSES and (
                w.target != aten.transpose.int or sorted(d % 2 for d in w.args[1:]) == [0, 1]) and \
                _param_2d(gm, w.args[0]) is not None:
            weight = w.args[0]  # x @ Wᵀ with W [out, in]
        elif _param_2d(gm, w) is not None and _through_casts(w) is w and readers.get(w.target) == 1:
            value = _attr(gm, w.target)  # x @ W with W [in, out]: store Wᵀ under the same name
            *path, leaf = w.target.split(".")
            mod = gm.get_submodule(".".join(path)) if path else gm
            setattr(mod, leaf, torch.nn.Parameter(value.detach().t().contiguous(), requires_grad=False))
            w.meta["val"] = getattr(mod, leaf)
            weight = w
            transposed.append(w.target)
        else:
            continue
        node.target = aten.linear.default
        node.args = (x, weight) if bias is None else (x, weight, bias)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return transposed


def _is_grouped_mm(node: fx.Node) -> bool:
    return node.op == "call_function" and "grouped_mm" in str(node.target)


def to_opgraph(gm: fx.GraphModule) -> OpGraph:
    """The OpGraph view of a captured module (node names are the fx node names)."""
    og = OpGraph(source="fx")
    params = {n: n.target for n in gm.graph.nodes if n.op == "get_attr" and isinstance(_attr(gm, n.target), torch.Tensor)}
    for node in gm.graph.nodes:
        if not _is_tensor_node(node):
            continue
        attrs: dict = {}
        if node.op == "placeholder":
            kind, op = "input", "input"
        elif node.op == "output":
            kind, op = "output", "output"
        elif node.op == "get_attr":
            if node not in params:
                continue
            kind, op, attrs = "param", "param", {"param": node.target}
        elif node.target is operator.getitem:
            kind, attrs = _getitem_attrs(node)
            op = "getitem"
        elif _is_grouped_mm(node):
            kind, op, attrs = "linear", str(node.target), _linear_attrs(node, params)
        else:
            op = str(node.target)
            if node.meta.get("qcompile") == "online":  # a pass's online transform (plain aten ops)
                kind = "transform"
            elif op.startswith("qcompile.hadamard"):
                kind, attrs = "hadamard", {"block": node.args[1] if len(node.args) > 1 else 0}
            elif op.startswith("qcompile.fake_quant"):
                kind, attrs = "quant", {"bits": node.args[1]}
            elif node.target in _KIND:
                kind = _KIND[node.target]
            elif node.target in _ACTIVATIONS:
                kind, attrs = "activation", {"fn": _ACTIVATIONS[node.target]}
            elif node.target in _VIEWS:
                kind = "view"
            else:
                kind = "other"
            if kind == "linear":
                attrs = _linear_attrs(node, params)
            elif kind in ("mul", "add", "sub", "div", "pow"):
                attrs = {"scalar": _scalar(node)}
            elif kind == "slice":
                a = list(node.args) + [None] * 4
                rank = node.args[0].meta["val"].dim()
                attrs = {"dim": (a[1] if a[1] is not None else 0) % rank - rank, "start": a[2] or 0, "stop": a[3]}
            elif kind in ("layernorm", "rmsnorm"):
                eps = node.args[4] if kind == "layernorm" and len(node.args) > 4 else (
                    node.args[3] if kind == "rmsnorm" and len(node.args) > 3 else 1e-5)
                attrs = {"eps": eps}
        og.add(node.name, kind, op, _shape(node), **attrs)
        for pos, src in _operand_nodes(node):
            if src.name in og.graph:
                og.connect(src.name, node.name, pos)
    return og


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def node_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)
