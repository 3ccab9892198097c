"""GraphEdit: the few graph edits the passes make, one interface with an fx and an ONNX implementation.

A pass reads structure from the ModelMap and changes weights by their source names; where it must change
the graph itself it calls one of these edits, so the same pass runs on a torch.fx capture
(``graph/fx_edit.FxGraph``) and on an ONNX model (``graph/onnx_edit.OnnxGraph``). Nodes are named as the
OpGraph names them (fx node names, ONNX value names); an operand position is the OpGraph's.

The edits, and what each keeps true:

- ``weight`` / ``set_weight`` / ``add_weight``: a tensor by its source name (``val_102`` included); a value
  written back keeps the weight's dtype and shape.
- ``use_weight(consumer, pos, name)``: operand ``pos`` of ``consumer`` reads weight ``name`` instead (untying).
- ``insert_on_operand(consumer, pos, op)``: ``consumer`` reads ``op(x)`` where it read x; other readers of x
  still read x. ``insert_after(node, op)``: every reader of ``node`` reads ``op(node)``.
- ``bypass(node)``: every reader of ``node`` reads its operand 0 (``x − mean(x)`` on a mean-free stream).
- ``to_rms(norm)``: a fused LayerNorm op becomes an RMSNorm op with the same γ and ε (β dropped: it is 0).
- ``add_bias(linear, name, value)``: the linear gets a bias (it had none), a new weight ``name``.
- ``add_after(node, name, value)``: every reader of ``node`` reads ``node + β``, β a new weight ``name``
  (a shift migrated into a bias-less norm: the matcher reads the add as the norm's β).
- ``give_norm_weight(norm, name)``: a norm op without a scale gets γ = 1, a new weight ``name`` (LayerNorm
  turned RMS in fx drops γ; a smoothing scale divides it).
- ``lower_linear(linear, weight, packed)``: the linear becomes a quantized INT4 op on the packed weight,
  reading its input as the graph gives it (float: W4A16; a fake quantization, possibly of an online
  Hadamard: W4A8/W4A4 with the Hadamard fused); returns the label of the op.

``torch_forward()`` gives a forward differentiable in weights passed by name (SpinQuant learns through it):
``functional_call`` on fx, the graph evaluated by torch ops on ONNX (``graph/onnx_torch``).

The online ops (``Online``) are a Hadamard over the last axis, a per-token fake quantization and DuQuant's
block rotations around a permutation (``Transform``); fx inserts ``torch.ops.qcompile.*`` calls (the
transform as plain aten ops marked ``online``), ONNX calls to model-local functions of the ``qcompile``
domain whose bodies are ``kernels/ort``'s translations of the same ops (the transform's weights are
operands of its call), which the OpGraph reads as one ``hadamard``/``quant``/``transform`` node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from qcompile.graph.opgraph import OpGraph


@dataclass(frozen=True)
class Hadamard:
    """x ↦ x·H over the last axis (block-diagonal blocks of ``block``; 0: the whole axis)."""

    block: int = 0
    name = "hadamard"


@dataclass(frozen=True)
class FakeQuant:
    """Per-token (per-row) quantize→dequantize of x at ``bits``, as ``formats.fake_quantize_per_token``."""

    bits: int
    symmetric: bool
    clip: float
    name = "fake_quant"


@dataclass(frozen=True, eq=False)
class Transform:
    """x ↦ x·T over the last axis, T = R₁·P·R₂ (DuQuant) block-diagonal around a column gather: the first
    F = K·b channels as [..., K, b] · ``r1`` (one b×b matrix for every full block) → flatten → gather ``perm``
    (over F) → [..., K, b] · ``r2`` → flatten; a partial last block (C − F channels, which P leaves in place)
    times ``tail`` = its own R₁·R₂ block, concatenated after. Its tensors become new weights ``{weight}.R1``,
    ``.perm``, ``.R2`` (and ``.tail``)."""

    weight: str
    block: int
    r1: torch.Tensor
    perm: torch.Tensor
    r2: torch.Tensor
    tail: torch.Tensor | None = None
    name = "transform"

    @property
    def full(self) -> int:
        """F: the channels in full blocks."""
        return self.perm.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """{weight name: tensor} in operand order after x."""
        out = {f"{self.weight}.R1": self.r1, f"{self.weight}.perm": self.perm, f"{self.weight}.R2": self.r2}
        return out if self.tail is None else out | {f"{self.weight}.tail": self.tail}


Online = Hadamard | FakeQuant | Transform


@runtime_checkable
class GraphEdit(Protocol):
    """What a pass may do to a graph (see the module docstring)."""

    ir: str  # "fx" or "onnx"

    def opgraph(self) -> OpGraph: ...

    def clone(self) -> "GraphEdit": ...

    # weights
    def weight(self, name: str) -> torch.Tensor: ...

    def set_weight(self, name: str, value: torch.Tensor) -> None: ...

    def add_weight(self, name: str, value: torch.Tensor, replace: bool = False): ...

    def has_weight(self, name: str) -> bool: ...

    def readers_of_weight(self, name: str) -> int: ...

    def drop_weight(self, name: str) -> None: ...

    # structure
    def use_weight(self, consumer: str, pos: int, name: str) -> None: ...

    def insert_on_operand(self, consumer: str, pos: int, op: Online) -> str: ...

    def insert_after(self, node: str, op: Online) -> str: ...

    def bypass(self, node: str) -> None: ...

    def to_rms(self, norm: str) -> None: ...

    def add_bias(self, linear: str, name: str, value: torch.Tensor) -> None: ...

    def add_after(self, node: str, name: str, value: torch.Tensor) -> None: ...

    def give_norm_weight(self, norm: str, name: str) -> None: ...

    def lower_linear(self, linear: str, weight: str, packed) -> str: ...

    def eliminate_dead_code(self) -> None: ...

    def finish(self) -> None: ...

    # running
    @property
    def device(self) -> torch.device: ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def torch_forward(self): ...  # (input_ids, params by weight name) -> logits, differentiable in params


def bias_name(weight: str) -> str:
    """The name a new bias of ``weight`` gets: ``x.weight`` → ``x.bias``, else ``weight.bias``."""
    return weight[: -len(".weight")] + ".bias" if weight.endswith(".weight") else weight + ".bias"
