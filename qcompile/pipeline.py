"""Plan a recipe against a ModelMap, then run it on a Program.

``plan`` is cheap and complete: it decides every site (which Hadamard fits each size, which groups are
partial, which rewrites are provable) and raises the refusal a pass would raise, so nothing slow starts
on a recipe that cannot finish.
"""

from __future__ import annotations

import gc
from collections import Counter

from qcompile.analysis.modelmap import ModelMap
from qcompile.errors import RecipeError, UnsafeRewriteError
from qcompile.graph.onnx_genai import check_recipe
from qcompile.passes.registry import PASSES
from qcompile.program import Program
from qcompile.quant.formats import num_groups
from qcompile.recipe import Recipe, quantized_linears


def describe_model(mm: ModelMap) -> str:
    if not mm.blocks or mm.blocks[0].attention is None or mm.blocks[0].ffn is None:
        return (f"hidden {mm.hidden}, {len(mm.blocks)} blocks, {len(mm.linears)} linears "
                f"({len(mm.gaps())} sites not matched)")
    a, f = mm.blocks[0].attention, mm.blocks[0].ffn
    return (f"hidden {mm.hidden}, {len(mm.blocks)} blocks, {a.n_heads} heads / {a.n_kv_heads} kv heads × {a.head_dim}"
            f"{' with RoPE' if a.rope else ''}{', QK-norm' if a.qk_norm else ''}, {f.kind} {f.act} FFN "
            f"{mm.linears[f.down].in_features}{f' × {f.experts} experts' if f.experts else ''}, "
            f"{mm.final_norm.kind} norms{', tied embeddings' if mm.tied else ''}")


def _plan_quantization(mm: ModelMap, recipe: Recipe) -> list[str]:
    lines = []
    targets = quantized_linears(mm, recipe)
    if recipe.weights:
        w = recipe.weights
        lines.append(f"weights: {w.method} W{w.bits} {'sym' if w.symmetric else 'asym'} "
                     f"{'g' + str(w.group_size) if w.group_size else 'per-channel'} on {len(targets)} linears "
                     f"(lm_head {'quantized' if w.include_lm_head else 'in float'})")
        if w.group_size:
            for k, count in sorted(Counter(mm.linears[n].in_features for n in targets).items()):
                g = num_groups(k, w.group_size)
                last = k - (g - 1) * w.group_size
                partial = f", last group partial ({last} columns)" if last != w.group_size else ""
                lines.append(f"  K={k}: {g} groups of {w.group_size}{partial} ×{count} linears")
        if w.method != "rtn":
            c = recipe.calibration
            lines.append(f"calibration: {c.samples} windows × {c.seq} tokens of wikitext2_valid, seed {c.seed}")
    if recipe.activations:
        a = recipe.activations
        lines.append(f"activations: A{a.bits} per-token {'sym' if a.symmetric else 'asym'} clip {a.clip_ratio} "
                     f"on {len(targets)} linear inputs")
    if recipe.kv:
        kv = recipe.kv
        lines.append(f"kv: KV{kv.bits} per (token, head) {'sym' if kv.symmetric else 'asym'} clip {kv.clip_ratio} "
                     f"on {len(mm.blocks)} × (K, V)")
    return lines


def plan(mm: ModelMap, recipe: Recipe) -> list[str]:
    """The plan, one line per decision; raises the refusal that running the recipe would raise."""
    lines = [f"model: {describe_model(mm)}", f"recipe: {recipe.name}"]
    lines += [f"not matched: {site}: {reason}" for site, reason in mm.gaps()]
    for name, options in recipe.pass_options():
        check_layout(mm, name)
        lines += [f"{name}: {line}" for line in PASSES[name].plan(mm, options)]
    check_recipe(mm, recipe)
    lines += _plan_quantization(mm, recipe) or ["quantization: off"]
    if any(takes_calibration(n) for n, _ in recipe.passes) and not (recipe.weights and recipe.weights.method != "rtn"):
        c = recipe.calibration
        lines.append(f"calibration (passes): {c.samples} windows × {c.seq} tokens of wikitext2_valid, seed {c.seed}")
    return lines


def check_layout(mm: ModelMap, name: str) -> None:
    """Refuse a pass that supports only sequential pre-norm blocks on a map with any other layout."""
    if PASSES[name].per_site or mm.complete:
        return
    why = mm.gaps()[0] if mm.gaps() else next(
        ((f"block {b.index}", "parallel attention and FFN" if b.parallel else "post-norms" if b.post_norms else
          "a shared expert" if b.ffn and b.ffn.shared else "linears reading the stream without a norm")
         for b in mm.blocks), ("blocks", "none"))
    raise UnsafeRewriteError(f"{name} supports sequential pre-norm blocks with matched attention and FFN only; "
                             f"{why[0]}: {why[1]}")


def takes_calibration(name: str) -> bool:
    """Whether pass ``name`` reads calibration windows (the pipeline gives them to its run)."""
    return PASSES[name].calibration


def needs_calibration(recipe: Recipe) -> bool:
    """Whether running the recipe needs calibration windows (a pass that reads them, or GPTQ/LeanQuant)."""
    return any(takes_calibration(n) for n, _ in recipe.passes) or bool(
        recipe.weights and recipe.weights.method != "rtn")


def run_passes(program: Program, recipe: Recipe, calibration=None, progress: bool = True) -> Program:
    """The recipe's equivalence-preserving passes, in order, after planning them.

    Passes that read calibration windows (smooth, shift_scale, duquant, spinquant) get the recipe's
    ``[n, seq]`` token windows, and those with a progress bar get ``progress``: the pipeline supplies
    both, a recipe cannot set them.
    """
    plan(program.model_map, recipe)
    for name, options in recipe.pass_options():
        spec, run = PASSES[name], {}
        if spec.calibration:
            if calibration is None:
                raise RecipeError(f"pass {name} needs calibration windows (give a tokenizer, or pass them)")
            run["calibration"] = calibration
        if spec.progress:
            run["progress"] = progress
        program = spec.run(program, options, **run)
        gc.collect()  # the Program the pass replaced (a 7B's is 26 GB) sits in reference cycles until collected
    return program
