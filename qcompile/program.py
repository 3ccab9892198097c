"""Program: the captured graph, its weights, its ModelMap and what each pass did to it.

Every pass is a function ``Program -> Program`` that works on a copy, so the original stays usable
as the reference that exactness tests compare against. Weights are read and written by their source
names; graph edits go through the IR's ``graph.edit.GraphEdit`` (fx or ONNX), so a pass written against
it runs on both IRs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile.analysis.match import match
from qcompile.analysis.modelmap import ModelMap
from qcompile.errors import CaptureError, MatchError, QCompileError
from qcompile.graph import fx as fx_ir
from qcompile.graph.edit import GraphEdit, Online
from qcompile.graph.fx_edit import FxGraph
from qcompile.graph.lazy_weights import put_param


@dataclass
class PassReport:
    """What a pass rewrote (counted per kind of site), the sites themselves, and what it skipped and why."""

    name: str
    counts: dict = field(default_factory=dict)
    sites: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (site, reason)
    notes: dict = field(default_factory=dict)

    def count(self, what: str, site: str | None = None, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n
        if site is not None:
            self.sites.append(f"{what}: {site}")

    def skip(self, site: str, reason: str) -> None:
        self.skipped.append((site, reason))

    def lines(self) -> list[str]:
        out = [f"{self.name}: " + (", ".join(f"{k} ×{v}" for k, v in self.counts.items()) or "nothing rewritten")]
        out += [f"  {k}: {v}" for k, v in self.notes.items()]
        out += [f"  skipped {s}: {r}" for s, r in self.skipped]
        return out


def move_quantized(qw, device: torch.device):
    """A QuantizedWeight (or any dataclass of tensors) with every tensor field on ``device``."""
    if not dataclasses.is_dataclass(qw):
        return qw
    moved = {f.name: getattr(qw, f.name).to(device) for f in dataclasses.fields(qw)
             if f.init and isinstance(getattr(qw, f.name), torch.Tensor)}
    return dataclasses.replace(qw, **moved) if moved else qw


@dataclass
class Program:
    """A graph behind the ``GraphEdit`` interface (fx or ONNX), its ModelMap, and what was done to it."""

    graph: GraphEdit
    model_map: ModelMap
    aliases: dict = field(default_factory=dict)  # param name -> every name the source model gives it
    reports: list = field(default_factory=list)
    quantized: dict = field(default_factory=dict)  # weight name -> QuantizedWeight (codes and grid)
    # weight name -> where its values are while its parameter is on the meta device (``graph.lazy_weights``;
    # ``qcompile.lazy`` builds such Programs from a checkpoint's shards)
    lazy: dict = field(default_factory=dict)

    # --- construction --------------------------------------------------------------------------------------
    @classmethod
    def capture(cls, model: torch.nn.Module, example_ids: torch.Tensor | None = None) -> "Program":
        module = fx_ir.capture(model, example_ids)
        fx_ir.canonicalize_linears(module)  # Conv1D / x @ Wᵀ → aten.linear with an [out, in] weight
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        by_name = {names[0]: names for names in aliases.values()}
        named = {n: names for names in aliases.values() for n in names}
        alias_map = {n.target: named.get(n.target, by_name.get(n.target, [n.target]))
                     for n in module.graph.nodes if n.op == "get_attr"}
        graph = FxGraph(module)
        return cls(graph, match(graph.opgraph()), alias_map)

    @classmethod
    def from_onnx(cls, path) -> "Program":
        """A Program over an ONNX decoder (input_ids → logits), e.g. ``torch.onnx.export(dynamo=True)``'s;
        refused with the file's name when it is unreadable, incomplete or not a decoder."""
        from qcompile.graph.onnx_edit import OnnxGraph

        graph = OnnxGraph.load(path)
        try:
            model_map = match(graph.opgraph())
        except MatchError as e:
            raise CaptureError(f"{path} is not a causal LM decoder qcompile can read: {e}") from None
        return cls(graph, model_map)

    @property
    def ir(self) -> str:
        return self.graph.ir

    @property
    def module(self) -> fx.GraphModule:
        """The fx GraphModule (fx Programs only: a pass that edits fx nodes itself is not ported to ONNX)."""
        if self.graph.ir != "fx":
            raise QCompileError("this step edits torch.fx nodes directly and is not ported to ONNX models yet; "
                                "capture the model from PyTorch instead")
        return self.graph.module

    def clone(self) -> "Program":
        """A copy to edit; lazy weights are shared (their parameters are meta tensors, copied for nothing)."""
        return Program(self.graph.clone(), self.model_map, dict(self.aliases), list(self.reports),
                       dict(self.quantized), dict(self.lazy))

    def with_map(self, **changes) -> "Program":
        self.model_map = dataclasses.replace(self.model_map, **changes)
        return self

    def rematch(self) -> None:
        """Match the edited graph again: node names are stable, and the invariances are proved anew."""
        self.model_map = match(self.graph.opgraph())

    def done(self, report: PassReport) -> "Program":
        self.reports.append(report)
        self.graph.finish()
        return self

    def has_run(self, name: str) -> bool:
        return any(r.name == name for r in self.reports)

    # --- devices -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (the device of the first parameter or buffer)."""
        return self.graph.device

    def to(self, device: torch.device | str) -> "Program":
        """Move every weight, buffer and tensor constant of the graph, and the quantized codes and grids, to
        ``device`` (in place; returns self). The graph itself holds no device (``graph.fx.follow_input_device``),
        so it then runs on ``device``'s inputs."""
        device = torch.device(device)
        if self.lazy:
            raise QCompileError(f"this Program reads {len(self.lazy)} weights from its checkpoint's shards when a "
                                "block runs (lazy loading); it cannot be moved whole: give the block-by-block step "
                                "a device instead (compile(..., device=...))")
        self.graph.to(device)
        self.quantized = {k: move_quantized(q, device) for k, q in self.quantized.items()}
        return self

    # --- running -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids`` [batch, seq], computed on the Program's device (the ids are moved there); with
        lazy weights, block by block (``passes.blockwise.logits_blockwise``): each block's weights read when it runs."""
        if self.lazy:
            from qcompile.passes.blockwise import logits_blockwise

            return logits_blockwise(self, input_ids)
        return self.graph.logits(input_ids)

    # --- weights and edits (see ``graph.edit``) -----------------------------------------------------------
    def is_lazy(self, name: str) -> bool:
        """Whether weight ``name`` is in ``lazy`` and not read in yet (a block that runs holds it on its device)."""
        return name in self.lazy and self.graph.has_weight(name) and self.graph.weight(name).is_meta

    def weight(self, name: str) -> torch.Tensor:
        """The weight's tensor; a lazy weight's is a fresh float32 copy on the host (writes to it reach nothing:
        ``set_weight`` does)."""
        if self.is_lazy(name):
            return self.lazy[name].materialize("cpu")
        return self.graph.weight(name)

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        """Replace a weight in place of its source name, keeping its dtype. A lazy weight is copied on write: it
        then holds ``value`` in host memory (float32, 4 bytes a parameter) and is no longer read from its source."""
        if self.is_lazy(name):
            old = self.graph.weight(name)
            if old.shape != value.shape:
                raise QCompileError(f"new value for {name} has shape {tuple(value.shape)}, expected {tuple(old.shape)}")
            put_param(self.module, name, value.detach().to("cpu", old.dtype))  # shared when already host float32
            del self.lazy[name]
            return
        self.graph.set_weight(name, value)

    def add_weight(self, name: str, value: torch.Tensor, replace: bool = False):
        """Add a new weight (``replace``: a fresh copy under an existing name no node reads yet); returns the
        IR's handle of it (an fx get_attr node)."""
        return self.graph.add_weight(name, value, replace=replace)

    def insert_on_operand(self, consumer: str, pos: int, op: Online) -> str:
        """Put ``op(operand)`` between operand ``pos`` of node ``consumer`` and the consumer."""
        return self.graph.insert_on_operand(consumer, pos, op)

    def node(self, name: str) -> fx.Node:
        return fx_ir.node_by_name(self.module, name)
