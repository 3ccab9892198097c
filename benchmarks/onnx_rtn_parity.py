"""The same RTN recipes from fx and from ONNX on SmolLM2: the control for ``gptq_parity.py``.

RTN has no error feedback, so float32 rounding differences between torch and onnxruntime can move only the
codes that sit on a rounding boundary, with nothing to carry them on: the two IRs should agree far closer
than GPTQ's ±1 %. SmoothQuant's calibration maxima come from onnxruntime on the ONNX side.

    python benchmarks/onnx_rtn_parity.py --onnx smollm2.onnx [--out benchmarks/results/onnx-in-cpu.md]
"""

from __future__ import annotations

import argparse
import time

import torch

from gptq_parity import provenance, publish  # noqa: E402  (benchmarks/ is the script's folder)
from qcompile.api import evaluate
from qcompile.recipe import load_recipe

RECIPES = (("smoothquant", dict(w=8, a=8, kv=16)), ("quarot", dict(w=4, a=8, kv=16, group=128)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, bits in RECIPES:
        recipe = load_recipe(name).with_bits(**bits).with_calibration(4, 2048)
        ppl = {}
        for label, spec in (("fx", "smollm2-135m"), ("onnx", args.onnx)):
            t = time.time()
            ppl[label] = evaluate(spec, recipe, progress=False)["ppl"]
            print(name, label, ppl[label], round(time.time() - t), "s", flush=True)
        gap = 100 * abs(ppl["onnx"] - ppl["fx"]) / ppl["fx"]
        w = f"W{bits['w']}A{bits['a']}" + (f" g{bits['group']}" if bits.get("group") else "")
        rows.append(f"| {name} RTN {w} | {ppl['fx']:.4f} | {ppl['onnx']:.4f} | {gap:.2f} % |")
    publish("\n".join([
        "## RTN control: the same recipes from fx and from ONNX, no GPTQ", "",
        f"{provenance()}; 4 calibration windows of 2048 (SmoothQuant's maxima), ppl on the first 4 WikiText-2 test "
        "windows of 2048.", "", "| recipe | fx | ONNX in | apart |", "|---|---|---|---|", *rows]) + "\n", args.out)


if __name__ == "__main__":
    main()
