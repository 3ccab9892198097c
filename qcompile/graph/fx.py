"""The torch.fx side: capture a model with ``torch.export``, view it as an OpGraph, edit it.

The captured graph is the *unlifted* module of the ExportedProgram (``ep.module()``): weights stay
``get_attr`` nodes whose targets are the model's own parameter names, so the source name of a weight
is its identity from capture to the saved file. The sequence length is a dynamic dimension, so one
capture serves calibration, evaluation and generation lengths alike.
"""

from __future__ import annotations

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
}


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


def capture(model: torch.nn.Module, example_ids: torch.Tensor | None = None, max_seq: int = 8192) -> fx.GraphModule:
    """``torch.export`` the model (input_ids → logits, no KV cache) with dynamic batch and sequence length."""
    example_ids, dims = export_inputs(model, example_ids, max_seq)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), {"input_ids": example_ids}, dynamic_shapes={"input_ids": dims},
                                     strict=False)
    except Exception as e:  # torch.export raises many types; name the construct it reports
        raise export_error("torch.export", model, e) from e
    return ep.module()


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
        return {"weight": params.get(w), "bias": params.get(bias) if bias is not None else None, "in_axis": -1,
                "out_axis": -2, "experts": None}
    # grouped expert matmul x @ transpose(W[E, out, in]) (transformers' grouped_mm)
    src = w
    while src.op == "call_function" and src.target in _VIEWS | {aten.transpose.int}:
        src = src.args[0]
    return {"weight": params.get(src), "bias": None, "in_axis": -1, "out_axis": -2,
            "experts": int(src.meta["val"].shape[0]) if "val" in src.meta else None}


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
