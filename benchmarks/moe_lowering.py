"""Lowered routed experts on CPU: one grouped INT4 op vs one INT4 op per expert (and the float grouped matmul).

The rows of ``x [S, K]`` are sorted by expert and ``offs`` holds the cumulative rows per expert (transformers'
grouped_mm). Variants, each on the same random routing of T tokens to top-k of E experts:

- float grouped_mm: transformers' fallback on the dequantized float weight (what the fake-quantized graph runs);
- grouped op: ``qcompile.grouped_linear_w4a16`` (one graph node; one int4 linear per expert that has rows);
- per expert, sliced: one ``linear_w4a16`` node per expert on ``x[offs[e−1]:offs[e]]`` (the slice bounds are
  data-dependent, so the graph needs E dynamic slices and a scatter back);
- per expert, masked: one ``linear_w4a16`` per expert on all S rows, rows kept by a mask (static shapes; E× the
  work).

    PYTHONPATH=. python benchmarks/moe_lowering.py [--threads 1] [--md benchmarks/results/moe-lowering-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from qcompile.kernels import ops
from qcompile.quant.formats import Granularity, QuantSpec
from qcompile.quant.rtn import rtn_quantize

SHAPES = [  # (E, top-k, K, N): Qwen2-MoE-like gate_up and down at a reduced width, Mixtral-like 8×top-2
    (8, 2, 1024, 1408),
    (8, 2, 704, 1024),
    (60, 4, 1024, 1408),
]
TOKENS = [1, 16, 256]


def _weights(E, K, N, g=128):
    spec = QuantSpec(4, True, Granularity.GROUP, g)
    w = torch.randn(E * N, K) * 0.02
    packed = rtn_quantize(w, spec, clip_search=False).pack()
    return (packed.packed.reshape(E, N, -1), packed.scales.reshape(E, N, -1), None, g,
            packed.dequantize(torch.float32).reshape(E, N, K))


def _routing(T, E, k, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.reshape(-1)
    ids, perm = torch.sort(idx)
    x = torch.randn(T, K, generator=g)[perm // k]
    offs = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)
    return x, offs


def _float_grouped(x, offs, dense):
    out = x.new_zeros(x.shape[0], dense.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], dense[e].T, out=out[start:end])
        start = end
    return out


def _per_expert_sliced(x, offs, packed, scales, zeros, g):
    out = x.new_zeros(x.shape[0], packed.shape[1])
    bounds = [0] + offs.tolist()
    for e in range(packed.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            out[a:b] = ops.linear_w4a16(x[a:b], packed[e], scales[e], zeros, g)
    return out


def _per_expert_masked(x, offs, packed, scales, zeros, g):
    rows = torch.arange(x.shape[0])
    start = torch.cat([offs.new_zeros(1), offs[:-1]])
    out = x.new_zeros(x.shape[0], packed.shape[1])
    for e in range(packed.shape[0]):
        y = ops.linear_w4a16(x, packed[e], scales[e], zeros, g)
        out = torch.where(((rows >= start[e]) & (rows < offs[e]))[:, None], y, out)
    return out


def _time(f, *args, reps=5) -> float:
    f(*args)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for E, k, K, N in SHAPES:
            packed, scales, zeros, g, dense = _weights(E, K, N)
            for T in TOKENS:
                x, offs = _routing(T, E, k, K)
                ref = _float_grouped(x, offs, dense)
                grouped = lambda *a: ops.grouped_linear_w4a16(*a)  # noqa: E731
                results = {}
                for name, f, a in (
                    ("float grouped_mm", _float_grouped, (x, offs, dense)),
                    ("grouped op", grouped, (x, offs, packed, scales, zeros, g)),
                    ("per expert, sliced", _per_expert_sliced, (x, offs, packed, scales, zeros, g)),
                    ("per expert, masked", _per_expert_masked, (x, offs, packed, scales, zeros, g)),
                ):
                    err = ((f(*a) - ref).abs().max() / ref.abs().max()).item()
                    results[name] = (_time(f, *a), err)
                rows.append((E, k, K, N, T, results))
                print(E, k, K, N, T, {n: f"{t:.2f} ms ({e:.0e})" for n, (t, e) in results.items()}, flush=True)
    names = list(rows[0][-1])
    lines = [f"# Lowered routed experts on CPU ({datetime.date.today()})", "",
             f"`PYTHONPATH=. python benchmarks/moe_lowering.py --threads {args.threads}`; {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {args.threads} thread(s); median of 5 calls after one warm-up; "
             "W4 symmetric g128; random top-k routing; max rel. error vs the float grouped matmul on the dequantized "
             "weights in brackets.", "",
             "| E | top-k | K | N | tokens | " + " | ".join(f"{n} (ms)" for n in names) + " |",
             "|---" * (5 + len(names)) + "|"]
    for E, k, K, N, T, res in rows:
        lines.append(f"| {E} | {k} | {K} | {N} | {T} | " + " | ".join(f"{res[n][0]:.2f} ({res[n][1]:.0e})"
                                                                   for n in names) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
