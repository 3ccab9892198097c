"""Lazy loading: a Program over a local safetensors checkpoint whose block weights stay in its shards.

For models larger than host memory (a 70B in float32 is 280 GB). The model is built on the meta device
(``accelerate.init_empty_weights``: parameters have shapes and dtypes but no memory; buffers such as RoPE's
``inv_freq`` are computed as usual), its parameters given four-byte CPU placeholders (``placeheld``) and captured
as any model is (``torch.export`` sees the real shapes, the compute dtype, float32, and the CPU's code paths).
Its parameters are then bound by name to the checkpoint's tensors, as transformers stores them:

- a parameter is read from the tensors transformers saves it as (``stored_as``: its weight conversion reversed)
  and built from them as ``from_pretrained`` builds it (``source_of``: the conversion itself). Mostly one
  tensor of the same name; transformers 5's MoE experts, held stacked ``[E, 2·I, H]`` / ``[E, H, I]``, are
  stored one tensor per expert and projection and stacked and concatenated when read (``Converted``);
- the weights of the blocks' linears, experts included (≥ 95 % of a Llama's bytes), stay meta in the module
  and are read from the memory-mapped shards, as stored (bf16/fp16/fp32), when their block runs
  (``Program.lazy``, see ``graph.lazy_weights``): the page cache holds them, shared and reclaimable;
- the rest (embedding, norms, biases, lm_head, persistent buffers the checkpoint holds) is read into host
  memory at load (parameters in float32).

Tied weights stay tied (the capture gives one parameter every name; one of those names in the checkpoint binds it).
A parameter the checkpoint lacks (naming the stored tensor missing: one expert's), a checkpoint tensor no
parameter reads (apart from the model class's ``_keys_to_ignore_on_load_unexpected``), a shape or dtype that
does not fit: refused by name (``CheckpointError``) before anything is read. A linear stored transposed (GPT-2's
Conv1D) is refused: lazy weights are read as stored, ``[out, in]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qcompile.graph.lazy_weights import (
    Checkpoint,
    CheckpointError,
    Converted,
    Stored,
    keep_as_codes,
    make_lazy,
    put_param,
)
from qcompile.passes.blockwise import put_attr
from qcompile.program import Program

__all__ = ["Checkpoint", "CheckpointError", "keep_codes", "load_program", "read_all", "should_be_lazy"]


def meta_model(folder: str | Path):
    """The checkpoint's causal LM with its parameters on the meta device (float32, tied as its config says)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qcompile.models import _offline, attention_for

    _offline()
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the config of {folder}: {e}") from None
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention_for(config))
    model.tie_weights()
    return model.eval()


def placeheld(model):
    """``model`` with each meta parameter replaced by a placeholder: one CPU element seen in the parameter's shape
    (stride 0, four bytes). ``torch.export`` then traces the CPU's code paths, which a meta model does not take:
    transformers' MoE experts pick ``histc``'s input dtype by the device (float32 on the CPU, int32 elsewhere,
    which the CPU's ``histc`` refuses). Tied parameters stay one. In place; returns ``model``."""
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            put_param(model, name, torch.zeros((), dtype=param.dtype).expand(param.shape))
    return model


def _ignored(model, key: str) -> bool:
    return any(re.search(p, key) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())


def stored_as(model, name: str, param: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: shape} of the tensors transformers saves ``model``'s parameter ``name`` as: the model's
    weight conversion reversed (``revert_weight_conversion``, what ``save_pretrained`` writes), run on a meta
    tensor. ``{name: shape}`` where the model has no conversion; one key per expert and projection for MoE
    experts held stacked (transformers 5)."""
    from transformers.core_model_loading import revert_weight_conversion

    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
    return {k: tuple(t.shape) for k, t in revert_weight_conversion(model, {name: meta}).items()}


def source_of(model, conversion, checkpoint: Checkpoint, name: str, keys) -> Stored | Converted:
    """How parameter ``name`` is read from the checkpoint tensors ``keys`` (its ``stored_as``): as one tensor, or
    built by the converter that ``conversion`` (the model's ``get_model_conversion_mapping``, what
    ``from_pretrained`` applies) renames the keys to ``name`` with."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [c for c in conversion if isinstance(c, WeightRenaming)]
    converters = [c for c in conversion if isinstance(c, WeightConverter)]
    by_pattern = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters)
        if renamed != name:
            raise CheckpointError(f"transformers' conversion of {type(model).__name__} reads {key} into {renamed}, "
                                  f"not into {name} which it saves as {key}: lazy loading cannot bind it")
        by_pattern.setdefault(pattern, []).append(key)
    if None in by_pattern:
        (key,) = by_pattern[None]
        return Stored(checkpoint, key)
    converter = {p: c for c in converters for p in c.source_patterns}[next(iter(by_pattern))]
    sources = tuple((p, tuple(sorted(by_pattern[p], key=dot_natural_key)))
                    for p in converter.source_patterns if p in by_pattern)
    return Converted(checkpoint, converter, name, sources)


def _misfits(checkpoint: Checkpoint, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """What does not fit among the checkpoint tensors ``expected`` ({key: the shape the model expects})."""
    out = []
    for key, shape in expected.items():
        got, dtype = checkpoint.shape(key), checkpoint.dtype(key)
        if got != shape:
            transposed = " (stored transposed: lazy loading reads [out, in] linears only)" if got == shape[::-1] else ""
            out.append(f"{key} in {checkpoint.shard_of[key]} has shape {list(got)}, the model expects {list(shape)}"
                       f"{transposed}")
        elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            out.append(f"{key} in {checkpoint.shard_of[key]} is stored as {dtype}, not a float type")
    return out


def _missing(checkpoint: Checkpoint, names: list[str], stored: dict) -> str:
    """The problem of a parameter (every name of it: ``names``; stored as ``stored``) the checkpoint lacks."""
    if list(stored) == names[:1]:
        return f"missing tensor {' / '.join(names)}"
    missing = [k for k in stored if k not in checkpoint]
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    return f"missing tensor {', '.join(missing[:4])}{more} (stored form of {names[0]})"


def bind(program: Program, checkpoint: Checkpoint, model) -> Program:
    """Bind the captured ``program``'s parameters (``placeheld``) and the persistent buffers the checkpoint holds
    to ``checkpoint``, ``model`` being its model (see the module docstring); in place."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    gm = program.module
    mm = program.model_map
    lazy_targets = {lin.weight for n, lin in mm.linears.items() if n != mm.lm_head}
    conversion = get_model_conversion_mapping(model, add_legacy=False)
    plan, used, problems = {}, set(), []
    for target, param in gm.named_parameters():
        names = program.aliases.get(target, [target])
        stored = {n: stored_as(model, n, param) for n in names}
        name = next((n for n in names if all(k in checkpoint for k in stored[n])), None)
        if name is None:
            problems.append(_missing(checkpoint, names, stored[names[0]]))
            continue
        used.update(stored[name])
        bad = _misfits(checkpoint, stored[name])
        problems += bad
        if not bad:
            plan[target] = source_of(model, conversion, checkpoint, name, stored[name])
    buffers = [t for t, _ in gm.named_buffers() if t in checkpoint]  # persistent ones (DeepSeek's router bias)
    used.update(buffers)
    problems += _misfits(checkpoint, {t: tuple(gm.get_buffer(t).shape) for t in buffers})
    extra = [k for k in checkpoint.keys() if k not in used and not _ignored(model, k)]
    problems += [f"unexpected tensor {k} in {checkpoint.shard_of[k]}" for k in extra]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{checkpoint.folder} does not fit its config's model: " + "; ".join(problems[:8])
                              + more)
    for target, source in plan.items():
        if target in lazy_targets:
            program.lazy[target] = source
            make_lazy(gm, target)
        else:
            put_param(gm, target, source.materialize("cpu"))
    for target in buffers:
        put_attr(gm, target, checkpoint.tensor(target).to(gm.get_buffer(target).dtype, copy=True))
    return program


def load_program(folder: str | Path) -> tuple[Program, object]:
    """(Program with lazy block weights, tokenizer or None) of a local safetensors checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"lazy loading reads a local checkpoint folder; {folder} is not one")
    checkpoint = Checkpoint(folder)  # the shards first: a bad one is named before any model is built
    model = meta_model(folder)
    program = bind(Program.capture(placeheld(model)), checkpoint, model)
    return program, _tokenizer(folder)


def _tokenizer(folder: Path):
    """The folder's tokenizer; None when it holds no tokenizer files (calibration then needs token ids)."""
    from transformers import AutoTokenizer

    from qcompile.errors import ModelNotFoundError

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the tokenizer of {folder}: {e}") from e


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), or 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def should_be_lazy(spec: str, lazy: bool | None = None) -> bool:
    """Whether model ``spec`` is loaded lazily: as ``lazy`` says; None (``--lazy auto``): a safetensors checkpoint
    folder whose float32 model takes more than half the available host memory (an eager load holds the float32
    model and the compile's copy of it: twice its size)."""
    if lazy is not None:
        return bool(lazy)
    folder = Path(str(spec))
    if not folder.is_dir() or not ((folder / "model.safetensors").is_file()
                                   or (folder / "model.safetensors.index.json").is_file()):
        return False
    avail = available_bytes()
    return bool(avail) and 2 * Checkpoint(folder).float32_bytes() > avail


def keep_codes(program: Program, names) -> int:
    """Make the quantized weights ``names`` that hold their dequantized values in host memory lazy again, kept as
    their codes (``lazy_weights.keep_as_codes``): after a quantizer that is not block by block (RTN) stored them.
    Returns how many were kept as codes."""
    kept = 0
    for name in names:
        qw = program.quantized.get(name)
        if qw is None or name in program.lazy or not program.graph.has_weight(name) \
                or not torch.equal(program.weight(name).detach(), qw.weight.reshape(program.weight(name).shape)):
            continue
        program.quantized[name] = keep_as_codes(program.lazy, program.module, name, qw)
        kept += name in program.lazy
    return kept


def read_all(program: Program) -> Program:
    """Every lazy weight the graph still reads, read into host memory (float32), in place; entries for weights the
    graph dropped (a lowered linear's float weight) removed. For ``torch.export``, which traces real tensors."""
    for name in list(program.lazy):
        if program.is_lazy(name):
            program.set_weight(name, program.weight(name))
        program.lazy.pop(name, None)
    return program
