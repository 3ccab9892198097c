"""Quantize SmolLM2-135M with QuaRot + GPTQ at W4A8, save it, and score it on WikiText-2.

    python examples/quantize_eval.py out/smollm2-quarot-w4a8
"""

import sys

from qcompile import api
from qcompile.recipe import load_recipe

out = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-quarot-w4a8"
recipe = load_recipe("quarot+gptq").with_bits(a=8)  # W4 per-channel GPTQ, A8 per-token, R1-R4 Hadamards
saved = api.quantize_to("smollm2-135m", recipe, out)  # refuses an existing directory
for name, spec in (("FP", "smollm2-135m"), (recipe.name, str(saved))):
    result = api.evaluate(spec, windows=4, seq=2048)
    print(f"{name}: WikiText-2 ppl {result['ppl']:.3f} (first 4 windows of 2048)")
