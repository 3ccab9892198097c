"""qcompile: a quantizing compiler for causal language models.

The public API, in the style of ``torchao.quantize_(model, config)`` and llm-compressor's
``oneshot(model, recipe)``::

    import qcompile

    program = qcompile.quantize("smollm2-135m", "quarot+gptq", out="smollm2-w4a4")  # plan, passes, GPTQ, lower, save
    model = qcompile.load("smollm2-w4a4")
    qcompile.export_onnx("smollm2-w4a4", "smollm2-w4a4-onnx")
    qcompile.evaluate("smollm2-w4a4")["ppl"]
    qcompile.generate("smollm2-w4a4", "The capital of France is")

Every function imports its heavy modules (torch, transformers, onnx) when called, so ``import qcompile`` is
cheap. The lower-level steps are in ``qcompile.api`` (``compile`` without lowering, ``decoder``),
``qcompile.recipe`` and ``qcompile.passes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcompile.errors import QCompileError

if TYPE_CHECKING:  # for annotations only
    from pathlib import Path

    import torch

    from qcompile.artifact import LoadedModel
    from qcompile.decoding import Sampling
    from qcompile.program import Program
    from qcompile.recipe import Recipe

__version__ = "0.1.0"
__all__ = ["QCompileError", "__version__", "capture", "quantize", "save", "load", "export_onnx", "evaluate",
           "generate"]


def capture(model: "torch.nn.Module", example_ids: "torch.Tensor | None" = None) -> "Program":
    """A causal LM captured as a ``Program`` (fx graph + weights + ModelMap), ready for a recipe."""
    from qcompile import api

    return api.capture(model, example_ids)


def quantize(model: "str | torch.nn.Module | Program", recipe: "str | Recipe", *, tokenizer=None,
             calibration: "torch.Tensor | None" = None, out: "str | Path | None" = None, name: str | None = None,
             progress: bool = True) -> "Program":
    """Quantize a model with a recipe and return the lowered Program (INT4 ``torch.ops.qcompile`` ops).

    ``model`` is a model spec (``smollm2-135m``, ``tiny:llama``: its tokenizer comes with it), an
    ``nn.Module`` or a captured ``Program``; ``recipe`` a name, a ``+``-composition, a YAML path or a
    ``Recipe``. The recipe is planned against the model before anything slow runs. Calibration windows
    (GPTQ, LeanQuant, passes that read statistics) are ``calibration`` token ids ``[n, seq]`` when given,
    else drawn with ``tokenizer``. With ``out`` the result is also saved there (see ``save``); ``name``
    is the model spec recorded in it (default: the spec given, else the model's ``config.name_or_path``).
    """
    from qcompile import api
    from qcompile.passes.lower import lower
    from qcompile.pipeline import plan
    from qcompile.program import Program

    recipe = api.as_recipe(recipe)
    if isinstance(model, str):
        name = name or model
        model, own_tokenizer = api.load_model(model)
        tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if out is not None:  # refuse before the slow part
        config = getattr(model, "config", None)
        name = name or getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        if not name:
            raise QCompileError("quantize(out=...) records which model the result came from: give name= "
                                "(a model spec such as smollm2-135m)")
    program = model if isinstance(model, Program) else api.capture(model)
    lines = plan(program.model_map, recipe)
    lowered = lower(api.compile(program, recipe, tokenizer, progress, calibration))
    if out is not None:
        save(lowered, out, recipe, name, lines)
    return lowered


def save(program: "Program", out: "str | Path", recipe: "str | Recipe", model: str,
         plan: list[str] | None = None) -> "Path":
    """Save a lowered Program to a new directory (``.pt2`` graph, packed safetensors, recipe, manifest);
    ``model`` is the spec it came from (its tokenizer is loaded from it). See ``qcompile.artifact``."""
    from qcompile import api, artifact

    return artifact.save(program, out, api.as_recipe(recipe), model, plan)


def load(path: "str | Path") -> "LoadedModel":
    """A directory written by ``save``/``quantize``, checked against its manifest: ``.logits(ids)``,
    ``.decoder()`` (KV-cache generation), ``.module``, ``.recipe``, ``.manifest``."""
    from qcompile import artifact

    return artifact.load(path)


def export_onnx(source, out, force: bool = False, int8_path: str = "matmulnbits", accuracy_level: int | None = None):
    """Export a `qcompile quantize` directory (or a lowered Program) to an ONNX folder (``qcompile.export.onnx``)."""
    from qcompile.api import export_onnx as _export_onnx

    return _export_onnx(source, out, force=force, int8_path=int8_path, accuracy_level=accuracy_level)


def evaluate(model: "str | Path", recipe: "str | Recipe | None" = None, *, windows: int | None = 4,
             seq: int = 2048, fp: bool = False, progress: bool = True) -> dict:
    """WikiText-2 test perplexity (first ``windows`` windows of ``seq`` tokens; None: all) of a model spec
    (optionally compiled with ``recipe``; ``fp``: its passes with quantization off), a saved directory or an
    exported ONNX folder. Returns a dict with ``ppl``, the bit widths and timings."""
    from qcompile import api

    return api.evaluate(str(model), recipe, fp=fp, windows=windows, seq=seq, progress=progress)


def generate(model: "str | Path", prompt: str, *, recipe: "str | Recipe | None" = None, max_new_tokens: int = 32,
             sampling: "Sampling | None" = None, chat: bool = False, use_cache: bool = True,
             progress: bool = False) -> str:
    """The text a model continues ``prompt`` with: a model spec (optionally compiled with ``recipe``), a saved
    directory or an exported ONNX folder; greedy unless ``sampling`` (``qcompile.decoding.Sampling``) says
    otherwise; ``chat`` wraps the prompt in the tokenizer's chat template."""
    from qcompile import api
    from qcompile.decoding import Sampling

    decoder, tokenizer = api.decoder(str(model), recipe, use_cache=use_cache, progress=progress)
    return api.generate_text(decoder, tokenizer, prompt, max_new_tokens, sampling or Sampling(), chat, progress)
