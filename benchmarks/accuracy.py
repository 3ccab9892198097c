"""Accuracy of every recipe on SmolLM2-135M: WikiText-2 test perplexity, first 4 and first 8 windows of 2048.

    python benchmarks/accuracy.py [--rows PATTERN] [--calib-samples 32] [--fresh]
    python benchmarks/accuracy.py --gpu --model /root/m/smollm2.gguf --results $OUT   # on the lent H200

Loads and captures the model once, then compiles each row's recipe from the captured Program and
evaluates it; the 4-window figure is the peers' protocol, the 8-window one a check on its noise. Rows
are cached in ``results/accuracy-smollm2.json`` (so a long run can resume; ``--fresh`` starts over)
and the Markdown table is rewritten after every row, with the command, machine and date.

``--gpu`` runs ``GPU_ROWS`` instead: the recipes at their papers' settings (each recipe's own calibration:
128 × 2048 windows for GPTQ, DuQuant's 256 greedy steps, SpinQuant's 100 Cayley steps of 8 × 2048), the
Program on the GPU for the passes and GPTQ block by block there; they are cached in
``accuracy-smollm2-h200.json`` and shown as a second table of ``accuracy-smollm2.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qcompile.api as qc  # noqa: E402
from qcompile.eval import data  # noqa: E402
from qcompile.eval.perplexity import ppl_of, window_losses  # noqa: E402
from qcompile.pipeline import needs_calibration  # noqa: E402
from qcompile.recipe import Recipe, load_recipe  # noqa: E402

FP_PPL = 24.145  # the task's reference figure for FP on 4 × 2048
RESULTS = Path(__file__).parent / "results"

# spinquant on the 2-core CPU: 20 Cayley steps of 2 × 512 tokens (the paper: 100 of 8 × 2048), KV in float
SPIN_CPU = {"spinquant.steps": 20, "spinquant.batch": 2, "spinquant.seq": 512}
W4A4_G64 = {"kv": 16, "group": 64, "symmetric": False}
# OS+'s quantizers (W4 asym with clip search, A4 asym), to compare SmoothQuant's migration on equal terms
OSPLUS_QUANT = {"w": 4, "a": 4, "weights.symmetric": False, "weights.clip_search": True,
                "activations.symmetric": False}

# (setting, recipe spec, overrides): with_bits keys (w, a, kv, group, symmetric), "<pass>.<option>",
# "weights.|activations.<field>", and a bare key is a weight-quantizer field (act_order, ...)
ROWS = [  # most decisive first: a long run can be cut short and still answer the targets
    ("FP", "fp", {}),
    ("W4A16 per-channel", "rtn", {}),
    ("W4A16 g128", "gptq", {"group": 128, "symmetric": False}),
    ("W4A16 g128", "quarot+gptq", {"group": 128, "a": 16, "kv": 16, "symmetric": False}),
    ("W4A16 g128", "gptq", {"group": 128, "symmetric": False, "act_order": True, "static_groups": True}),
    ("W4A16 g64", "gptq", {"group": 64, "symmetric": False}),
    ("W4A4", "quarot+gptq", {"kv": 16}),
    ("W4A16 g64", "quarot+gptq", {"group": 64, "a": 16, "kv": 16, "symmetric": False}),
    ("W4A4 g64", "quarot+gptq", {"kv": 16, "group": 64, "symmetric": False}),
    ("W4A8", "quarot+gptq", {"a": 8, "kv": 16}),
    # issue 5: each transform at W4A4 with its paper's quantizers, then chained with GPTQ at g64
    ("W4A4", "quarot", {"kv": 16}),
    *[("W4A4", "quarot", {"kv": 16, "rotate.seed": s}) for s in (1, 2, 3)],
    ("W4A4", "quarot", {"kv": 16, "weights.symmetric": False, "activations.symmetric": False}),  # duquant's quantizers
    ("W4A4", "smoothquant", {"w": 4, "a": 4}),
    ("W4A4", "smoothquant", OSPLUS_QUANT),
    ("W4A4", "osplus", {}),
    ("W4A4", "osplus", {"shift_scale.shift": False}),
    ("W4A4", "duquant", {"kv": 16}),
    ("W4A4", "duquant-fused", {"kv": 16}),
    ("W4A4", "spinquant", {"kv": 16, "spinquant.kv_bits": 16, **SPIN_CPU}),
    ("W4A4", "spinquant", {"kv": 16, "spinquant.kv_bits": 16, **SPIN_CPU, "spinquant.steps": 0}),  # its start
    ("W4A4KV4", "duquant", {}),
    ("W4A4 g64", "duquant+gptq", W4A4_G64),
    ("W4A4KV4 g64", "duquant+gptq", {"group": 64, "symmetric": False}),
    ("W4A4 g64", "spinquant-w16+gptq", {**W4A4_G64, "spinquant.kv_bits": 16, **SPIN_CPU}),
    ("W4A4 g64", "osplus+duquant+gptq", W4A4_G64),
    ("W4A4 g64", "quarot+gptq", {**W4A4_G64, "activations.symmetric": False}),
    ("W4A4 g64", "quarot+gptq", {**W4A4_G64, "activations.symmetric": False, "act_order": True,
                                 "static_groups": True}),
    ("W4A16 g128", "leanquant", {"group": 128}),
    ("W4A4KV4", "quarot+gptq", {}),
    ("W4A16 g128", "rtn", {"group": 128, "symmetric": False}),
    ("W4A16 g64", "leanquant", {"group": 64}),
    ("W4A4", "quarot+leanquant", {"kv": 16}),
    ("W4A16 g64", "rtn", {"group": 64, "symmetric": False}),
    ("W4A16 g128", "gptq", {"group": 128}),
    ("W4A16 g128", "rtn", {"group": 128}),
    ("W4A16 per-channel", "gptq", {}),
    ("W4A16 per-row codebook", "leanquant-nu", {}),
    ("W4A8", "quarot", {"a": 8, "kv": 16}),
    ("W4A8", "quarot+leanquant", {"a": 8, "kv": 16}),
    ("W4A4KV4", "quarot", {}),
    ("W4A4KV4", "quarot+leanquant", {}),
]


# the papers' settings on one GPU (issue 13); calibration as each recipe says
GPU_ROWS = [
    ("W4A4KV4", "quarot+gptq", {}),
    ("W4A16 g128", "quarot+gptq", {"group": 128, "a": 16, "kv": 16, "symmetric": False}),
    ("W4A4KV4", "duquant+gptq", {"symmetric": False}),  # DuQuant's W4 per-channel asymmetric, then GPTQ
    ("W4A4KV4", "spinquant", {}),
]
GPU_NAME = "accuracy-smollm2-h200"


def row_key(setting: str, spec: str, overrides: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{setting} | {spec}" + (f" | {extra}" if extra else "")


BIT_KEYS = ("w", "a", "kv", "group", "symmetric")


def build_recipe(spec: str, overrides: dict, calib_samples: int | None, calib_seq: int | None) -> Recipe:
    """The recipe with bit-width overrides and any other weight-quantizer field (act_order, ...); its own
    calibration when ``calib_samples`` is None."""
    recipe = Recipe(name="fp") if spec == "fp" else load_recipe(spec)
    recipe = recipe.with_bits(**{k: v for k, v in overrides.items() if k in BIT_KEYS})
    sections, passes = {}, {n: dict(p) for n, p in recipe.passes}
    for key, value in overrides.items():
        if key in BIT_KEYS:
            continue
        part, _, field = key.rpartition(".")
        if part in passes:
            passes[part][field] = value
        else:
            sections.setdefault(part or "weights", {})[field] = value
    changes = {s: dataclasses.replace(getattr(recipe, s), **f) for s, f in sections.items()}
    recipe = dataclasses.replace(recipe, passes=tuple(passes.items()), **changes)  # re-validated
    return recipe if calib_samples is None else recipe.with_calibration(calib_samples, calib_seq)


def describe(recipe: Recipe, overrides: dict) -> str:
    w = recipe.weights
    if w is None:
        return "float"
    parts = [f"{w.method} W{w.bits} {'sym' if w.symmetric else 'asym'} "
             f"{'g' + str(w.group_size) if w.group_size else 'per-channel'}"
             + (" act-order" if w.act_order else "")]
    if recipe.activations:
        a = recipe.activations
        parts.append(f"A{a.bits} {'sym' if a.symmetric else 'asym'} per-token clip {a.clip_ratio}")
    if recipe.kv:
        parts.append(f"KV{recipe.kv.bits} {'sym' if recipe.kv.symmetric else 'asym'} clip {recipe.kv.clip_ratio}")
    if recipe.passes:
        parts.append("+".join(n for n, _ in recipe.passes))
    parts += [f"{k}={v}" for k, v in sorted(overrides.items()) if "." in k and k.split(".")[0] in dict(recipe.passes)]
    if needs_calibration(recipe):
        parts.append(f"calib {recipe.calibration.samples}×{recipe.calibration.seq}")
    return "; ".join(parts)


def machine(device: str = "cpu") -> str:
    host = f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (host {host})"
    return host


def row_line(r: dict, fp: float | None) -> str:
    ratio = f"{r['ppl4'] / fp:.3f}" if fp else "-"
    return (f"| {r['setting']} | {r['recipe']} | {r['details']} | {r['ppl4']:.3f} | {r['ppl8']:.3f} | "
            f"{ratio} | {r['seconds']:.0f} |")


def gpu_section(path: Path, fp: float | None) -> list[str]:
    """The GPU rows (``--gpu``) as a table of their own, with the command, machine and date they came from."""
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    if not rows:
        return []
    first = next(iter(rows.values()))
    return [
        "",
        "## The papers' settings on one GPU",
        "",
        f"- command: `{first['command']}` (the model and data carried to the lent machine)",
        f"- machine: {first['machine']}",
        f"- date: {first['date']}",
        "- each recipe's own calibration: 128 × 2048 windows for GPTQ, DuQuant's 256 greedy steps, SpinQuant's",
        "  100 Cayley steps of 8 × 2048 tokens; passes with the Program on the GPU, GPTQ block by block there",
        "  (linears that share an input as one stack, CUDA-graph column loop); × FP against the CPU FP row;",
        "  quant time: wall time of passes, calibration and quantization on the GPU (load and capture excluded).",
        "",
        "- peak GPU memory per row: " + ", ".join(f"{r['recipe']} {r['setting']} {r['peak_gpu_gib']} GiB"
                                                  for r in rows.values()),
        *([f"- not run yet: {', '.join(missing)}"] if (missing := [row_key(*r) for r in GPU_ROWS
                                                                  if row_key(*r) not in rows]) else []),
        "",
        "| setting | recipe | details | ppl 4×2048 | ppl 8×2048 | × FP (4) | quant time (s) |",
        "|---|---|---|---|---|---|---|",
        *[row_line(r, fp) for r in rows.values()],
    ]


def write_table(rows: dict, command: str, path: Path) -> None:
    lines = [
        "# Accuracy on SmolLM2-135M-Instruct (WikiText-2 test perplexity)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        "- protocol: whole test text tokenized once, non-overlapping windows of 2048 tokens from the start;",
        "  ppl = exp(mean window loss); lm_head and embeddings in float. Calibration: wikitext2_valid windows.",
        "- quant time: wall time of the recipe (passes, calibration, quantization) on this machine, while other",
        "  jobs (test suites, other benchmarks) shared its 2 cores: an upper bound, not an idle-machine figure.",
        "- caveat: the weights come from a Q4_1 GGUF (groups of 32, ≤ 16 distinct values each); group-32",
        "  asymmetric results would look lossless and are never reported here.",
        "",
        "| setting | recipe | details | ppl 4×2048 | ppl 8×2048 | × FP (4) | quant time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    fp = next((r["ppl4"] for r in rows.values() if r["recipe"] == "fp"), None)
    lines += [row_line(r, fp) for r in rows.values()]
    lines += gpu_section(path.parent / f"{GPU_NAME}.json", fp)
    path.write_text("\n".join(lines) + "\n")


def run_gpu(args, command: str) -> None:
    """``GPU_ROWS`` on ``args.device``: the Program there for the passes, GPTQ block by block there; each row is
    written to ``<results>/accuracy-smollm2-h200.json`` as it finishes, and a row that fails is reported and
    skipped (the others still run)."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    cache_path = results / f"{GPU_NAME}.json"
    rows = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    todo = [r for r in GPU_ROWS if fnmatch.fnmatch(row_key(*r), args.rows) and row_key(*r) not in rows]
    if not todo:
        return
    dev = torch.device(args.device)
    model, tokenizer = qc.load_model(args.model)
    program = qc.capture(model).to(dev)
    windows = data.eval_windows(data.token_ids(tokenizer, data.TEST), 2048, args.windows)

    for setting, spec, overrides in todo:
        recipe = build_recipe(spec, overrides, None, None)
        torch.cuda.synchronize()
        start = time.time()
        try:
            compiled = qc.compile(program, recipe, tokenizer, progress=False, device=dev)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (one failing row is reported; the others still run)
            print(f"{row_key(setting, spec, overrides)}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            torch.cuda.empty_cache()
            continue
        seconds = time.time() - start
        with torch.no_grad():
            losses = window_losses(lambda ids: compiled.logits(ids.to(dev)).cpu(), windows, progress=False)
        rows[row_key(setting, spec, overrides)] = {
            "setting": setting, "recipe": spec, "details": describe(recipe, overrides), "ppl4": ppl_of(losses[:4]),
            "ppl8": ppl_of(losses), "seconds": seconds, "losses": losses, "machine": machine(args.device),
            "date": datetime.date.today().isoformat(), "command": command,
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        }
        cache_path.write_text(json.dumps(rows, indent=1))
        print(f"{row_key(setting, spec, overrides)}: ppl4 {rows[row_key(setting, spec, overrides)]['ppl4']:.3f} "
              f"({seconds:.0f} s, peak {rows[row_key(setting, spec, overrides)]['peak_gpu_gib']} GiB)", flush=True)
        del compiled
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="*", help="glob over row keys, e.g. 'W4A16 g128*'")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument("--name", default="accuracy-smollm2")
    parser.add_argument("--gpu", action="store_true", help="the papers' settings (GPU_ROWS) on --device")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m", help="model spec or .gguf file")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the --gpu rows' JSON")
    args = parser.parse_args()
    # the table's command is the one that regenerates all of it: a --rows filter only selects what runs now
    kept = [a for i, a in enumerate(sys.argv[1:]) if a != "--rows" and (i == 0 or sys.argv[i] != "--rows")]
    command = " ".join(["python benchmarks/accuracy.py", *kept])
    if args.gpu:
        run_gpu(args, command)
        return
    RESULTS.mkdir(exist_ok=True)
    cache_path, table_path = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.md"
    rows = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())

    for r in ROWS:  # cached rows are described by today's code
        if row_key(*r) in rows:
            rows[row_key(*r)]["details"] = describe(build_recipe(r[1], r[2], args.calib_samples, args.calib_seq), r[2])
    todo = [r for r in ROWS if fnmatch.fnmatch(row_key(*r), args.rows) and row_key(*r) not in rows]
    if todo:
        model, tokenizer = qc.load_model(args.model)
        program = qc.capture(model)
        windows = data.eval_windows(data.token_ids(tokenizer, data.TEST), 2048, args.windows)
    for setting, spec, overrides in todo:
        recipe = build_recipe(spec, overrides, args.calib_samples, args.calib_seq)
        start = time.time()
        compiled = qc.compile(program, recipe, tokenizer)
        seconds = time.time() - start
        losses = window_losses(compiled.logits, windows)
        rows[row_key(setting, spec, overrides)] = {
            "setting": setting, "recipe": spec, "details": describe(recipe, overrides), "ppl4": ppl_of(losses[:4]),
            "ppl8": ppl_of(losses), "seconds": seconds, "losses": losses,
        }
        cache_path.write_text(json.dumps(rows, indent=1))
        write_table(rows, command, table_path)
        print(f"{row_key(setting, spec, overrides)}: ppl4 {rows[row_key(setting, spec, overrides)]['ppl4']:.3f} "
              f"({seconds:.0f} s)", flush=True)
    write_table(rows, command, table_path)
    print(table_path.read_text())


if __name__ == "__main__":
    main()
