"""Lazy loading: a Program over a local safetensors checkpoint whose block weights stay in its shards.

For models larger than host memory (a 70B in float32 is 280 GB). The model is built on the meta device
(``accelerate.init_empty_weights``: parameters have shapes and dtypes but no memory; buffers such as RoPE's
``inv_freq`` are computed as usual) and captured as any model is (``torch.export`` sees the real shapes and the
compute dtype, float32). Its parameters are then bound by name to the checkpoint's tensors:

- the weights of the blocks' linears (≥ 95 % of a Llama's bytes) stay meta in the module and are read from the
  memory-mapped shards, as stored (bf16/fp16/fp32), when their block runs (``Program.lazy``, see
  ``graph.lazy_weights``): the page cache holds them, shared and reclaimable;
- the rest (embedding, norms, biases, lm_head) is read into host memory in float32 at load.

Tied weights stay tied (the capture gives one parameter every name; one of those names in the checkpoint binds it).
A parameter no name of which the checkpoint holds, a checkpoint tensor no parameter reads (apart from the
model class's ``_keys_to_ignore_on_load_unexpected``), a shape or dtype that does not fit: refused by name
(``CheckpointError``) before anything is read. A linear stored transposed (GPT-2's Conv1D) is refused: lazy
weights are read as stored, ``[out, in]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qcompile.graph.lazy_weights import Checkpoint, CheckpointError, Stored, keep_as_codes, make_lazy, put_param
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


def _ignored(model, key: str) -> bool:
    return any(re.search(p, key) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())


def bind(program: Program, checkpoint: Checkpoint, model=None) -> Program:
    """Bind the captured ``program``'s meta parameters to ``checkpoint`` (see the module docstring); in place."""
    gm = program.module
    mm = program.model_map
    lazy_targets = {lin.weight for n, lin in mm.linears.items() if n != mm.lm_head}
    plan, used, problems = {}, set(), []
    for target, param in gm.named_parameters():
        if not param.is_meta:
            continue
        names = program.aliases.get(target, [target])
        keys = [n for n in names if n in checkpoint]
        if not keys:
            problems.append(f"missing tensor {' / '.join(names)}")
            continue
        key = keys[0]
        used.update(keys)
        shape, dtype = checkpoint.shape(key), checkpoint.dtype(key)
        if shape != tuple(param.shape):
            transposed = " (stored transposed: lazy loading reads [out, in] linears only)" \
                if shape == tuple(param.shape)[::-1] else ""
            problems.append(f"{key} in {checkpoint.shard_of[key]} has shape {list(shape)}, the model expects "
                            f"{list(param.shape)}{transposed}")
        elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            problems.append(f"{key} in {checkpoint.shard_of[key]} is stored as {dtype}, not a float type")
        else:
            plan[target] = key
    extra = [k for k in checkpoint.keys() if k not in used and not (model is not None and _ignored(model, k))]
    problems += [f"unexpected tensor {k} in {checkpoint.shard_of[k]}" for k in extra]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{checkpoint.folder} does not fit its config's model: " + "; ".join(problems[:8])
                              + more)
    for target, key in plan.items():
        if target in lazy_targets:
            program.lazy[target] = Stored(checkpoint, key)
            make_lazy(gm, target)
        else:
            put_param(gm, target, checkpoint.tensor(key).to(torch.float32, copy=True))
    return program


def load_program(folder: str | Path) -> tuple[Program, object]:
    """(Program with lazy block weights, tokenizer or None) of a local safetensors checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"lazy loading reads a local checkpoint folder; {folder} is not one")
    checkpoint = Checkpoint(folder)  # the shards first: a bad one is named before any model is built
    model = meta_model(folder)
    program = bind(Program.capture(model), checkpoint, model)
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


def should_be_lazy(spec: str) -> bool:
    """``--lazy auto``: a safetensors checkpoint folder whose float32 model takes more than half the available host
    memory (an eager load holds the float32 model and the compile's copy of it: twice its size)."""
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
