"""The public entry points: capture a model, compile it with a recipe, evaluate it, generate text."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from qcompile import artifact, models
from qcompile.errors import QCompileError
from qcompile.eval import data
from qcompile.eval.perplexity import perplexity
from qcompile.decoding import CachedDecoder, Decoder, Recompute, Sampling, generate
from qcompile.passes.kv_cache import CacheLayout, add_kv_cache
from qcompile.passes.lower import lower
from qcompile.passes.weights import computed_on
from qcompile.passes.quantize import quantize as _quantize
from qcompile.pipeline import needs_calibration, plan, run_passes
from qcompile.program import Program
from qcompile.recipe import Recipe, load_recipe


def capture(model: torch.nn.Module, example_ids: torch.Tensor | None = None) -> Program:
    """Capture a causal LM as a Program (fx graph + weights + ModelMap)."""
    return Program.capture(model, example_ids)


def load_model(spec: str, tokenizer: str | None = None):
    """(model, tokenizer) for a model spec; ``tiny:ARCH`` gives a small random model without tokenizer; an
    ONNX decoder file (``MODEL.onnx``, not one qcompile wrote) gives a Program over it and the tokenizer of
    ``tokenizer`` (a model spec or folder), else of the file's folder, else of its ``qcompile.model`` metadata."""
    if is_onnx_source(spec):
        return Program.from_onnx(spec), onnx_tokenizer(spec, tokenizer)
    if spec.startswith("tiny:"):
        return models.tiny(spec.split(":", 1)[1]), None
    return models.load(spec)


def program_of(spec: str, tokenizer: str | None = None, lazy: bool | None = False) -> tuple[Program, object]:
    """(Program, tokenizer) of a model spec: captured from PyTorch, or read from an ONNX decoder file. ``lazy``
    (a safetensors checkpoint folder only): build the model on the meta device and leave the blocks' weights in
    the shards until their block runs (``qcompile.lazy``); None: lazy when the float32 model would take more
    than half the available host memory (``lazy.should_be_lazy``)."""
    from qcompile import lazy as lazy_loading

    if lazy_loading.should_be_lazy(spec, lazy):
        return lazy_loading.load_program(spec)
    model, tok = load_model(spec, tokenizer)
    return (model if isinstance(model, Program) else capture(model)), tok


def tokenizer_of_spec(spec: str):
    """The tokenizer of a model spec: a checkpoint folder's own files when it has them (without loading its
    weights: the model may be larger than host memory), else the model's (``load_model``)."""
    if Path(str(spec)).is_dir():
        from qcompile.export.runtime import tokenizer_of

        tok = tokenizer_of(spec)
        if tok is not None:
            return tok
    return load_model(spec)[1]


def is_onnx_source(spec) -> bool:
    """Whether ``spec`` is an ``.onnx`` file to quantize (not a file or folder ``qcompile`` wrote)."""
    p = Path(str(spec))
    if p.suffix != ".onnx" or p.is_dir():
        return False
    if not p.is_file():
        return True  # Program.from_onnx names the missing file
    from qcompile.export.onnx import META_MODEL

    try:
        import onnx

        meta = {m.key for m in onnx.load(str(p), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - unreadable: Program.from_onnx says why, naming the file
        return True
    return META_MODEL not in meta


def onnx_tokenizer(path, spec: str | None = None):
    """The tokenizer for an ONNX source file (see ``load_model``), or None."""
    from qcompile.export.onnx import META_MODEL
    from qcompile.export.runtime import tokenizer_of

    if spec:
        tok = tokenizer_of(spec) if Path(spec).is_dir() else None
        return tok if tok is not None else load_model(spec)[1]
    tok = tokenizer_of(Path(path).parent)
    if tok is not None:
        return tok
    import onnx

    meta = {m.key: m.value for m in onnx.load(str(path), load_external_data=False).metadata_props}
    return load_model(meta[META_MODEL])[1] if META_MODEL in meta else None


def as_recipe(recipe: str | Recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def calibration_windows(tokenizer, recipe: Recipe) -> torch.Tensor:
    c = recipe.calibration
    return data.calibration_windows(data.token_ids(tokenizer, data.VALID), c.samples, c.seq, c.seed)


def compile(program: Program, recipe: str | Recipe, tokenizer=None, progress: bool = True,
            calibration: torch.Tensor | None = None, device: str | torch.device | None = None) -> Program:
    """Plan the recipe (refusing early), run its passes, then quantize as it says. Calibration windows are
    ``calibration`` (token ids ``[n, seq]``) when given, else drawn as the recipe says with ``tokenizer``.
    The passes run where the Program's weights are (``program.to(...)`` first to run them elsewhere); with
    ``device``, the passes' weight updates are computed there one weight at a time (``weights.computed_on``) and
    GPTQ/LeanQuant run block by block there, while the weights stay where they are.

    A Program with lazy weights (``qcompile.lazy``) runs GPTQ/LeanQuant block by block (on ``device``, else the
    host); a recipe with passes before quantization is refused on it, naming the pass: they rewrite every weight,
    which would bring the whole float32 model into host memory (copy on write, 4 bytes a parameter), what lazy
    loading is there to avoid."""
    recipe = as_recipe(recipe)
    plan(program.model_map, recipe)
    if program.lazy:
        check_lazy(recipe)
        device = device if device is not None else program.device
    calib = None
    if needs_calibration(recipe):
        if calibration is not None:
            calib = calibration
        elif tokenizer is None:
            raise QCompileError(f"recipe {recipe.name} needs calibration windows: give a tokenizer or token ids")
        else:
            calib = calibration_windows(tokenizer, recipe)
    with computed_on(device):  # the passes' weight algebra one weight at a time there, the Program staying put
        program = run_passes(program, recipe, calib, progress)
    if not recipe.quantizes:
        return program
    if not (recipe.weights and recipe.weights.method != "rtn"):
        calib = None
    return _quantize(program, recipe, calib, progress=progress, device=device)


def check_lazy(recipe: Recipe) -> None:
    """Refuse a recipe whose passes rewrite the weights before quantization, on a Program with lazy weights."""
    if recipe.passes:
        name = recipe.passes[0][0]
        raise QCompileError(
            f"recipe {recipe.name}: pass {name} rewrites every weight of the model before quantization; with the "
            "weights left in the checkpoint's shards (lazy loading) that would copy the whole float32 model into "
            "host memory (4 bytes a parameter). Lazy loading runs weight quantization alone (gptq, leanquant, rtn); "
            "load the model eagerly (--no-lazy) for this recipe")


def quantize_to(spec: str, recipe: str | Recipe, out: str, progress: bool = True, tokenizer: str | None = None,
                force: bool = False, lazy: bool | None = False) -> Path:
    """Compile a model with a recipe, lower it to INT4 ops and save it (see ``qcompile.artifact``); an ONNX
    source is written as an ONNX folder (``export.onnx_program``). ``lazy``: see ``program_of`` (the recipe is
    checked before the model is read)."""
    from qcompile.lazy import should_be_lazy

    recipe = as_recipe(recipe)
    lazy = should_be_lazy(spec, lazy)
    if lazy:
        check_lazy(recipe)
    program, tok = program_of(spec, tokenizer, lazy=lazy)
    lines = plan(program.model_map, recipe)
    if program.ir == "onnx":
        from qcompile.export.onnx_program import save_onnx_program

        if Path(out).exists() and not force:  # refuse before the slow part
            raise QCompileError(f"{out} already exists; choose a new folder or pass --force to replace it")
        lowered = lower(compile(program, recipe, tok, progress))
        return save_onnx_program(lowered, out, recipe, str(spec), tok, force=force)
    return artifact.save(lower(compile(program, recipe, tok, progress)), out, recipe, spec, lines)


def evaluate(spec: str, recipe: str | Recipe | None = None, fp: bool = False, windows: int | None = 4,
             seq: int = 2048, progress: bool = True, tokenizer: str | None = None, lazy: bool | None = False) -> dict:
    """WikiText-2 test perplexity of a model (a spec or a saved directory), optionally compiled with a
    recipe (``fp``: the recipe's passes with quantization off); ``lazy``: see ``program_of``."""
    start = time.time()
    t0 = time.time()
    if artifact.is_artifact(spec):
        loaded = artifact.load(spec)
        r, logits_fn = loaded.recipe, loaded.logits
        tokenizer = tokenizer_of_spec(loaded.manifest["model"])
    elif _is_onnx(spec) and not is_onnx_source(spec):
        om, tokenizer = _onnx_model(spec)
        r, logits_fn = om.recipe(), om.logits
    else:
        program, tokenizer = program_of(spec, tokenizer, lazy=lazy)
        r = as_recipe(recipe) if recipe else Recipe(name="fp")
        if fp:
            r = r.without_quantization()
        logits_fn = compile(program, r, tokenizer, progress).logits
    if tokenizer is None:
        raise QCompileError(f"{spec} has no tokenizer; perplexity needs a real model")
    compile_seconds = time.time() - t0
    ids = data.eval_windows(data.token_ids(tokenizer, data.TEST), seq, windows)
    ppl = perplexity(logits_fn, ids, progress)
    return {
        "model": spec,
        "recipe": r.name,
        "wbits": r.weights.bits if r.weights else 16,
        "abits": r.activations.bits if r.activations else 16,
        "kvbits": r.kv.bits if r.kv else 16,
        "group": r.weights.group_size if r.weights else None,
        "method": r.weights.method if r.weights else None,
        "windows": ids.shape[0],
        "seq": seq,
        "ppl": ppl,
        "compile_seconds": round(compile_seconds, 1),
        "seconds": round(time.time() - start, 1),
    }


def decoder(spec: str, recipe: str | Recipe | None = None, use_cache: bool = True, progress: bool = True):
    """(decoder, tokenizer) for generating from a model spec (optionally compiled with a recipe) or a saved
    directory; ``use_cache=False`` recomputes the whole sequence at every step (the reference)."""
    if artifact.is_artifact(spec):
        loaded = artifact.load(spec)
        tokenizer = tokenizer_of_spec(loaded.manifest["model"])
        return (loaded.decoder() if use_cache else Recompute(loaded.logits)), tokenizer
    if _is_onnx(spec) and not is_onnx_source(spec):
        om, tokenizer = _onnx_model(spec)
        return (om if use_cache and om.cached else Recompute(om.logits)), tokenizer
    model, tokenizer = load_model(spec)
    program = capture(model)
    if recipe is not None:
        program = compile(program, recipe, tokenizer, progress)
        if as_recipe(recipe).quantizes:
            program = lower(program)
    if not use_cache:
        return Recompute(program.logits), tokenizer
    return CachedDecoder(add_kv_cache(program).module, CacheLayout.of(program.model_map)), tokenizer


def generate_text(decoder: Decoder, tokenizer, prompt: str, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
                  chat: bool = False, progress: bool = False) -> str:
    """The text a decoder continues ``prompt`` with (``chat``: wrapped in the tokenizer's chat template)."""
    if tokenizer is None:
        raise QCompileError("this model has no tokenizer; generate from token ids with qcompile.decoding.generate")
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = generate(decoder, ids, max_new_tokens, tokenizer.eos_token_id, sampling, progress)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _is_onnx(spec: str) -> bool:
    from qcompile.export.onnx import is_onnx_folder

    return is_onnx_folder(spec) or str(spec).endswith(".onnx")


def _onnx_model(spec: str):
    """(``export.runtime.OrtModel``, tokenizer) of an exported ONNX folder."""
    from qcompile.export.runtime import OrtModel, tokenizer_of

    om = OrtModel(spec)
    tokenizer = tokenizer_of(om.path if om.path.is_dir() else om.path.parent)
    if tokenizer is None and not om.model.startswith("tiny:"):
        _, tokenizer = load_model(om.model)
    return om, tokenizer


def export_onnx(source, out: str | Path, force: bool = False, int8_path: str = "matmulnbits",
                accuracy_level: int | None = None) -> Path:
    """Export a saved directory (or a lowered Program) to an ONNX folder; see ``qcompile.export.onnx``."""
    from qcompile.export.onnx import export_onnx as _export_onnx

    return _export_onnx(source, out, force=force, int8_path=int8_path, accuracy_level=accuracy_level)
