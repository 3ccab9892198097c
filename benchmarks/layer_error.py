"""Layer output error of RTN, GPTQ and LeanQuant on SmolLM2's own activations (4 and 3 bits).

    python benchmarks/layer_error.py

For a few q_proj and down_proj layers, the inputs X are recorded on calibration windows of
wikitext2_valid, H = 2XᵀX/n, and each quantizer's mean squared output error ‖X(W − Ŵ)ᵀ‖² is compared
on the same grid (asymmetric, g128, act-order for GPTQ and LeanQuant). Writes
``results/layer-error-smollm2.md`` with the command, machine and date.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompile.eval.data import VALID, calibration_windows, token_ids  # noqa: E402
from qcompile.models import load  # noqa: E402
from qcompile.passes.calibrate import collect  # noqa: E402
from qcompile.program import Program  # noqa: E402
from qcompile.quant.formats import Granularity, QuantSpec  # noqa: E402
from qcompile.quant.gptq import HessianAccumulator, gptq_quantize  # noqa: E402
from qcompile.quant.leanquant import leanquant_quantize  # noqa: E402
from qcompile.quant.rtn import rtn_quantize  # noqa: E402

LAYERS = (3, 15, 27)


def main() -> None:
    model, tok = load("smollm2-135m")
    p = Program.capture(model)
    mm = p.model_map
    nodes = {}
    for i in LAYERS:
        nodes[mm.blocks[i].ffn.down] = f"layer {i} down_proj"
        nodes[mm.blocks[i].attention.q.linear] = f"layer {i} q_proj"
    windows = calibration_windows(token_ids(tok, VALID), 4, 512, seed=0)
    stats = collect(p, windows, {n: 0 for n in nodes}, keep_tokens=2048, progress=False)
    rows = []
    for n, label in nodes.items():
        x = stats[n].kept()
        acc = HessianAccumulator(x.shape[1], name=label)
        acc.add(x)
        H = acc.hessian()
        W = p.weight(mm.linears[n].weight).detach().float()
        for bits in (4, 3):
            spec = QuantSpec(bits, False, Granularity.GROUP, 128)

            def err(q):
                return (x @ (W - q.weight).T).pow(2).mean().item()

            r = err(rtn_quantize(W, spec, clip_search=False))
            g = err(gptq_quantize(W, H, spec, act_order=True, static_groups=True))
            lq = err(leanquant_quantize(W, H, spec, act_order=True))
            rows.append(f"| {label} | W{bits} asym g128 | {r:.4g} | {g:.4g} | {lq:.4g} | {lq / g:.3f} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# Layer output error on SmolLM2-135M activations",
        "",
        "- command: `python benchmarks/layer_error.py`",
        f"- machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}",
        f"- date: {datetime.date.today().isoformat()}",
        "- inputs: 2048 tokens recorded from 4 × 512-token wikitext2_valid windows (seed 0); error = mean of",
        "  ‖X(W − Ŵ)ᵀ‖² over tokens and outputs; GPTQ and LeanQuant both with act-order (static groups).",
        "",
        "| layer | grid | RTN (min/max) | GPTQ | LeanQuant (affine, p=4) | LeanQuant / GPTQ |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    out = Path(__file__).parent / "results" / "layer-error-smollm2.md"
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
