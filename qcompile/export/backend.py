"""The ``torch.compile`` backend ``"qcompile"`` (registered through the ``torch_dynamo_backends`` entry point).

Dynamo hands a backend an fx graph of torch calls whose module state (parameters, buffers) arrives as
graph inputs, together with the real tensors. Two kinds of graph reach it:

- **already compiled**: the graph calls ``torch.ops.qcompile.*`` (a model read back by
  ``qcompile.artifact.load``, or its KV-cache decoder step): nothing is quantized again; the graph goes
  to Inductor with the INT4 ops staying calls of their kernels (Triton on CUDA, reference on CPU); with
  ``QCOMPILE_ACT_GEMV=1`` each unrotated per-token quantization is first folded into the A8/A4 linear
  reading it (``kernels/fold.py``: the same computation as one op); every other unrotated per-token
  quantization is written in torch ops with the op's exact arithmetic, so that Inductor fuses it into the
  kernel producing its input (``kernels/quant_inline.py``; compiled with IEEE float32 divisions); attention
  with a bool mask (the KV-cache step's) becomes ``decode_attention`` over the unrepeated cache
  (``kernels/attention_fold.py``); Inductor compiles it with ``INDUCTOR_SETTINGS`` (below);
- **a float causal LM** with ``options={"recipe": ...}``: the ``nn.Module`` the graph's weights belong to
  is found from Dynamo's sources for them, and at the first call it is captured by ``torch.export`` like
  any model, the recipe is planned and run (calibration from ``options["calibration"]`` ids or windows
  drawn with ``options["tokenizer"]``), its linears are lowered to the INT4 ops, and the result is
  compiled as an already-quantized graph (the rewrites and settings above); once per model and options.

What cannot be honoured is refused by name, never run in float: an unknown option, a recipe given for
a graph that is already quantized, a float graph with no recipe, graph inputs other than the token
ids (Hugging Face's own KV cache: generate with ``qcompile.api.decoder``'s cache instead), and
partial graphs from graph breaks (the matcher cannot find a whole model in them: use ``fullgraph=True``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompile.errors import QCompileError

_STATE = re.compile(r"\._(?:parameters|buffers)\[")


@dataclass(frozen=True)
class BackendOptions:
    """``torch.compile(..., backend="qcompile", options={...})``: the recipe and its overrides."""

    recipe: str | None = None
    w: int | None = None
    a: int | None = None
    kv: int | None = None
    group: int | None = None
    asym: bool = False
    calibration: torch.Tensor | None = None  # token ids [windows, seq]
    tokenizer: Any = None  # draws the recipe's calibration windows from WikiText-2 valid
    inductor: bool = True  # False: run the lowered graph as it is (for debugging)
    progress: bool = False

    @classmethod
    def from_dict(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise QCompileError(f"torch.compile backend qcompile: unknown option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(known))}")
        return cls(**options)

    def recipe_object(self):
        from qcompile.recipe import load_recipe

        return load_recipe(self.recipe).with_bits(w=self.w, a=self.a, kv=self.kv, group=self.group,
                                                   symmetric=False if self.asym else None)


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None else node.name


def _is_state(node: fx.Node) -> bool:
    return bool(_STATE.search(_source_name(node)))


def _calls_qcompile_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith("qcompile.") for n in gm.graph.nodes)


def _warm_up(gm: fx.GraphModule, example_inputs) -> None:
    """Run a CUDA graph once eagerly before compiling it: the INT4 ops make their derived weight layouts and
    autotuning choices on first use, and under CUDA-graph recording those allocations would land in the
    graph's pool untracked (on the H200: "Detected 34 tensor(s) in the cudagraph pool not tracked as
    outputs"; with this warm-up the W4A16, W4A8 and W4A4 decode steps of the 7B shape record and replay,
    ``benchmarks/results/decode-h200.md``). In-place cache writes it makes are overwritten before they are
    read (positions are written before attention reads them, and masked beyond)."""
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        with torch.no_grad():
            gm(*example_inputs)
        torch.cuda.synchronize()


def _inductor(gm: fx.GraphModule, example_inputs, mode: str | None, patches: dict | None = None):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={**_MODES[mode], **(patches or {})})


def _source_root(tx, source: str):
    """The object a Dynamo source such as ``L['args'][0]._modules['model']…`` starts from (``L['args'][0]``),
    looked up in the frame Dynamo is compiling."""
    root = source[:source.index("._")] if "._" in source else source
    obj = tx.f_locals
    for key in re.findall(r"\[([^\]]+)\]", root[1:]):
        obj = obj[int(key)] if key.isdigit() else obj[key.strip("'\"")]
    return obj


def _source_model(gm: fx.GraphModule) -> torch.nn.Module:
    """The ``nn.Module`` whose parameters the graph reads, found from the parameters' Dynamo sources in the
    frame being compiled (Dynamo's ``InstructionTranslator.current_tx``: internal, so checked)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    roots = {_source_name(n)[:_source_name(n).index("._")] for n in gm.graph.nodes
             if n.op == "placeholder" and _is_state(n)}
    if len(roots) != 1 or tx is None:
        raise QCompileError(f"torch.compile backend qcompile: the graph reads the state of {len(roots)} modules; "
                            "compile one causal LM with fullgraph=True")
    model = _source_root(tx, roots.pop())
    if not isinstance(model, torch.nn.Module):
        raise QCompileError(f"torch.compile backend qcompile: the graph's weights belong to a {type(model).__name__}, "
                            "not an nn.Module")
    return model


# Inductor settings for graphs of the qcompile ops. emulate_precision_casts keeps every bfloat16/float16 rounding
# eager makes inside a fused kernel (Inductor otherwise carries float32 between fused ops): an activation code is
# round(x / scale) of a bf16 x, so an x left unrounded flips codes that eager does not, and the flips grow layer by
# layer (a random 2-layer Llama-2-7B-shaped step on the CPU: W4A8 4.6e-2, W4A4 5.9e-1 relative without it, bit for
# bit with it; no cost measured on the H200: benchmarks/results/decode-backend-h200.md). For A/B timings:
# QCOMPILE_EAGER_NUMERICS=0 drops it; QCOMPILE_SPLIT_REDUCTIONS=0 makes SiLU·mul + quantization of a one-row FFN
# activation one kernel instead of Inductor's split reduction (slower on the H200: one program walks the row
# twice); QCOMPILE_COOPERATIVE_REDUCTIONS=1 forces Inductor's cooperative reductions (not yet measured).
INDUCTOR_SETTINGS = {"emulate_precision_casts": True}


def inductor_settings() -> dict:
    """``INDUCTOR_SETTINGS`` and the environment's changes to them (see above)."""
    settings = dict(INDUCTOR_SETTINGS)
    if os.environ.get("QCOMPILE_EAGER_NUMERICS") == "0":
        del settings["emulate_precision_casts"]
    if os.environ.get("QCOMPILE_SPLIT_REDUCTIONS") == "0":
        settings["split_reductions"] = False
    if os.environ.get("QCOMPILE_COOPERATIVE_REDUCTIONS") == "1":
        settings |= {"triton.cooperative_reductions": True, "triton.force_cooperative_reductions": True}
    return settings


_MODES = {  # torch.compile's mode → Inductor settings (what its own modes mean)
    None: {},
    "default": {},
    "reduce-overhead": {"triton.cudagraphs": True},
    "max-autotune": {"max_autotune": True, "triton.cudagraphs": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True},
}


def qcompile_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The backend function Dynamo calls (see the module docstring); ``mode`` is torch.compile's."""
    opts = BackendOptions.from_dict(options)
    if mode not in _MODES:
        raise QCompileError(f"torch.compile backend qcompile: unknown mode {mode!r}; known: "
                            f"{', '.join(m for m in _MODES if m)}")
    if _calls_qcompile_ops(gm):
        if opts.recipe is not None:
            raise QCompileError("torch.compile backend qcompile: this graph is already quantized (it calls "
                                "qcompile ops); compile it without a recipe")
        return _compile_quantized(gm, example_inputs, opts, mode)
    if opts.recipe is None:
        raise QCompileError("torch.compile backend qcompile: a float model needs options={'recipe': NAME, ...} "
                            "(or compile a model loaded from a qcompile quantize directory)")
    return _quantize_graph(gm, example_inputs, opts, mode)


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def _compile_quantized(gm: fx.GraphModule, example_inputs, opts: BackendOptions, mode: str | None):
    """A graph of the qcompile ops: its rewrites (module docstring), then Inductor with ``inductor_settings()``."""
    from qcompile.kernels import attention_fold, codes_route, fold, quant_inline

    if fold.enabled():  # A8/A4 linears quantize their own activation (one launch at one token)
        fold.fold_activation_quant(gm)
    patches = inductor_settings()
    if quant_inline.enabled() and opts.inductor and quant_inline.inline_activation_quant(gm):
        patches |= quant_inline.INDUCTOR_PATCHES  # fused into the kernel making x, bit for bit the op's codes
        if codes_route.enabled() and _on_cuda(example_inputs):  # one-token A8/A4 linears: the W4A16 GEMV on
            codes_route.route_codes_to_w4a16(gm)  # bf16(codes − zeros); its speed is the GPU GEMV's (the CPU
            # keeps the eager lowered model's sums, so that compiled = eager bit for bit there)
    if attention_fold.enabled():  # attention over the unrepeated cache, split along the keys
        attention_fold.fold_decode_attention(gm)
    if not opts.inductor:
        return gm.forward
    _warm_up(gm, example_inputs)
    return _inductor(gm, example_inputs, mode, patches)


_QUANTIZED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {options: lowered Program}


def _quantize_graph(gm: fx.GraphModule, example_inputs, opts: BackendOptions, mode: str | None):
    """Quantize the model the graph comes from (once per model and options; a recompile for new shapes
    reuses it) and return a callable with the graph's calling convention."""
    from qcompile import api
    from qcompile.passes.lower import lower

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if not _is_state(n) and isinstance(n.meta.get("example_value"), torch.Tensor)]
    if len(user) != 1:
        names = ", ".join(_source_name(n) for n in user)
        raise QCompileError(f"torch.compile backend qcompile: the graph takes tensor inputs {names}; only token ids "
                            "are supported (call the model with input_ids alone and use_cache=False; generate with "
                            "qcompile.api.decoder's KV cache)")
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if len(outputs) != 1:
        raise QCompileError(f"torch.compile backend qcompile: the graph returns {len(outputs)} values; only logits "
                            "are supported (use_cache=False)")
    model = _source_model(gm)
    key = repr(dataclasses.replace(opts, tokenizer=None, calibration=None, progress=False))
    ids_pos = placeholders.index(user[0])

    def compiled():
        # quantizing traces the model again (torch.export), which must not happen inside Dynamo's own
        # trace: done at the first call, once per model and options
        cache = _QUANTIZED.setdefault(model, {})
        if key not in cache:
            recipe = opts.recipe_object()
            program = api.compile(api.capture(model), recipe, opts.tokenizer, opts.progress,
                                  calibration=opts.calibration)
            lowered = lower(program) if recipe.quantizes else program
            run = (torch.compile(lowered.module, fullgraph=True, backend=lambda g, inputs: _compile_quantized(
                g, inputs, BackendOptions(), mode)) if opts.inductor else lowered.module)
            cache[key] = (lowered, run)
        return cache[key]

    def forward(*args):
        _, run = compiled()
        out = run(input_ids=args[ids_pos])
        return (out.logits if hasattr(out, "logits") else out[0],)

    forward.program = lambda: compiled()[0]
    return forward
