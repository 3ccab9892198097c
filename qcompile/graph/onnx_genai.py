"""onnxruntime-genai's decoder graphs (its model builder's output) as qcompile ONNX Programs.

The builder writes one decoder step with a KV cache::

    (input_ids [B, S], attention_mask [B, P + S], past_key_values.{i}.key/value [B, H_kv, P, D])
        → (logits [B, S, V], present.{i}.key/value [B, H_kv, P + S, D])

(the names as its ``genai_config.json`` gives them) and onnxruntime's fused ops: ``GroupQueryAttention`` (q|k|v
packed in one MatMul, RoPE inside with ``do_rotary=1``), ``SkipSimplifiedLayerNormalization`` (residual add and
RMSNorm in one op), ``MatMul`` against pre-transposed [K, N] weights and a tied table read as
``Gather(Transpose(lm_head))``. This module is what is particular to that form:

- ``Signature``: the step's inputs and outputs, refused by name where one is not the above;
- ``unfuse_skip_norms`` / ``fuse_skip_norms``: ``SkipSimplifiedLayerNormalization(a, b, γ)`` is
  ``s = a + b; y = RMSNorm(s)·γ`` with outputs (y, —, —, s). The Program holds it as ``Add`` + ``SimplifiedLayer
  Normalization`` so that the residual stream s is a value of its own (the matcher reads the add, blockwise
  calibration cuts the graph there); the folder written is fused again, as the builder wrote it;
- ``feeds``: a scoring run is the step from an empty cache (P = 0, the mask all ones): calibration and GPTQ
  run the full windows through it;
- ``check_recipe`` and R3: RoPE inside ``GroupQueryAttention`` leaves no value between RoPE and the scores for
  R3's online Hadamard. R3 is dropped instead, which is exact while K is not quantized: the scores are
  (qH)(kH)ᵀ = q·H·Hᵀ·kᵀ = q·kᵀ, and the cache that holds k is written and read by this graph only, so its basis
  is the graph's own (``export/gqa.drop_cancelling_r3``'s reasoning). A recipe that quantizes the K/V cache
  is refused on such a graph, so the drop is never taken where it would change the model.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.errors import CaptureError, RecipeError

GENAI_CONFIG = "genai_config.json"
MS_DOMAIN = "com.microsoft"
# genai's default names (its model builder's, and those of the steps qcompile writes); %d is the layer
NAMES = ("input_ids", "attention_mask", "past_key_values.%d.key", "past_key_values.%d.value", "present.%d.key",
         "present.%d.value")


def cache_names(layers: int) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """The default names of a ``layers``-layer step's cache: (past, present), each (key, value) per layer."""
    pk, pv, ok, ov = NAMES[2:]
    return tuple((pk % i, pv % i) for i in range(layers)), tuple((ok % i, ov % i) for i in range(layers))


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs of a decoder step with a KV cache (see the module docstring)."""

    input_ids: str
    attention_mask: str | None
    past: tuple[tuple[str, str], ...]  # (key, value) input names per layer
    present: tuple[tuple[str, str], ...]  # (key, value) output names per layer
    kv_heads: tuple[int, ...]
    head_dim: int

    def feeds(self, ids: np.ndarray, names) -> dict[str, np.ndarray]:
        """Inputs ``names`` of a run over token ids ``ids`` [B, S] from an empty cache: the mask all ones,
        every past K/V [B, H_kv, 0, D]."""
        past = {n: h for (k, v), h in zip(self.past, self.kv_heads) for n in (k, v)}
        out = {}
        for n in names:
            if n == self.input_ids:
                out[n] = ids
            elif n == self.attention_mask:
                out[n] = np.ones(ids.shape, dtype=np.int64)
            elif n in past:
                out[n] = np.zeros((ids.shape[0], past[n], 0, self.head_dim), dtype=np.float32)
            else:
                raise CaptureError(f"no value to feed graph input {n}")
        return out


def _config_names(path: Path | None) -> tuple[str, str, str, str, str, str] | None:
    """(input_ids, attention_mask, past key/value, present key/value patterns) from a genai_config beside the file."""
    if path is None or not (path.parent / GENAI_CONFIG).is_file():
        return None
    try:
        dec = json.loads((path.parent / GENAI_CONFIG).read_text())["model"]["decoder"]
        i, o = dec["inputs"], dec["outputs"]
        return (i.get("input_ids", "input_ids"), i.get("attention_mask"), i["past_key_names"], i["past_value_names"],
                o["present_key_names"], o["present_value_names"])
    except (KeyError, ValueError, TypeError) as e:
        raise CaptureError(f"{path.parent / GENAI_CONFIG}: cannot read the decoder's input/output names: "
                           f"{type(e).__name__}: {e}") from None


def _pattern(fmt: str) -> re.Pattern:
    return re.compile("^" + re.escape(fmt).replace("%d", r"(\d+)") + "$")


def signature(model: ir.Model, where: str, path: Path | None = None) -> Signature | None:
    """The KV-cache signature of ``model``, or None for a graph whose only input is the token ids. Names come
    from ``genai_config.json`` beside ``path`` when there is one, else the builder's defaults; an input or
    output that is none of them is refused by name (position ids, a cache of another layout)."""
    ins = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(ins) <= 1:
        return None
    names = _config_names(path) or NAMES
    ids_name, mask_name = names[:2]
    pk, pv, ok, ov = (_pattern(f) for f in names[2:])
    past, present, heads, dims = {}, {}, {}, set()
    for v in ins:
        if v.name in (ids_name, mask_name):
            continue
        m = pk.match(v.name) or pv.match(v.name)
        if m is None:
            raise CaptureError(f"{where}: graph input {v.name} is none of {ids_name}, {mask_name}, past K/V "
                               f"({names[2]}, {names[3]}): a decoder step qcompile cannot feed")
        layer, kind = int(m.group(1)), "key" if pk.match(v.name) else "value"
        past.setdefault(layer, {})[kind] = v.name
        shape = v.shape
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
            raise CaptureError(f"{where}: past input {v.name} has shape {shape}, expected [batch, kv_heads, past, "
                               "head_dim] with kv_heads known")
        heads[layer] = shape[1]
        if isinstance(shape[3], int):
            dims.add(shape[3])
    for v in model.graph.outputs[1:]:
        m = ok.match(v.name) or ov.match(v.name)
        if m is None:
            raise CaptureError(f"{where}: graph output {v.name} is neither the logits nor a present K/V "
                               f"({names[4]}, {names[5]})")
        present.setdefault(int(m.group(1)), {})["key" if ok.match(v.name) else "value"] = v.name
    ids = [v for v in ins if v.name == ids_name]
    if not ids or ids[0].dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        raise CaptureError(f"{where}: a KV-cache decoder needs an integer input {ids_name}; inputs are "
                           f"{[v.name for v in ins[:4]]}")
    layers = sorted(past)
    if layers != list(range(len(layers))) or sorted(present) != layers or any(
            len(past[i]) != 2 or len(present[i]) != 2 for i in layers):
        raise CaptureError(f"{where}: past/present K/V are not one key and one value for layers 0…{len(layers) - 1}: "
                           f"past layers {layers}, present layers {sorted(present)}")
    if not dims:
        dims = {_head_dim(model)}
    if len(dims) != 1 or None in dims:
        raise CaptureError(f"{where}: cannot tell the head size of the cache (past inputs' last axis: {dims})")
    return Signature(ids_name, mask_name if any(v.name == mask_name for v in ins) else None,
                     tuple((past[i]["key"], past[i]["value"]) for i in layers),
                     tuple((present[i]["key"], present[i]["value"]) for i in layers),
                     tuple(heads[i] for i in layers), dims.pop())


def _head_dim(model: ir.Model) -> int | None:
    """Head size from the first GroupQueryAttention: packed width / (num_heads + 2·kv_num_heads)."""
    for node in model.graph:
        if node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN:
            h, kv = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
            s = node.inputs[0].shape
            if s is not None and isinstance(s[-1], int) and h:
                packed = node.inputs[1] is None
                return s[-1] // (h + 2 * kv) if packed else s[-1] // h
    return None


def unfuse_skip_norms(model: ir.Model, where: str) -> int:
    """Every ``SkipSimplifiedLayerNormalization(a, b, γ[, β])`` → ``s = a + b [+ β]`` and
    ``SimplifiedLayerNormalization(s, γ)``; s takes output 3's name where it has one. Returns the count.
    Outputs 1 and 2 (mean, 1/σ) are training outputs: a graph that reads them is refused, naming the node."""
    g, done = model.graph, 0
    for node in list(g):
        if node.op_type != "SkipSimplifiedLayerNormalization" or node.domain != MS_DOMAIN:
            continue
        outs = list(node.outputs) + [None] * (4 - len(node.outputs))
        for i in (1, 2):
            if outs[i] is not None and (outs[i].uses() or outs[i].is_graph_output()):
                raise CaptureError(f"{where}: {node.name} (SkipSimplifiedLayerNormalization) output {i} is read; "
                                   "only its normalized output and the sum are supported")
        a, b, gamma = node.inputs[:3]
        beta = node.inputs[4] if len(node.inputs) > 4 else None
        eps = node.attributes.get_float("epsilon", 1e-5)
        add = ir.Node("", "Add", [a, b], num_outputs=1, name=f"{node.name}/Add")
        s = add.outputs[0]
        new = [add]
        if beta is not None:
            add_b = ir.Node("", "Add", [s, beta], num_outputs=1, name=f"{node.name}/AddBias")
            new.append(add_b)
            s = add_b.outputs[0]
        norm = ir.Node("", "SimplifiedLayerNormalization", [s, gamma], num_outputs=1, name=f"{node.name}/Norm",
                       attributes=[ir.AttrFloat32("epsilon", eps), ir.AttrInt64("axis", -1),
                                   ir.AttrInt64("stash_type", 1)])
        new.append(norm)
        y, total = outs[0], outs[3] if outs[3] is not None and outs[3].name else None
        g.insert_after(node, new)
        s_name = total.name if total is not None else f"{y.name}/sum"
        for old, value, name in ((y, norm.outputs[0], y.name), (total, s, s_name)):
            value.shape, value.type = y.shape, y.type
            if old is not None:
                old.replace_all_uses_with(value, replace_graph_outputs=True)
                old.name = None
            value.name = name
        g.remove(node, safe=True)
        done += 1
    return done


def fuse_skip_norms(model: ir.Model) -> int:
    """The inverse of ``unfuse_skip_norms``: ``SimplifiedLayerNormalization(Add(a, b), γ)`` with both a and b
    computed (no constant) → ``SkipSimplifiedLayerNormalization(a, b, γ)`` with the sum as output 3 where
    anything else reads it. Returns the count."""
    g, done = model.graph, 0
    for norm in list(g):
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        s = norm.inputs[0]
        add = s.producer()
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or any(
                v is None or v.is_initializer() or v.const_value is not None for v in add.inputs):
            continue
        if norm.attributes.get_int("axis", -1) != -1 or len(norm.inputs) != 2:
            continue
        eps = norm.attributes.get_float("epsilon", 1e-5)
        others = [u for u in s.uses() if u.node is not norm] or s.is_graph_output()
        fused = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], norm.inputs[1]],
                        num_outputs=4 if others else 1, name=norm.name or add.name,
                        attributes=[ir.AttrFloat32("epsilon", eps)])
        y = norm.outputs[0]
        g.insert_after(norm, fused)
        pairs = [(y, fused.outputs[0])] + ([(s, fused.outputs[3])] if others else [])
        for old, new in pairs:
            name, shape, type_ = old.name, old.shape, old.type
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = None
            new.name, new.shape, new.type = name, shape, type_
        for o in fused.outputs[1:3] if others else ():
            o.name = ""
        g.remove(norm, safe=True)
        if not add.outputs[0].uses():
            g.remove(add, safe=True)
        done += 1
    if done:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return done


def check_recipe(model_map, recipe) -> None:
    """Refuse what cannot run where RoPE is inside the attention op: K/V quantization (the K the cache holds
    is after RoPE, inside ``GroupQueryAttention``). With it refused, dropping R3 is exact (module docstring)."""
    fused = [b.attention.node for b in model_map.blocks if b.attention is not None and b.attention.rope_inside]
    if fused and recipe.kv:
        raise RecipeError(f"KV{recipe.kv.bits}: attention {fused[0]} applies RoPE inside the op "
                          "(GroupQueryAttention do_rotary=1), so K after RoPE is never a value of the graph to "
                          "quantize; use a recipe without kv (e.g. --kv 16)")


def copy_companions(src: Path, dst: Path, model_file: str) -> list[str]:
    """Copy the files beside a builder's model (genai_config.json, tokenizer and chat template, …) into
    ``dst``, but the model and its external data; returns their names."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(model_file) and not f.name.endswith((".onnx", ".onnx.data")):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied
