"""GPU check and benchmark of qcompile's INT4 kernels (written for the H200).

Run from the repository root on a CUDA machine::

    PYTHONPATH=. python3 benchmarks/kernels.py --check                 # every kernel variant vs reference
    PYTHONPATH=. python3 benchmarks/kernels.py --variants              # every variant at the target rows
    PYTHONPATH=. python3 benchmarks/kernels.py --bench --md benchmarks/results/kernels-h200.md

Method (``/work/.library/device/METHOD.md``): the two ceilings are measured first (device copy
bandwidth counting bytes read + written; ``torch._int_mm`` and bf16 ``F.linear`` at 8192³); every
timing is the median over batches of calls that rotate through enough weight copies to overflow
the 60 MB L2; decode-sized calls are timed as launched (events around back-to-back launches, the
op API's Python overhead included) and as CUDA-graph replay. The floor of a row is
``max(bytes / copy bandwidth, ops / matching peak)``; "×floor" is time over floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from qcompile.kernels import ops, reference
from qcompile.kernels.triton import w4a16, w4ax

DEV = "cuda"
L2_BYTES = 60e6
SHAPES = [(11008, 4096), (28672, 8192), (4096, 4096), (4096, 11008), (8192, 28672)]  # N×K, target rows first
MS = [1, 4, 16, 128, 2048, 8192]
TARGETS = {  # (N, K, M, op) -> target µs (the table)
    (11008, 4096, 1, "w4a16"): 10.0,
    (28672, 8192, 1, "w4a16"): 38.0,
    (11008, 4096, 16, "w4a16"): 14.0,
    (11008, 4096, 2048, "w4a16"): 300.0,
    (11008, 4096, 2048, "w4a8+q"): 210.0,
    (11008, 4096, 2048, "w4a4+q"): 210.0,
}


# ------------------------------------------------------------------------------------------------
# inputs


def rand_weight(N: int, K: int, g: int, asym: bool = False, dev: str = DEV):
    G = -(-K // g)
    packed = torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8, device=dev)
    scales = (torch.rand(N, G, device=dev) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (N, G), dtype=torch.uint8, device=dev) if asym else None
    return packed, scales, zeros


def n_copies(nbytes: float) -> int:
    return max(2, math.ceil(4 * L2_BYTES / max(nbytes, 1)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# timing


def _median_batches(run_batch: Callable[[], None], calls_per_batch: int, batches: int) -> float:
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_batch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_batch)
    return statistics.median(times)


def time_calls(calls: list[Callable[[], object]], graph: bool, budget_s: float = 0.15) -> float:
    """Median µs per call over batches cycling through ``calls`` (each uses its own weight copy)."""
    for c in calls:  # warm-up: compile, tune, allocate
        c()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in calls:
        c()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) / len(calls), 2e-6)
    reps = max(1, min(50, int(0.02 / (est * len(calls)))))  # ~20 ms per batch
    batches = max(5, min(25, int(budget_s / max(est * len(calls) * reps, 1e-4))))
    seq = calls * reps
    if not graph:
        def run():
            for c in seq:
                c()
        return _median_batches(run, len(seq), batches)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for c in seq:
            c()
    g.replay()
    torch.cuda.synchronize()
    return _median_batches(g.replay, len(seq), batches)


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    copy_us = time_calls([lambda: b.copy_(a)], graph=False, budget_s=0.3)
    copy_bw = 2 * n / (copy_us * 1e-6)
    del a, b
    m = 8192
    x8 = torch.randint(-128, 127, (m, m), dtype=torch.int8, device=DEV)
    w8 = torch.randint(-128, 127, (m, m), dtype=torch.int8, device=DEV)
    int_us = time_calls([lambda: torch._int_mm(x8, w8.t())], graph=False, budget_s=0.5)
    xb = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    wb = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    bf_us = time_calls([lambda: F.linear(xb, wb)], graph=False, budget_s=0.5)
    ops_ = 2 * m**3
    return dict(copy_bw=copy_bw, int8_ops=ops_ / (int_us * 1e-6), bf16_flops=ops_ / (bf_us * 1e-6))


# ------------------------------------------------------------------------------------------------
# correctness on the GPU


class Checker:
    def __init__(self) -> None:
        self.passed, self.failed = 0, []

    def __call__(self, name: str, ok: bool, detail: str = "") -> None:
        if ok:
            self.passed += 1
        else:
            self.failed.append(f"{name}: {detail}")
            print(f"FAIL {name}: {detail}", flush=True)


def check(chk: Checker) -> None:
    torch.manual_seed(1)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
    # W4A16: every candidate at decode and prefill shapes, odd K, partial groups, zeros, bias, dtypes
    cases = [
        (1, 4096, 4096, 128, False, False, torch.bfloat16), (1, 300, 576, 128, True, True, torch.bfloat16),
        (1, 257, 577, 577, True, False, torch.float16), (4, 11008, 4096, 128, False, False, torch.bfloat16),
        (7, 1000, 1000, 64, True, True, torch.bfloat16), (3, 512, 480, 96, True, False, torch.bfloat16),
        (130, 576, 1536, 128, True, True, torch.bfloat16), (2048, 4096, 4096, 128, False, False, torch.bfloat16),
        (300, 256, 320, 40, True, True, torch.float32),
    ]
    for M, N, K, g, asym, has_bias, dt in cases:
        packed, scales, zeros = rand_weight(N, K, g, asym)
        x = torch.randn(M, K, device=DEV, dtype=dt)
        bias = torch.randn(N, device=DEV, dtype=dt) if has_bias else None
        ref = reference.linear_w4a16(x.float(), packed, scales, zeros, g, None if bias is None else bias.float())
        for cand in w4a16.candidates(M, N, K, g, asm=True, x_dtype=dt):
            try:
                y = w4a16.run(cand, x, packed, scales, zeros, g, bias)
                torch.cuda.synchronize()
                e = rel(y, ref)
                chk(f"w4a16 M{M} {N}x{K} g{g} {dt} {cand.name}", e < tol[dt] and bool(torch.isfinite(y).all()),
                    f"rel {e:.2e}")
            except Exception as exc:  # noqa: BLE001
                chk(f"w4a16 M{M} {N}x{K} g{g} {dt} {cand.name}", False, repr(exc)[:300])
    # W4A8/W4A4: every candidate
    cases8 = [
        (1, 4096, 4096, 4096, False, 8, True, False), (1, 300, 576, 128, True, 4, False, True),
        (16, 11008, 4096, 4096, False, 4, True, False), (5, 1000, 1000, 1000, True, 8, False, True),
        (130, 576, 1536, 128, True, 8, False, True), (2048, 11008, 4096, 4096, False, 4, True, False),
        (2048, 4096, 4096, 128, False, 8, True, False), (33, 200, 130, 130, True, 4, False, False),
    ]
    for M, N, K, g, asym_w, bits, sym_a, has_bias in cases8:
        packed, scales, zeros = rand_weight(N, K, g, asym_w)
        x = torch.randn(M, K, device=DEV)
        codes, sa, za = reference.quantize_per_token(x, bits, sym_a, 0.9)
        za_ = None if sym_a else za
        bias = torch.randn(N, device=DEV) if has_bias else None
        ref = reference.linear_w4a8(codes, sa, za_, packed, scales, zeros, g, bias, torch.float32)
        for cand in w4ax.candidates(M, N, K, g):
            name = f"w4a{bits} M{M} {N}x{K} g{g} az{not sym_a} {cand.name}"
            try:
                y = w4ax.run(cand, codes, sa.reshape(-1), None if za_ is None else za_.reshape(-1), packed, scales,
                             zeros, g, bias, torch.float32)
                torch.cuda.synchronize()
                e = rel(y, ref)
                chk(name, e < 1e-5, f"rel {e:.2e}")
            except Exception as exc:  # noqa: BLE001
                chk(name, False, repr(exc)[:300])
    # Hadamard and rotate+quantize: every size class
    for R, n, block, dt in [(3, 64, 0, torch.float32), (5, 576, 0, torch.bfloat16), (9, 1536, 0, torch.float16),
                            (2048, 4096, 0, torch.bfloat16), (4, 5120, 0, torch.float32), (3, 8192, 0, torch.bfloat16),
                            (2, 14336, 0, torch.bfloat16), (64, 11008, 256, torch.bfloat16), (7, 96, 0, torch.float32),
                            (5, 12, 0, torch.float32), (3, 28672, 0, torch.bfloat16)]:
        x = torch.randn(R, n, device=DEV, dtype=dt) * 2
        x[:, 3] += 40.0  # an outlier channel, as in LLM activations
        name = f"hadamard R{R} n{n} b{block} {dt}"
        try:
            y = ops.hadamard(x, block)
            e = rel(y, reference.hadamard(x.float(), block))
            chk(name, e < {torch.float32: 1e-6, torch.bfloat16: 6e-3, torch.float16: 1e-3}[dt], f"rel {e:.2e}")
        except Exception as exc:  # noqa: BLE001
            chk(name, False, repr(exc)[:300])
        for bits, sym in ((8, True), (4, False), (4, True), (8, False)):
            name = f"quantize R{R} n{n} b{block} {dt} a{bits} sym{sym}"
            try:
                c, s, z = (t.cpu() for t in ops.quantize_per_token(x, bits, sym, 0.9, True, block))
                rc, rs, rz = reference.quantize_per_token(x.cpu(), bits, sym, 0.9, True, block)
                d = (c.int() - rc.int()).abs()
                ok = d.max().item() <= 1 and d.float().mean().item() < 2e-3 and rel(s, rs) < 5e-5 and \
                    (z.int() - rz.int()).abs().max().item() <= 1
                chk(name, ok, f"max|dq| {d.max().item()} frac {d.float().mean().item():.1e} scale {rel(s, rs):.1e}")
            except Exception as exc:  # noqa: BLE001
                chk(name, False, repr(exc)[:300])
    # plain quantization must match the reference exactly, including ties (round half to even); the
    # reference runs on the CPU: torch on CUDA divides by a Python scalar through its reciprocal
    for n in (100, 4096, 5000):
        x = torch.randn(257, n, device=DEV, dtype=torch.bfloat16) * 3
        x[:, 0] = 127.0  # scale 1.0 exactly (symmetric 8-bit, clip 1): codes = round(x)
        x[:, 1:9] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5], device=DEV, dtype=torch.bfloat16)
        for bits, sym, clip in ((8, True, 1.0), (4, False, 0.9), (8, False, 1.0), (4, True, 0.8)):
            c, s, z = (t.cpu() for t in ops.quantize_per_token(x, bits, sym, clip))
            rc, rs, rz = reference.quantize_per_token(x.cpu(), bits, sym, clip)
            chk(f"quantize exact n{n} a{bits} sym{sym} clip{clip}",
                bool((c == rc).all() and (s == rs).all() and (z == rz).all()),
                f"codes differ at {(c != rc).sum().item()}, scales {(s != rs).sum().item()}")
    # the op layer on CUDA: leading dims, dispatch to the tuned kernels
    x = torch.randn(2, 3, 576, device=DEV, dtype=torch.bfloat16)
    packed, scales, zeros = rand_weight(320, 576, 128, True)
    y = ops.linear_w4a16(x, packed, scales, zeros, 128)
    chk("op linear_w4a16 [2,3,576]", rel(y, reference.linear_w4a16(x.float(), packed, scales, zeros, 128)) < 1e-2)
    c, s, z = ops.quantize_per_token(x, 4, False, 0.9, True)
    y = ops.linear_w4a4(c, s, z, packed, scales, zeros, 128, None, torch.bfloat16)
    ref = reference.linear_w4a4(*reference.quantize_per_token(x, 4, False, 0.9, True), packed, scales, zeros, 128,
                                None, torch.float32)
    chk("op quantize+linear_w4a4 [2,3,576]", rel(y, ref) < 1e-2, f"rel {rel(y, ref):.2e}")


def quick_check(chk: Checker) -> None:
    """Every candidate of the tuned families at the benchmark's own settings (plus one asymmetric,
    biased case each): what the benchmark times is checked first, in seconds rather than minutes."""
    torch.manual_seed(2)
    for M, N, K, g, asym, has_bias in ((1, 4096, 4096, 128, False, False), (16, 4096, 4096, 128, False, False),
                                       (1, 300, 576, 128, True, True), (1, 300, 640, 40, True, True),
                                       (3, 300, 576, 128, True, True), (11, 40, 256, 64, False, True),
                                       (2048, 4096, 4096, 128, False, False)):
        packed, scales, zeros = rand_weight(N, K, g, asym)
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        bias = torch.randn(N, device=DEV, dtype=torch.bfloat16) if has_bias else None
        ref = reference.linear_w4a16(x.float(), packed, scales, zeros, g, None if bias is None else bias.float())
        for cand in w4a16.candidates(M, N, K, g, asm=True, x_dtype=torch.bfloat16):
            w4a16.run(cand, x, packed, scales, zeros, g, bias)  # compiles; the second call takes the fast launch
            e = rel(w4a16.run(cand, x, packed, scales, zeros, g, bias), ref)
            chk(f"w4a16 M{M} {N}x{K} {cand.name}", e < 1e-2, f"rel {e:.2e}")
    for M, N, K, asym_w, sym_a, has_bias in ((1, 4096, 4096, False, True, False),
                                             (2048, 4096, 4096, False, True, False),
                                             (256, 1000, 576, True, False, True)):
        packed, scales, zeros = rand_weight(N, K, K, asym_w)
        codes, sa, za = reference.quantize_per_token(torch.randn(M, K, device=DEV), 4, sym_a, 0.9)
        za_ = None if sym_a else za
        bias = torch.randn(N, device=DEV) if has_bias else None
        ref = reference.linear_w4a8(codes, sa, za_, packed, scales, zeros, K, bias, torch.float32)
        for cand in w4ax.candidates(M, N, K, K):
            for _ in range(2):  # compile, then the fast launch
                y = w4ax.run(cand, codes, sa.reshape(-1), None if za_ is None else za_.reshape(-1), packed, scales,
                             zeros, K, bias, torch.float32)
            chk(f"w4ax M{M} {N}x{K} {cand.name}", rel(y, ref) < 1e-5, f"rel {rel(y, ref):.2e}")
    for M, N, K, asym_w, has_bias in ((2048, 4096, 4096, False, False), (256, 1008, 576, True, True)):
        packed, scales, zeros = rand_weight(N, K, K, asym_w)  # W4A4 through FP8: bf16 output, 4-bit codes
        codes, sa, _ = reference.quantize_per_token(torch.randn(M, K, device=DEV), 4, True, 0.9)
        bias = torch.randn(N, device=DEV) if has_bias else None
        ref = reference.linear_w4a8(codes, sa, None, packed, scales, zeros, K, bias, torch.float32)
        for _ in range(2):
            y = w4ax.unpack_fp8_mm(codes, sa.reshape(-1), packed, scales, zeros, bias, torch.bfloat16)
        chk(f"w4a4 fp8 M{M} {N}x{K}", rel(y, ref) < 1e-2, f"rel {rel(y, ref):.2e}")
    x = torch.randn(64, 4096, device=DEV, dtype=torch.bfloat16) * 3
    for bits, sym, clip in ((8, True, 1.0), (4, False, 0.9)):
        c, s, z = (t.cpu() for t in ops.quantize_per_token(x, bits, sym, clip))
        rc, rs, rz = reference.quantize_per_token(x.cpu(), bits, sym, clip)
        chk(f"quantize exact a{bits} sym{sym}", bool((c == rc).all() and (s == rs).all() and (z == rz).all()))


# ------------------------------------------------------------------------------------------------
# where the time of one decode call goes: kernel launch, dispatch, custom-op layer, typed wrapper


def host_us(fn: Callable[[], object], calls: int = 300) -> float:
    """Host time per call: wall clock of back-to-back calls with no synchronization (fewer than the launch
    queue holds, so the host never waits on the GPU), median of 5 batches."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def overhead() -> list[dict]:
    """Host µs per call of every INT4 op at the 11008×4096 decode shape (M = 1), through each layer of
    the op stack, against cuBLAS and tinygemm; then the launched and graph µs of the W4A16 layers, and a
    profile of the typed wrapper."""
    from qcompile.kernels.autotune import _chosen
    from qcompile.kernels.triton import dispatch

    rows = []
    N, K = 11008, 4096
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    ws = [rand_weight(N, K, 128) for _ in range(n_copies(N * K / 2))]
    pc = rand_weight(N, K, K)  # per-channel, as the A8/A4 rows of the benchmark
    ops.linear_w4a16(x, ws[0][0], ws[0][1], None, 128)  # tune
    cand = next(v for (fam, key, _), v in _chosen.items() if fam == "w4a16_decode" and key[:3] == (1, N, K))
    codes8, s8, _ = ops.quantize_per_token(x, 8)
    codes4, s4, _ = ops.quantize_per_token(x, 4)
    wb = torch.randn(N, K, device=DEV, dtype=torch.bfloat16)
    tg = tinygemm_weight(N, K, 128)
    w = ws[0]
    host = {
        "bf16 F.linear (cuBLAS)": lambda: F.linear(x, wb),
        "tinygemm _weight_int4pack_mm": lambda: torch._weight_int4pack_mm(x, tg[0], 128, tg[1]),
        "w4a16 kernel (w4a16.run)": lambda: w4a16.run(cand, x, w[0], w[1], None, 128, None),
        "w4a16 plan (plans.call_w4a16)": lambda: plans.call_w4a16(x, w[0], w[1], None, 128, None),
        "w4a16 dispatch.linear_w4a16": lambda: dispatch.linear_w4a16(x, w[0], w[1], None, 128, None),
        "w4a16 torch.ops.qcompile": lambda: torch.ops.qcompile.linear_w4a16(x, w[0], w[1], None, 128, None),
        "w4a16 ops.linear_w4a16": lambda: ops.linear_w4a16(x, w[0], w[1], None, 128),
        "w4a8 ops.linear_w4a8": lambda: ops.linear_w4a8(codes8, s8, None, pc[0], pc[1], None, K),
        "w4a4 ops.linear_w4a4": lambda: ops.linear_w4a4(codes4, s4, None, pc[0], pc[1], None, K),
        "quantize_per_token a8": lambda: ops.quantize_per_token(x, 8),
        "quantize_per_token a4 rotate": lambda: ops.quantize_per_token(x, 4, rotate=True),
    }
    # the op's launch plan (recorded by the calls above) must give the generic path's output exactly
    from qcompile.kernels.triton import plans, w4ax

    ok = {}
    for w in ws[:2]:
        ops.linear_w4a16(x, w[0], w[1], None, 128)
        planned = plans.call_w4a16(x, w[0], w[1], None, 128, None)
        ok.setdefault("w4a16 plan", []).append(planned is not None and torch.equal(
            planned, w4a16.run(cand, x, w[0], w[1], None, 128, None)))
        ops.linear_w4a8(codes8, s8, None, w[0], w[1], None, 128)
        c8 = w4ax.chosen_candidate(codes8, None, w[0], None, 128, None, torch.bfloat16, 8)
        planned = plans.call_w4ax(codes8, s8, None, w[0], w[1], None, 128, None, torch.bfloat16, 8)
        ok.setdefault(f"w4a8 plan ({c8.name if c8 else '-'})", []).append(
            planned is None if c8 is None or c8.meta.get("kind") != "codes_gemv" else torch.equal(
                planned, w4ax.run(c8, codes8, s8.reshape(-1), None, w[0], w[1], None, 128, None, torch.bfloat16)))
    q_gen = dispatch.quantize_per_token(x, 8, True, 1.0, False, 0)  # the generic path (records the plan)
    q_plan = plans.call_quantize(x, 8, True, 1.0, False, 0)
    ok["quantize plan"] = [q_plan is not None and all(torch.equal(a, b) for a, b in zip(q_plan, q_gen))]
    for name, v in ok.items():
        print(f"  plan check {name}: {'ok' if all(v) else 'MISMATCH'} ({v})", flush=True)
        rows.append(dict(layer=f"check {name}", mode="check", us=float(all(v)), cand=cand.name))
    for name, fn in host.items():
        try:
            us = host_us(fn)
        except Exception as exc:  # noqa: BLE001 - a row that fails is printed, the others still run
            print(f"  host {name}: {exc!r}"[:300], flush=True)
            continue
        rows.append(dict(layer=name, mode="host", us=us, cand=cand.name))
        print(f"  host     {name:36s} {us:7.1f} us per call", flush=True)
    layers = {
        "w4a16 kernel (w4a16.run)": lambda w: w4a16.run(cand, x, w[0], w[1], None, 128, None),
        "w4a16 torch.ops.qcompile": lambda w: torch.ops.qcompile.linear_w4a16(x, w[0], w[1], None, 128, None),
        "w4a16 ops.linear_w4a16": lambda w: ops.linear_w4a16(x, w[0], w[1], None, 128),
        "w4a8 ops.linear_w4a8 g128": lambda w: ops.linear_w4a8(codes8, s8, None, w[0], w[1], None, 128),
        "quantize_per_token a8": lambda w: ops.quantize_per_token(x, 8),
    }
    for name, fn in layers.items():
        for mode in ("launched", "graph"):
            us = time_calls([lambda w=w, fn=fn: fn(w) for w in ws], graph=mode == "graph")
            rows.append(dict(layer=name, mode=mode, us=us, cand=cand.name))
            print(f"  overhead {name:36s} {mode:8s} {us:7.1f} us  ({cand.name})", flush=True)
    # where the host time of the typed wrapper goes (cProfile inflates small calls; read it as a ranking)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        for w in ws:
            ops.linear_w4a16(x, w[0], w[1], None, 128)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    return rows


# ------------------------------------------------------------------------------------------------
# benchmark rows


def tinygemm_weight(N: int, K: int, g: int):
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=DEV)
    w = torch._convert_weight_to_int4pack(q, 8)
    sz = torch.rand(K // g, N, 2, device=DEV, dtype=torch.bfloat16)
    return w, sz


def bench_linear(N: int, K: int, M: int, ceil: dict, decode_graph: bool = True) -> list[dict]:
    rows = []
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    w4_bytes = N * K / 2 + N * (K // 128) * 2
    act = M * K * 2 + M * N * 2
    flops = 2 * M * N * K
    modes = ["launched"] + (["graph"] if decode_graph else [])

    def add(op: str, calls, nbytes: float, peak: float, **extra):
        for mode in modes:
            try:
                us = time_calls(calls, graph=(mode == "graph"))
            except Exception as exc:  # noqa: BLE001
                print(f"  {op} M{M} {N}x{K} {mode}: {exc!r}"[:300], flush=True)
                continue
            floor = max(nbytes / ceil["copy_bw"], flops / peak) * 1e6
            rows.append(dict(N=N, K=K, M=M, op=op, mode=mode, us=us, floor_us=floor, x_floor=us / floor,
                             tbps=nbytes / (us * 1e-6) / 1e12, tops=flops / (us * 1e-6) / 1e12,
                             target=TARGETS.get((N, K, M, op)), **extra))
            print(f"  {op:10s} M={M:5d} {N}x{K} {mode:8s} {us:9.1f} us  floor {floor:8.1f}", flush=True)

    # bf16 cuBLAS
    wb = [torch.randn(N, K, device=DEV, dtype=torch.bfloat16) for _ in range(n_copies(2 * N * K))]
    add("bf16", [lambda w=w: F.linear(x, w) for w in wb], 2 * N * K + act, ceil["bf16_flops"])
    del wb
    # tinygemm W4A16 g128
    if M <= 2048 or N * K < 2e8:
        tg = [tinygemm_weight(N, K, 128) for _ in range(n_copies(w4_bytes))]
        add("tinygemm", [lambda t=t: torch._weight_int4pack_mm(x, t[0], 128, t[1]) for t in tg], w4_bytes + act,
            ceil["bf16_flops"])
        del tg
    # torch._int_mm (int8 x int8 -> int32), needs M > 16
    if M > 16:
        x8 = torch.randint(-128, 127, (M, K), dtype=torch.int8, device=DEV)
        w8 = [torch.randint(-128, 127, (N, K), dtype=torch.int8, device=DEV).t() for _ in range(n_copies(N * K))]
        add("int_mm", [lambda w=w: torch._int_mm(x8, w) for w in w8], N * K + M * K + 4 * M * N, ceil["int8_ops"])
        del w8
    # ours: W4A16 g128 symmetric
    ws = [rand_weight(N, K, 128) for _ in range(n_copies(w4_bytes))]
    add("w4a16", [lambda w=w: ops.linear_w4a16(x, w[0], w[1], None, 128) for w in ws], w4_bytes + act,
        ceil["bf16_flops"])
    del ws
    # ours: W4A8 / W4A4, per-channel symmetric weights, per-token symmetric activations
    wc = [rand_weight(N, K, K) for _ in range(n_copies(N * K / 2))]
    pc_bytes = N * K / 2 + N * 2
    for bits in (8, 4):
        op = f"w4a{bits}"
        lin = ops.linear_w4a4 if bits == 4 else ops.linear_w4a8
        c, s, _ = ops.quantize_per_token(x, bits, True, 0.9)
        add(op, [lambda w=w, c=c, s=s: lin(c, s, None, w[0], w[1], None, K) for w in wc],
            pc_bytes + M * K + M * N * 2, ceil["int8_ops"])
        add(op + "+q", [lambda w=w: lin(*ops.quantize_per_token(x, bits, True, 0.9)[:2], None, w[0], w[1], None, K)
                        for w in wc],
            pc_bytes + act + M * K, ceil["int8_ops"])
    del wc
    return rows


def bench_rotate_quant(ceil: dict) -> list[dict]:
    rows = []
    for M in (1, 2048, 8192):
        for n, block in ((4096, 0), (11008, 256), (14336, 0)):
            xs = [torch.randn(M, n, device=DEV, dtype=torch.bfloat16) for _ in range(n_copies(3 * M * n))]
            nbytes = M * n * 3 + M * 5
            for op, fn in (("hadamard+q8", lambda x: ops.quantize_per_token(x, 8, True, 1.0, True, block)),
                           ("hadamard+q4", lambda x: ops.quantize_per_token(x, 4, True, 0.9, True, block)),
                           ("quant8", lambda x: ops.quantize_per_token(x, 8, True, 1.0))):
                for mode in ("launched", "graph"):
                    us = time_calls([lambda x=x: fn(x) for x in xs], graph=mode == "graph")
                    floor = nbytes / ceil["copy_bw"] * 1e6
                    rows.append(dict(op=op, M=M, n=n, block=block, mode=mode, us=us, floor_us=floor,
                                     x_floor=us / floor, tbps=nbytes / (us * 1e-6) / 1e12,
                                     frac_copy=(nbytes / (us * 1e-6)) / ceil["copy_bw"]))
                    print(f"  {op:12s} M={M:5d} n={n:6d} b={block:4d} {mode:8s} {us:8.1f} us  "
                          f"{rows[-1]['frac_copy']:.2f} of copy", flush=True)
            del xs
    return rows


# ------------------------------------------------------------------------------------------------
# one decode step of a Llama-2-7B-shaped model (random weights, KV cache)


def decode_steps(mode: str, ctx: int = 1024, dims: tuple = (4096, 32, 128, 11008, 32, 32000), dev: str = DEV):
    """One batch-1 decode step of a Llama-shaped stack (``dims`` = hidden, heads, head dim, FFN,
    layers, vocabulary; random weights, KV cache of ``ctx``), its linears in ``mode`` (bf16 cuBLAS,
    our W4A16 g128, or our W4A4 with online Hadamard on the down input): ``(eager step, step with
    each layer torch.compile'd)``. One layer function serves both; its weights are arguments, so one
    compiled graph serves every layer (Inductor fuses the norms, RoPE, SiLU·up and residual adds and
    calls our ops as they are)."""
    torch.manual_seed(0)
    H, NH, HD, FF, L, V = dims
    dt = torch.bfloat16

    def weight(N, K):
        if mode == "bf16":
            return (torch.randn(N, K, device=dev, dtype=dt) * 0.02,)
        if mode == "w4a16":
            return rand_weight(N, K, 128, dev=dev)[:2]
        return rand_weight(N, K, K, dev=dev)[:2]  # w4a4: per-channel weights, per-token 4-bit activations

    def lin(x, w):
        if mode == "bf16":
            return F.linear(x, w[0])
        if mode == "w4a16":
            return ops.linear_w4a16(x, w[0], w[1], None, 128)
        K = x.shape[-1]
        rot = K != H  # down_proj input: online Hadamard, block-diagonal 256 (11008 has no full one)
        c, sc, _ = ops.quantize_per_token(x, 4, True, 0.9, rot, 256 if rot else None)
        return ops.linear_w4a4(c, sc, None, w[0], w[1], None, K, None, dt)

    layers = [dict(qkv=weight(3 * H, H), o=weight(H, H), gu=weight(2 * FF, H), down=weight(H, FF),
                   n1=torch.ones(H, device=dev, dtype=dt), n2=torch.ones(H, device=dev, dtype=dt),
                   kc=torch.randn(1, NH, ctx, HD, device=dev, dtype=dt),
                   vc=torch.randn(1, NH, ctx, HD, device=dev, dtype=dt)) for _ in range(L)]
    head = torch.randn(V, H, device=dev, dtype=dt) * 0.02
    nf = torch.ones(H, device=dev, dtype=dt)
    pos = ctx - 1
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, device=dev).float() / HD))
    freqs = torch.polar(torch.ones_like(inv), pos * inv)  # complex64 [HD/2]
    cos, sin = freqs.real.contiguous(), freqs.imag.contiguous()

    def rope(t):  # t [1, 2, NH, HD]: q and k together, as (even, odd) pairs
        t = t.float().reshape(1, 2, NH, HD // 2, 2)
        a, b = t[..., 0], t[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).reshape(1, 2, NH, 1, HD).to(dt)

    def layer(h, n1, n2, kc, vc, qkv_w, o_w, gu_w, down_w):
        qkv = lin(F.rms_norm(h, (H,), n1, 1e-6), qkv_w)
        q, k = rope(qkv[:, : 2 * H].view(1, 2, NH, HD)).unbind(1)
        v = qkv[:, 2 * H:].view(1, NH, 1, HD)
        kc[:, :, pos: pos + 1] = k
        vc[:, :, pos: pos + 1] = v
        h = h + lin(F.scaled_dot_product_attention(q, kc, vc).reshape(1, H), o_w)
        g, u = lin(F.rms_norm(h, (H,), n2, 1e-6), gu_w).chunk(2, dim=-1)
        return h + lin(F.silu(g) * u, down_w)

    x0 = torch.randn(1, H, device=dev, dtype=dt)

    def stepper(fn):
        def step():
            h = x0
            for ly in layers:
                h = fn(h, ly["n1"], ly["n2"], ly["kc"], ly["vc"], ly["qkv"], ly["o"], ly["gu"], ly["down"])
            return F.linear(F.rms_norm(h, (H,), nf, 1e-6), head)
        return step

    return stepper(layer), stepper(torch.compile(layer, dynamic=False))


def llama_decode(ceil: dict, mode: str) -> dict:
    """The 7B-shaped decode step (``decode_steps``) timed as launched, as a CUDA-graph replay, and
    compiled then graph-replayed: how a deployment would run it."""
    eager, compiled = decode_steps(mode)
    out = {}
    for gmode in ("launched", "graph"):
        out[gmode] = time_calls([eager], graph=(gmode == "graph"), budget_s=1.0)
    t0 = time.time()
    try:
        out["compiled graph"] = time_calls([compiled], graph=True, budget_s=1.0)
    except Exception as exc:  # noqa: BLE001 - reported, and the eager rows still stand
        print(f"  7B decode {mode} compiled: {exc!r}"[:300], flush=True)
    print(f"  7B decode {mode:6s} " + "  ".join(f"{k} {v:8.1f} us" for k, v in out.items())
          + f"  (compile + timing {time.time() - t0:.0f}s)", flush=True)
    del eager, compiled
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# variants at the target rows (for tuning the candidate lists)


def gemv_variants(M: int = 1) -> list[dict]:
    """The decode kernels' meta-parameters swept at every decode shape for M tokens, against tinygemm."""
    from qcompile.kernels.autotune import Candidate

    rows = []
    for N, K in SHAPES:
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        w4_bytes = N * K / 2 + N * (K // 128) * 2
        tg = [tinygemm_weight(N, K, 128) for _ in range(n_copies(w4_bytes))]
        us = time_calls([lambda t=t: torch._weight_int4pack_mm(x, t[0], 128, t[1]) for t in tg], graph=True,
                        budget_s=0.1)
        rows.append(dict(N=N, K=K, cand="tinygemm", us=us))
        print(f"  gemv {N}x{K} {'tinygemm':32s} {us:8.1f} us", flush=True)
        del tg
        ws = [rand_weight(N, K, 128) for _ in range(n_copies(w4_bytes))]
        cands = [Candidate(f"gemv_n{bn}_w{warps}", dict(kind="gemv", BLOCK_N=bn, BW=128 * warps, FUSED=True,
                                                         ASM=True, num_warps=warps))
                 for bn in (4, 8) for warps in (1, 2, 4) if bn == 8 and M == 1]
        cands += [c for c in w4a16.candidates(M, N, K, 128, True, torch.bfloat16) if c.meta["kind"] == "skinny"]
        cands += [Candidate(f"mma_w{warps}_s{slabs}_k{split}", dict(kind="mma_gemv", WARPS=warps, SLABS=slabs,
                                                                   SPLIT_K=split))
                  for warps in (1, 2, 4) for slabs in (1, 2) for split in (1, 2, 4, 8) if slabs == 2 or split == 4]
        for cand in cands:
            calls = [lambda w=w, c=cand: w4a16.run(c, x, w[0], w[1], None, 128, None) for w in ws]
            try:
                us = time_calls(calls, graph=True, budget_s=0.1)
            except Exception as exc:  # noqa: BLE001
                print(f"  gemv {cand.name}: {exc!r}"[:200], flush=True)
                continue
            rows.append(dict(N=N, K=K, M=M, cand=cand.name, us=us, floor_us=w4_bytes / 4.25e12 * 1e6))
            print(f"  gemv M={M} {N}x{K} {cand.name:32s} {us:8.1f} us", flush=True)
        del ws
        torch.cuda.empty_cache()
    return rows


def variants(ceil: dict) -> list[dict]:
    rows = []
    for N, K, M in ((11008, 4096, 1), (28672, 8192, 1), (11008, 4096, 16), (11008, 4096, 2048)):
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        w4_bytes = N * K / 2 + N * (K // 128) * 2
        ws = [rand_weight(N, K, 128) for _ in range(n_copies(w4_bytes))]
        for cand in w4a16.candidates(M, N, K, 128):
            calls = [lambda w=w, c=cand: w4a16.run(c, x, w[0], w[1], None, 128, None) for w in ws]
            for gmode in ("graph",):
                try:
                    us = time_calls(calls, graph=gmode == "graph", budget_s=0.1)
                except Exception as exc:  # noqa: BLE001
                    print(f"  w4a16 {cand.name}: {exc!r}"[:200])
                    continue
                rows.append(dict(op="w4a16", N=N, K=K, M=M, cand=cand.name, mode=gmode, us=us))
                print(f"  w4a16 {N}x{K} M={M:5d} {cand.name:40s} {gmode:8s} {us:9.1f} us", flush=True)
        del ws
        if M >= 16:
            wc = [rand_weight(N, K, K) for _ in range(n_copies(N * K / 2))]
            c, s, _ = ops.quantize_per_token(x, 4, True, 0.9)
            for cand in w4ax.candidates(M, N, K, K, fp8=True):
                calls = [lambda w=w, cd=cand: w4ax.run(cd, c, s.reshape(-1), None, w[0], w[1], None, K, None,
                                                       torch.bfloat16) for w in wc]
                try:
                    us = time_calls(calls, graph=True, budget_s=0.1)
                except Exception as exc:  # noqa: BLE001
                    print(f"  w4ax {cand.name}: {exc!r}"[:200])
                    continue
                rows.append(dict(op="w4ax", N=N, K=K, M=M, cand=cand.name, mode="graph", us=us))
                print(f"  w4ax  {N}x{K} M={M:5d} {cand.name:40s} graph    {us:9.1f} us", flush=True)
            del wc
    return rows


# ------------------------------------------------------------------------------------------------
# report


def machine() -> dict:
    return dict(machine=f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
                        f"{__import__('triton').__version__}, python {platform.python_version()}",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def markdown(ceil: dict, lin: list[dict], rq: list[dict], dec: dict, cmd: str, where: dict) -> str:
    lines = [
        "# INT4 kernels on the H200", "",
        f"- command: `{cmd}`",
        f"- machine: {where['machine']}",
        f"- date: {where['date']}",
        f"- ceilings measured here: copy {ceil['copy_bw'] / 1e12:.2f} TB/s (read+write), int8 `_int_mm` "
        f"{ceil['int8_ops'] / 1e12:.0f} TOPS, bf16 `F.linear` {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s (8192³)",
        "- times: median µs per call; weights rotated over copies totalling ≥ 240 MB (4× L2); "
        "`launched` = back-to-back calls through the op API (Python dispatch included), `graph` = CUDA-graph "
        "replay of the same calls. floor = max(bytes / copy bandwidth, ops / peak); ×floor = time / floor.",
        "- ops: `bf16` = `F.linear` (cuBLAS); `tinygemm` = `torch._weight_int4pack_mm` g128; `int_mm` = "
        "`torch._int_mm` int8 (M > 16 only); `w4a16` = ours, g128 symmetric; `w4a8`/`w4a4` = ours, per-channel "
        "int4 weights × per-token codes (pre-quantized); `+q` includes `quantize_per_token` of the bf16 input.",
        "",
        "## Targets", "",
        "| N×K | M | op | target µs | launched µs | graph µs | met (graph) |", "|---|---|---|---|---|---|---|",
    ]
    by = {(r["N"], r["K"], r["M"], r["op"], r["mode"]): r["us"] for r in lin}
    for (N, K, M, op), tgt in TARGETS.items():
        la, gr = by.get((N, K, M, op, "launched")), by.get((N, K, M, op, "graph"))
        best = gr if gr is not None else la
        if best is None:
            continue
        fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {N}×{K} | {M} | {op} | {tgt:.0f} | {fmt(la)} | {fmt(gr)} | "
                     f"{'yes' if best <= tgt else f'no ({best / tgt:.2f}× target)'} |")
    lines += ["", "M = 1, W4A16 g128 vs tinygemm g128 (target ≥ 1.6× faster):", "",
              "| N×K | mode | ours µs | tinygemm µs | speed-up |", "|---|---|---|---|---|"]
    for N, K in SHAPES:
        for mode in ("launched", "graph"):
            a, b = by.get((N, K, 1, "w4a16", mode)), by.get((N, K, 1, "tinygemm", mode))
            if a and b:
                lines.append(f"| {N}×{K} | {mode} | {a:.1f} | {b:.1f} | {b / a:.2f}× |")
    lines += [
        "",
        "## Linear layers", "",
        "| N×K | M | op | mode | µs | TB/s | TOPS | ×floor | target µs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lin:
        tgt = "" if r["target"] is None else f"{r['target']:.0f} ({'met' if r['us'] <= r['target'] else 'missed'})"
        lines.append(f"| {r['N']}×{r['K']} | {r['M']} | {r['op']} | {r['mode']} | {r['us']:.1f} | {r['tbps']:.2f} | "
                     f"{r['tops']:.0f} | {r['x_floor']:.2f} | {tgt} |")
    lines += ["", "## Fused Hadamard + per-token quantize (bf16 in, int8 codes + scales out)", "",
              "| op | M | n | Hadamard block | mode | µs | TB/s | fraction of copy bandwidth |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rq:
        lines.append(f"| {r['op']} | {r['M']} | {r['n']} | {r['block'] or 'full'} | {r['mode']} | {r['us']:.1f} | "
                     f"{r['tbps']:.2f} | {r['frac_copy']:.2f} |")
    if dec:
        lines += ["", "## One decode step, Llama-2-7B shapes (32 layers, KV cache 1024, batch 1, random weights)", "",
                  "| model | launched µs | graph µs | compiled + graph µs | speed-up vs bf16 (graph) | "
                  "speed-up vs bf16 (compiled + graph) |", "|---|---|---|---|---|---|"]
        for k, v in dec.items():
            comp, comp_bf16 = v.get("compiled graph"), dec["bf16"].get("compiled graph")
            lines.append(f"| {k} | {v['launched']:.0f} | {v['graph']:.0f} | "
                         f"{'–' if comp is None else f'{comp:.0f}'} | {dec['bf16']['graph'] / v['graph']:.2f}× | "
                         f"{'–' if comp is None or comp_bf16 is None else f'{comp_bf16 / comp:.2f}×'} |")
    return "\n".join(lines) + "\n"


def summary(lin: list[dict]) -> None:
    print("\n=== targets ===")
    by = {(r["N"], r["K"], r["M"], r["op"], r["mode"]): r["us"] for r in lin}
    for (N, K, M, op), tgt in TARGETS.items():
        for mode in ("launched", "graph"):
            us = by.get((N, K, M, op, mode))
            if us is not None:
                print(f"{N}x{K} M={M:5d} {op:8s} {mode:8s} {us:8.1f} us  target {tgt:6.1f}  "
                      f"{'MET' if us <= tgt else 'missed'}")
    print("=== M=1 vs tinygemm ===")
    for N, K in SHAPES:
        for mode in ("launched", "graph"):
            a, b = by.get((N, K, 1, "w4a16", mode)), by.get((N, K, 1, "tinygemm", mode))
            if a and b:
                print(f"{N}x{K} {mode:8s} w4a16 {a:7.1f}  tinygemm {b:7.1f}  speed-up {b / a:.2f} (target 1.6)")


def report(paths: list[str], md: str) -> int:
    """One table from several runs (each within the device's per-call time limit): linear rows
    concatenated in run order, the decode step and Hadamard rows from whichever run has them."""
    runs = [json.load(open(p)) for p in paths]
    lin = [r for run in runs for r in run.get("linear", [])]
    rq = next((run["rotate_quant"] for run in runs if run.get("rotate_quant")), [])
    dec = next((run["decode"] for run in runs if run.get("decode")), {})
    cmd = " && ".join(run["command"] for run in runs)
    with open(md, "w") as f:
        f.write(markdown(runs[0]["ceilings"], lin, rq, dec, cmd, runs[0]["where"]))
    print(f"wrote {md} from {len(paths)} runs ({len(lin)} linear rows)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick-check", action="store_true")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--gemv-variants", type=int, nargs="*", default=None, metavar="M",
                    help="sweep the decode kernels for these token counts (none given: 1)")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--decode", action="store_true", help="with --bench: the 7B decode step")
    ap.add_argument("--skip-rotate-quant", action="store_true", help="with --bench: no Hadamard + quantize rows")
    ap.add_argument("--shapes", default="all", help="comma list of NxK, or 'all'")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--report", nargs="+", default=None,
                    help="no GPU: write --md from the JSON files of runs over parts of the shapes")
    args = ap.parse_args()
    if args.report:
        return report(args.report, args.md)
    cmd = "PYTHONPATH=. python3 benchmarks/kernels.py " + " ".join(sys.argv[1:])
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    result: dict = {}
    ceil = ceilings()
    result["ceilings"] = ceil
    result["command"] = cmd
    result["where"] = machine()
    print(f"copy {ceil['copy_bw'] / 1e12:.2f} TB/s  int8 {ceil['int8_ops'] / 1e12:.0f} TOPS  "
          f"bf16 {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    if args.check:
        chk = Checker()
        check(chk)
        result["check"] = dict(passed=chk.passed, failed=chk.failed)
        print(f"check: {chk.passed} passed, {len(chk.failed)} failed ({time.time() - t0:.0f}s)", flush=True)
    if args.quick_check:
        chk = Checker()
        quick_check(chk)
        result["check"] = dict(passed=chk.passed, failed=chk.failed)
        print(f"quick check: {chk.passed} passed, {len(chk.failed)} failed ({time.time() - t0:.0f}s)", flush=True)
    if args.overhead:
        result["overhead"] = overhead()
    if args.variants:
        result["variants"] = variants(ceil)
    if args.gemv_variants is not None:
        result["gemv_variants"] = [r for m in (args.gemv_variants or [1]) for r in gemv_variants(m)]
    lin, rq, dec = [], [], {}

    def save() -> None:  # after every section, so a run cut short still leaves its tables
        result.update(linear=lin, rotate_quant=rq, decode=dec)
        if args.md and args.bench:
            os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
            with open(args.md, "w") as f:
                f.write(markdown(ceil, lin, rq, dec, cmd, result["where"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    if args.bench:
        shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
        for i, (N, K) in enumerate(shapes):
            for M in MS:
                lin += bench_linear(N, K, M, ceil, decode_graph=True)  # graph replay for every M
                torch.cuda.empty_cache()
            save()
            print(f"-- {N}x{K} done ({time.time() - t0:.0f}s)", flush=True)
            if i == 1 and args.decode:  # the decode step right after the two target shapes
                for mode in ("bf16", "w4a16", "w4a4"):
                    dec[mode] = llama_decode(ceil, mode)
                save()
        if not args.skip_rotate_quant:
            rq = bench_rotate_quant(ceil)
    save()
    if args.bench:
        summary(lin)
    if "check" in result:
        print(f"check: {result['check']['passed']} passed, {len(result['check']['failed'])} failed")
    print(f"total {time.time() - t0:.0f}s")
    return 1 if result.get("check", {}).get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
