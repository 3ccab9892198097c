"""Routed experts' layer error after W4 quantization: RTN, GPTQ on one pooled Hessian, GPTQ per expert.

For every routed expert weight of the tiny MoE families (float model, Hessians from ``passes.experts``) each
expert e is quantized by RTN (clip search), by GPTQ against the Hessian of *all* routed rows of the layer
(pooled, what one Hessian per stacked weight gives), and by GPTQ against H_e (its own routed rows). The error is
Σ_e ‖X_e W_eᵀ − X_e Ŵ_eᵀ‖² = Σ_e n_e/2·tr(Δ_e H_e Δ_eᵀ), summed over every expert weight, on the calibration
tokens and on held-out windows, relative to RTN's.

    PYTHONPATH=. python benchmarks/expert_hessians.py [--md benchmarks/results/expert-hessians-tiny.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import torch

from qcompile.models import tiny
from qcompile.passes import experts as moe
from qcompile.program import Program
from qcompile.quant.gptq import gptq_quantize
from qcompile.quant.rtn import rtn_quantize
from qcompile.recipe import load_recipe

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def _errors(p: Program, cal: torch.Tensor, held: torch.Tensor) -> dict[str, tuple[float, float]]:
    wq = load_recipe("gptq").weights
    hc, hh = moe.expert_hessians(p, cal), moe.expert_hessians(p, held)
    tot = {"rtn": [0.0, 0.0], "gptq pooled H": [0.0, 0.0], "gptq per-expert H_e": [0.0, 0.0]}
    for node, h in hc.items():
        w = p.weight(h.lin.weight).detach().float()
        experts = range(w.shape[0])
        pooled = sum(h.hessian(e) * h.tokens[e] for e in experts if h.tokens[e]) / sum(h.tokens)
        for e in experts:
            own = h.hessian(e)
            q = {"rtn": rtn_quantize(w[e], wq.spec, clip_search=True).weight,
                 "gptq pooled H": gptq_quantize(w[e], pooled, wq.spec, mse=True).weight,
                 "gptq per-expert H_e": gptq_quantize(w[e], own, wq.spec, mse=True).weight if own is not None
                 else rtn_quantize(w[e], wq.spec, clip_search=True).weight}
            for k, qe in q.items():
                d = (qe - w[e]).double()
                for i, hs in enumerate((h, hh[node])):
                    if hs.tokens[e]:
                        tot[k][i] += hs.tokens[e] / 2 * torch.trace(d @ hs.hessian(e).double() @ d.T).item()
    return {k: (v[0] / tot["rtn"][0], v[1] / tot["rtn"][1]) for k, v in tot.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    held = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(7))
    lines = [f"# Routed experts: per-expert vs pooled Hessians ({datetime.date.today()})", "",
             "`PYTHONPATH=. python benchmarks/expert_hessians.py`; "
             f"{platform.machine()}, torch {torch.__version__}; tiny random MoE configs of `qcompile.models`, W4 "
             "per-channel symmetric, GPTQ with the clip search; layer error Σ_e ‖X_e(W_e − Ŵ_e)ᵀ‖² over every "
             "routed expert weight relative to RTN's (lower is better), on the calibration tokens / on 8 × 64 "
             "held-out tokens.", "",
             "| family | calibration tokens | gptq pooled H | gptq per-expert H_e |", "|---|---|---|---|"]
    for arch in FAMILIES:
        p = Program.capture(tiny(arch))
        for n in (8, 64):
            cal = torch.randint(0, 256, (n, 64), generator=torch.Generator().manual_seed(2))
            r = _errors(p, cal, held)
            lines.append(f"| {arch} | {n * 64} | " + " | ".join(
                f"{r[k][0]:.3f} / {r[k][1]:.3f}" for k in ("gptq pooled H", "gptq per-expert H_e")) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
