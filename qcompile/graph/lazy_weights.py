"""Weights that stay in a checkpoint's safetensors shards until a block runs (a Program's ``lazy`` map).

A lazy weight's parameter in the captured module is a float32 tensor on the ``meta`` device (shape and dtype
only, no memory); ``Program.lazy`` maps its graph target to where its values are:

- ``Stored``: a tensor of the checkpoint, memory-mapped from its shard as stored (bf16/fp16/fp32; safetensors'
  ``safe_open`` hands out views of the file's mapping, so the bytes live in the page cache, shared and
  reclaimable, not in the process's anonymous memory);
- ``Converted``: a parameter built from several such tensors by transformers' weight conversion (MoE experts
  stored one tensor per expert and projection, held stacked and fused), built when read;
- ``Dequantized``: a weight the quantizer replaced, kept as its codes and grid (``(q − z)·s`` or the codebook,
  computed again when read, equal bit for bit to the dequantized weight the quantizer returned).

``materialize(device)`` gives a fresh float32 tensor (the Program's compute dtype) on ``device``; nothing else
holds it, so it goes when the block that read it is done.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from qcompile.errors import QCompileError
from qcompile.quant.formats import QuantizedWeight, dequantize

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class CheckpointError(QCompileError):
    """A checkpoint's shards are missing, unreadable, truncated, or hold tensors the model does not expect."""


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder's safetensors shards (``model.safetensors``, or the shards
    an index ``model.safetensors.index.json`` lists), each shard opened once and memory-mapped.

    safetensors' ``safe_open`` reads the header and refuses a file whose data does not cover what the header
    promises (a truncated or corrupt shard), which is named here."""

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                listed = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index (no readable weight_map: {e})") from None
            shards = sorted(set(listed.values()))
        elif (self.folder / SINGLE).is_file():
            listed, shards = None, [SINGLE]
        else:
            raise CheckpointError(f"{self.folder} holds neither {SINGLE} nor {INDEX}: lazy loading reads "
                                  "safetensors checkpoints only")
        self.handles, self.shard_of = {}, {}
        for shard in shards:
            path = self.folder / shard
            if not path.is_file():
                raise CheckpointError(f"shard {path} (listed in {INDEX}) is missing")
            try:
                self.handles[shard] = handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"shard {path} cannot be read ({e}): truncated or corrupt?") from None
            for key in handle.keys():
                self.shard_of[key] = shard
        if listed is not None:
            for key, shard in listed.items():
                if self.shard_of.get(key) != shard:
                    raise CheckpointError(f"{INDEX} puts {key} in {shard}, which does not hold it")

    def __contains__(self, key: str) -> bool:
        return key in self.shard_of

    def keys(self) -> list[str]:
        return list(self.shard_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.shard_of[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype | str:
        """The stored dtype (a safetensors dtype name when it is not a float type torch reads)."""
        name = self.handles[self.shard_of[key]].get_slice(key).get_dtype()
        return _DTYPES.get(name, name)

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor, a view of the shard's mapping (no copy; the mapping is private: a write would copy
        the page into the process's memory, never change the file)."""
        return self.handles[self.shard_of[key]].get_tensor(key)

    def read(self, key: str, device) -> torch.Tensor:
        """Tensor ``key`` on ``device`` as stored: on the host the mapping's view, to an accelerator it travels as
        stored (bf16: half the bytes of float32), to be converted there."""
        t = self.tensor(key)
        return t if torch.device(device).type == "cpu" else t.to(device)

    def float32_bytes(self) -> int:
        """What the checkpoint's tensors take in float32 (what an eager load builds)."""
        return sum(4 * _numel(self.shape(k)) for k in self.shard_of)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Stored:
    """A weight read from the checkpoint (``key``) when materialized."""

    checkpoint: Checkpoint
    key: str

    def materialize(self, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A copy on ``device`` in ``dtype``; to an accelerator the tensor travels as stored (bf16: half the bytes
        of float32) and is converted there."""
        return self.checkpoint.read(self.key, device).to(dtype=dtype, copy=True)


@dataclass(frozen=True)
class Converted:
    """Parameter ``target`` as transformers builds it from the checkpoint tensors ``sources`` (per source pattern
    of ``converter``, its keys in the checkpoint's natural order) with ``converter``, its weight conversion (a
    ``transformers.core_model_loading.WeightConverter``: for MoE experts stored ``experts.{e}.gate_proj`` /
    ``up_proj`` / ``down_proj``, ``gate_up_proj = cat([stack_e gate_e, stack_e up_e], 1)`` and
    ``down_proj = stack_e down_e``). The tensors are read when materialized, and only then."""

    checkpoint: Checkpoint
    converter: object
    target: str
    sources: tuple[tuple[str, tuple[str, ...]], ...]

    def convert(self, read) -> torch.Tensor:
        """The converter applied to ``read(key)`` of every source key (a copy of it: a converter collects its
        inputs in itself, as transformers gives each loaded parameter its own)."""
        converter = copy.deepcopy(self.converter)
        for pattern, keys in self.sources:
            for key in keys:
                converter.add_tensor(self.target, key, pattern, partial(read, key))
        return converter.convert(self.target)[self.target]

    def materialize(self, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Built from the tensors as stored (bf16: stacked at half the bytes of float32), then converted to
        ``dtype`` (elementwise, so equal to converting each tensor first, as an eager load does)."""
        return self.convert(partial(self.checkpoint.read, device=device)).to(dtype=dtype, copy=True)


@dataclass(frozen=True)
class Dequantized:
    """A quantized weight kept as its codes and grid: ``(q − z)·s`` per group (or ``codebook[q]``), reshaped."""

    qw: QuantizedWeight
    shape: tuple[int, ...]

    def materialize(self, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return values_of(self.qw, device).reshape(self.shape).to(dtype)


def values_of(qw: QuantizedWeight, device) -> torch.Tensor:
    """The dequantized ``[N, K]`` float32 weight, computed from the codes and grid on ``device``."""
    codes = qw.codes.to(device)
    if qw.codebook is not None:
        return qw.codebook.to(device).float().gather(1, codes.long())
    return dequantize(codes, qw.scales.to(device), qw.zeros.to(device), qw.spec)


def put_param(module: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    """Make parameter ``target`` hold ``tensor``: ``param.data = tensor``, or, between the meta device and a real
    one (which ``.data`` refuses), a new Parameter in every module that holds the old one (tied weights)."""
    param = module.get_parameter(target)
    if param.is_meta == tensor.is_meta:
        param.data = tensor
        return
    new = torch.nn.Parameter(tensor, requires_grad=param.requires_grad)
    for m in module.modules():
        for leaf, p in m._parameters.items():
            if p is param:
                m._parameters[leaf] = new


def make_lazy(module: torch.nn.Module, target: str) -> None:
    """Leave only shape and dtype behind in parameter ``target`` (its values are in ``Program.lazy``)."""
    p = module.get_parameter(target)
    put_param(module, target, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def keep_as_codes(lazy: dict, module: torch.nn.Module, target: str, qw: QuantizedWeight) -> QuantizedWeight:
    """After a lazy weight was quantized: keep only ``qw``'s codes and grid (its dequantized ``weight``, 4 bytes a
    parameter, is dropped: the QuantizedWeight returned has an empty ``weight``) and make the Program's weight
    ``Dequantized`` from them, on the host. Done only where recomputing equals ``qw.weight`` bit for bit and
    the weight is its rows: the plain ``[N, K]``, or stacked experts ``[E, N, K]`` whose values are ``qw.weight``'s
    ``[E·N, K]`` reshaped (checked; else ``qw`` is returned unchanged and the weight stays in memory)."""
    current = module.get_parameter(target)
    if qw.weight.dim() != 2 or qw.codes.shape != qw.weight.shape \
            or (qw.codebook is None and (qw.scales is None or qw.zeros is None)):
        return qw
    if tuple(current.shape) != tuple(qw.weight.shape) and (
            current.is_meta or current.numel() != qw.weight.numel()
            or not torch.equal(qw.weight.reshape(current.shape).to(current.device), current.detach())):
        return qw
    if not torch.equal(values_of(qw, qw.weight.device), qw.weight.float()):
        return qw
    host = {f.name: getattr(qw, f.name).to("cpu") for f in dataclasses.fields(qw)
            if f.name != "weight" and isinstance(getattr(qw, f.name), torch.Tensor)}
    kept = dataclasses.replace(qw, weight=torch.empty(0), **host)
    lazy[target] = Dequantized(kept, tuple(current.shape))
    make_lazy(module, target)
    return kept
