"""The main job, end to end on SmolLM2-135M: quantize with a paper recipe, compare, export, generate.

    python examples/demo.py [--recipe quarot+gptq --a 8] [--windows 2] [--out out/demo]

1. quantize: QuaRot (norms folded, Hadamard R1/R2 fused, R3/R4 online) + GPTQ, W4A8 per-token, saved;
2. a perplexity table (WikiText-2 test, first N windows of 2048): FP, RTN at the same bits, the recipe;
3. the activation statistics before/after the recipe's rotations, with PNG plots;
4. ONNX export of the quantized model (MatMulNBits / MatMulInteger, online Hadamards, KV cache);
5. a sentence generated from the export by onnxruntime-genai.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from qcompile import api
from qcompile.analysis import plots, stats
from qcompile.export import export_onnx
from qcompile.export.runtime import genai_generate
from qcompile.models import SMOLLM2, load
from qcompile.recipe import load_recipe

PROMPT = "The capital of France is"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quarot+gptq")
    parser.add_argument("--a", type=int, default=8, help="activation bits (8 or 4)")
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows of 2048 tokens")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    recipe = load_recipe(args.recipe).with_bits(a=args.a).with_calibration(args.calib_samples, None)
    rtn = load_recipe("rtn").with_bits(a=args.a)
    bits = f"W{recipe.weights.bits}A{args.a}"

    print(f"\n== 1. quantize {SMOLLM2} with {recipe.name} ({bits}, {args.calib_samples} calibration windows)")
    t0 = time.time()
    saved = api.quantize_to(SMOLLM2, recipe, out / "quantized")
    print(f"saved {saved} in {time.time() - t0:.0f} s")

    print(f"\n== 2. WikiText-2 test perplexity, first {args.windows} windows of 2048 tokens")
    rows = [("FP", api.evaluate(SMOLLM2, windows=args.windows)),
            (f"RTN {bits}", api.evaluate(SMOLLM2, rtn, windows=args.windows)),
            (f"{recipe.name} {bits}", api.evaluate(str(saved), windows=args.windows))]
    print("\n| model | ppl | × FP |\n|---|---|---|")
    fp = rows[0][1]["ppl"]
    for name, r in rows:
        print(f"| {name} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f} |")

    print(f"\n== 3. activations at the quantized linears' inputs, before/after {recipe.name}'s transforms")
    model, tokenizer = load(SMOLLM2)
    program = api.capture(model)
    compared = stats.compare(program, recipe.without_quantization(), tokenizer, 2, 512,
                             seed=recipe.calibration.seed + 1, keep_tokens=512, progress=True)
    compared.plots = plots.write(compared, SMOLLM2, [compared.largest(), "0:down"], str(out / "plots"))
    for line in compared.lines()[:6]:
        print(line)
    print(f"plots: {', '.join(compared.plots)}")

    print("\n== 4. ONNX export")
    onnx_dir = export_onnx(saved, out / "onnx")
    size = sum(f.stat().st_size for f in onnx_dir.iterdir()) / 2**20
    print(f"exported {onnx_dir} ({size:.0f} MiB)")

    print("\n== 5. generate with onnxruntime-genai from the export")
    ids = tokenizer(PROMPT).input_ids
    new = genai_generate(onnx_dir, ids, 24)
    print(f"{PROMPT}{tokenizer.decode(new, skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
