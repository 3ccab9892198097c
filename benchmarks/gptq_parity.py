"""Why the same GPTQ recipe gives a different perplexity from an fx capture and from an ONNX file.

Two measurements, written as one table:

1. **Block 0, fx against ONNX.** After the recipe's passes the two Programs hold the same weights (to float
   rounding); the input of block 0's q/k/v is computed by torch (fx) and by onnxruntime (ONNX) on the same
   calibration windows, and GPTQ quantizes q_proj's weight (the fx one, both times) against each Hessian.
   The Hessians differ only at float32 rounding; the codes they give differ where a rounding decision sat
   on a boundary.
2. **Depth, fx against fx.** The whole model quantized twice on the fx Program by two computations that are
   equal in exact arithmetic: the whole graph over all windows at once (``quantize``'s reference path) and
   block by block, one window at a time (``device="cpu", batch=1``: the ONNX runner's schedule). Codes that
   differ per block, and the two perplexities: the spread GPTQ on these windows shows when nothing but
   float summation order changes.

    python benchmarks/gptq_parity.py --onnx /tmp/smol/smollm2.onnx [--a 8] [--out benchmarks/results/...md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch
from torch import fx

from qcompile.api import calibration_windows
from qcompile.eval import data
from qcompile.eval.perplexity import perplexity
from qcompile.graph.onnx_run import segments
from qcompile.models import load
from qcompile.passes.quantize import _quantize_weight, quantize
from qcompile.pipeline import run_passes
from qcompile.program import Program
from qcompile.recipe import load_recipe


class _Capture(fx.Interpreter):
    """Runs the graph until node ``stop`` and returns the value of its operand 0."""

    def __init__(self, module, stop: str):
        super().__init__(module, garbage_collect_values=False)
        self.stop = stop

    def run_node(self, n):
        if n.name == self.stop:
            raise _Found(self.env[n.args[0]])
        return super().run_node(n)


class _Found(Exception):
    def __init__(self, value):
        self.value = value


def fx_input(p: Program, node: str, windows: torch.Tensor) -> torch.Tensor:
    try:
        _Capture(p.module, node).run(windows)
    except _Found as f:
        return f.value
    raise RuntimeError(f"node {node} not reached")


def onnx_input(p: Program, node: str, windows: torch.Tensor) -> torch.Tensor:
    seg = segments(p.graph, p.model_map)[0]
    x = p.graph.value(p.graph.opgraph().operand(node, 0))
    return torch.cat([torch.from_numpy(seg.run([x], w[None].numpy().astype("int64"), None)[0]) for w in windows])


def hessian(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).double()
    return (2 * rows.T @ rows / rows.shape[0]).float()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def block0(fx_p: Program, onnx_p: Program, recipe, calib) -> list[str]:
    node_fx = fx_p.model_map.blocks[0].attention.q.linear
    node_on = onnx_p.model_map.blocks[0].attention.q.linear
    lin = fx_p.model_map.linears[node_fx]
    x_fx, x_on = fx_input(fx_p, node_fx, calib), onnx_input(onnx_p, node_on, calib)
    h_fx, h_on = hessian(x_fx), hessian(x_on)
    w = fx_p.weight(lin.weight).detach().float()
    w_on = onnx_p.weight(onnx_p.model_map.linears[node_on].weight).detach().float()
    w_on = w_on.movedim((onnx_p.model_map.linears[node_on].out_axis, onnx_p.model_map.linears[node_on].in_axis),
                        (0, 1))
    q_fx = _quantize_weight(w, h_fx, recipe.weights, lin.weight)
    q_on = _quantize_weight(w, h_on, recipe.weights, lin.weight)
    # a perturbation of H at the size of float32 rounding, fx alone
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(h_fx.shape, generator=g) * 1e-7 * h_fx.abs()
    q_eps = _quantize_weight(w, h_fx + (noise + noise.T) / 2, recipe.weights, lin.weight)
    flips = lambda a, b: float((a.codes != b.codes).float().mean())  # noqa: E731
    return [
        f"| block 0 q input, ‖x_onnx − x_fx‖/‖x_fx‖ | {rel(x_on, x_fx):.2e} |",
        f"| block 0 Hessian, ‖H_onnx − H_fx‖/‖H_fx‖ | {rel(h_on, h_fx):.2e} |",
        f"| block 0 q weight after the passes, ‖W_onnx − W_fx‖/‖W_fx‖ | {rel(w_on, w):.2e} |",
        f"| q_proj codes that differ, GPTQ on H_onnx vs H_fx | {100 * flips(q_on, q_fx):.3f} % |",
        f"| q_proj codes that differ, GPTQ on H_fx·(1 + 1e-7 noise) vs H_fx | {100 * flips(q_eps, q_fx):.3f} % |",
    ]


def depth(fx_p: Program, recipe, calib, tok, onnx_p: Program | None = None) -> list[str]:
    out, ppl = {}, {}
    ids = data.eval_windows(data.token_ids(tok, data.TEST), 2048, 4)
    runs = [("fx, whole graph, 4 windows at once", fx_p, {}),
            ("fx, block by block, 1 window at a time", fx_p, dict(device="cpu", batch=1))]
    if onnx_p is not None:
        runs.append(("ONNX in, onnxruntime block by block (fake-quantized graph)", onnx_p, {}))
    for label, p, kw in runs:
        t = time.time()
        q = quantize(p, recipe, calib, progress=False, **kw)
        out[label] = q.quantized
        ppl[label] = perplexity(q.logits, ids, False)
        print(label, ppl[label], round(time.time() - t), "s", flush=True)
    a, b = list(out.values())[:2]
    lines = [f"| ppl, {k} | {v:.4f} |" for k, v in ppl.items()]
    fx_ppl = list(ppl.values())[:2]
    lines.append(f"| fx vs fx ppl spread | {100 * (max(fx_ppl) - min(fx_ppl)) / min(fx_ppl):.2f} % |")
    blocks = fx_p.model_map.blocks
    for i in sorted({0, 1, 2, len(blocks) // 2, len(blocks) - 1}):
        names = [fx_p.model_map.linears[n].weight for n in fx_p.model_map.linears
                 if fx_p.model_map.linears[n].weight in a and _block_of(fx_p, n) == i]
        diff = sum(int((a[n].codes != b[n].codes).sum()) for n in names)
        total = sum(a[n].codes.numel() for n in names)
        lines.append(f"| block {i}: codes that differ, fx whole vs fx block by block | {100 * diff / total:.3f} % |")
    return lines


def _block_of(p: Program, node: str) -> int | None:
    """The block whose attention or FFN linear ``node`` is (None: the lm_head)."""
    for b in p.model_map.blocks:
        a, f = b.attention, b.ffn
        if node in {a.q.linear, a.k.linear, a.v.linear, a.o, f.gate.linear, f.up.linear, f.down}:
            return b.index
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--a", type=int, default=16)
    ap.add_argument("--out")
    ap.add_argument("--skip-depth", action="store_true")
    ap.add_argument("--onnx-depth", action="store_true", help="also quantize the ONNX Program and score it")
    args = ap.parse_args()
    torch.set_num_threads(2)
    recipe = load_recipe("quarot+gptq").with_bits(w=4, a=args.a, kv=16, group=128).with_calibration(4, 2048)
    model, tok = load("smollm2-135m")
    calib = calibration_windows(tok, recipe)
    fx_p = run_passes(Program.capture(model), recipe, calib, progress=False)
    onnx_p = run_passes(Program.from_onnx(args.onnx), recipe, calib, progress=False)
    lines = block0(fx_p, onnx_p, recipe, calib) if args.a >= 16 else []  # A16: q's input is the norm output
    print("\n".join(lines), flush=True)
    if not args.skip_depth:
        lines += depth(fx_p, recipe, calib, tok, onnx_p if args.onnx_depth else None)
    head = [f"## SmolLM2-135M quarot+gptq W4A{args.a} g128, 4 calibration windows of 2048: fx vs ONNX, fx vs fx",
            "", provenance(), "", "| measurement | value |", "|---|---|"]
    publish("\n".join(head + lines) + "\n", args.out)


def provenance() -> str:
    """The command, machine, thread count and time a table was measured with."""
    return (f"`{' '.join(['python', *sys.argv])}` on {platform.node()} ({torch.get_num_threads()} threads), "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")


def publish(text: str, out: str | None) -> None:
    """Print a results section and append it to ``out``."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
