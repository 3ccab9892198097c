"""Program: the captured graph, its weights, its ModelMap and what each pass did to it.

Every pass is a function ``Program -> Program`` that works on a copy, so the original stays usable
as the reference that exactness tests compare against. Weights are read and written by their source
names; graph edits go through the small helpers here so the ModelMap stays true to the graph.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile.analysis.match import match
from qcompile.analysis.modelmap import ModelMap
from qcompile.errors import QCompileError
from qcompile.graph import fx as fx_ir


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
    module: fx.GraphModule
    model_map: ModelMap
    aliases: dict = field(default_factory=dict)  # param name -> every name the source model gives it
    reports: list = field(default_factory=list)
    quantized: dict = field(default_factory=dict)  # weight name -> QuantizedWeight (codes and grid)

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
        return cls(module, match(fx_ir.to_opgraph(module)), alias_map)

    def clone(self) -> "Program":
        return Program(copy.deepcopy(self.module), self.model_map, dict(self.aliases), list(self.reports),
                       dict(self.quantized))

    def with_map(self, **changes) -> "Program":
        self.model_map = dataclasses.replace(self.model_map, **changes)
        return self

    def rematch(self) -> None:
        """Match the edited graph again: node names are stable, and the invariances are proved anew."""
        self.module.graph.lint()
        self.model_map = match(fx_ir.to_opgraph(self.module))

    def done(self, report: PassReport) -> "Program":
        self.reports.append(report)
        self.module.recompile()
        return self

    def has_run(self, name: str) -> bool:
        return any(r.name == name for r in self.reports)

    # --- devices -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (the device of the first parameter or buffer)."""
        return fx_ir.module_device(self.module)

    def to(self, device: torch.device | str) -> "Program":
        """Move every weight, buffer and tensor constant of the graph, and the quantized codes and grids, to
        ``device`` (in place; returns self). The graph itself holds no device (``graph.fx.follow_input_device``),
        so it then runs on ``device``'s inputs."""
        device = torch.device(device)
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
        self.quantized = {k: move_quantized(q, device) for k, q in self.quantized.items()}
        return self

    # --- running -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids`` [batch, seq], computed on the Program's device (the ids are moved there)."""
        out = self.module(input_ids=input_ids.to(self.device))
        return out.logits if hasattr(out, "logits") else out[0]

    # --- weights -------------------------------------------------------------------------------------------
    def weight(self, name: str) -> torch.Tensor:
        obj = self.module
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        """Replace a weight in place of its source name, keeping its dtype."""
        old = self.weight(name)
        if old.shape != value.shape:
            raise QCompileError(f"new value for {name} has shape {tuple(value.shape)}, expected {tuple(old.shape)}")
        with torch.no_grad():
            old.copy_(value.to(old.dtype))

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

    def insert_on_operand(self, consumer: str, pos: int, op, *args) -> fx.Node:
        """Put ``op(operand, *args)`` between operand ``pos`` of node ``consumer`` and the consumer."""
        node = self.node(consumer)
        src = node.args[pos]
        with self.module.graph.inserting_before(node):
            new = self.module.graph.call_function(op, (src, *args))
        new.meta["val"] = src.meta.get("val")
        node.update_arg(pos, new)
        return new

    def node(self, name: str) -> fx.Node:
        return fx_ir.node_by_name(self.module, name)

    def users_of_weight(self, name: str) -> list[fx.Node]:
        return [u for n in self.module.graph.nodes if n.op == "get_attr" and n.target == name for u in n.users]
