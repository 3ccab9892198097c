"""Decode-kernel sweep on the GPU: every W4A16 GEMV configuration (word GEMV, tensor-core GEMV) at the decode
shapes for M = 1 (and M = 16 at a few), the one-launch W4A8/W4A4 codes GEMV at M = 1 (from int8 codes, and with
``--dynamic`` from the bf16 activation it quantizes itself), tinygemm alongside;
each configuration is checked against the float32 reference on fresh inputs before it is timed. Times are
CUDA-graph replays cycling through weight copies of ≥ 4× L2 (``kernels.time_calls``). Exits non-zero if
any configuration the tuner is offered (``w4a16.candidates`` / ``w4ax.candidates``) computes a wrong result.

    python benchmarks/gemv_profile.py --json $OUT/gemv.json
    python benchmarks/gemv_profile.py --attention-only   # decode attention over a 768-slot cache: split-key vs SDPA
    python benchmarks/gemv_profile.py --inline-quant     # the inlined per-token quantization = the op, on the GPU
    ncu --clock-control none -k regex:gemv python benchmarks/gemv_profile.py --shapes 28672x8192 --profile
    python benchmarks/gemv_profile.py --levers --json $OUT/levers.json   # the M = 1 levers at the 7B/8B shapes

``--levers``: the M = 1 W4A16 GEMV at the 7B/8B decode shapes (``LEVER_SHAPES``): the earlier winners and the
``MMA_M1_CONFIGS`` variants, each checked before timing; TB/s of weight + scale bytes; the four fastest also
timed in a decode step's order (a CUDA graph of an elementwise kernel making x, then the GEMV of x), and the
tuner's own pick (``w4a16.linear``'s first call, into ``QCOMPILE_KERNEL_CACHE``, which a decode run in the same
call then uses) timed in that order too and checked with a row scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import n_copies, rand_weight, rel, time_calls, tinygemm_weight  # noqa: E402

from qcompile.kernels import reference  # noqa: E402
from qcompile.kernels.triton import w4a16, w4ax  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (28672, 8192)]
M16_SHAPES = [(11008, 4096), (4096, 4096), (28672, 8192)]
COPY_TBS = 4.24  # copy bandwidth measured on the lent H200 (read + write), kernels-h200.md
EXTRA_GEMV = [(16, 1, True, True), (2, 4, True, True), (4, 4, True, True), (8, 4, True, True), (2, 2, True, True)]
EXTRA_MMA = [(1, 2, 1, 1, True), (2, 2, 1, 2, True), (8, 1, 1, 8, True), (16, 2, 1, 16, True)]


def w4_bytes(N: int, K: int, g: int = 128) -> float:
    return N * K / 2 + N * (K // g) * 2


def m1_candidates(N: int, K: int):
    offered = w4a16.candidates(1, N, K, 128, True, torch.bfloat16)
    extra = [w4a16.gemv_candidate(bn, w, f, True, a) for bn, w, f, a in EXTRA_GEMV]
    extra += [w4a16.mma_candidate(*c) for c in EXTRA_MMA]
    return [(c, True) for c in offered] + [(c, False) for c in extra if c.name not in {o.name for o in offered}]


def sweep_w4a16(N: int, K: int, M: int, rows: list, bad: list) -> None:
    gen = torch.Generator(device="cuda").manual_seed(N + K + M)
    ws = [rand_weight(N, K, 128) for _ in range(n_copies(w4_bytes(N, K)))]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    floor = w4_bytes(N, K) / (COPY_TBS * 1e12) * 1e6
    tg = [tinygemm_weight(N, K, 128) for _ in range(n_copies(w4_bytes(N, K)))]
    us_tg = time_calls([lambda t=t: torch._weight_int4pack_mm(x, t[0], 128, t[1]) for t in tg], graph=True,
                       budget_s=0.08)
    del tg
    rows.append(dict(op="tinygemm", N=N, K=K, M=M, cand="tinygemm", us=us_tg, floor_us=floor))
    print(f"M={M:2d} {N}x{K} {'tinygemm':36s} {us_tg:7.1f} us  floor {floor:5.1f}", flush=True)
    # the tensor-core skinny kernel (unchanged, never the M = 1 winner) is left out at M = 1
    if M == 1:
        cands = [(c, o) for c, o in m1_candidates(N, K) if c.meta["kind"] != "skinny"]
    else:
        cands = [(c, True) for c in w4a16.candidates(M, N, K, 128, True, torch.bfloat16)]
        names = {c.name for c, _ in cands}
        cands += [(c, False) for c in map(lambda t: w4a16.mma_candidate(*t), EXTRA_MMA) if c.name not in names]
    for cand, offered in cands:
        # check on fresh inputs (asymmetric, biased) before timing
        p, s, z = rand_weight(N, K, 128, asym=True)
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        xc = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        try:
            ref = reference.linear_w4a16(xc.float(), p, s, z, 128, b.float())
            out = w4a16.run(cand, xc, p, s, z, 128, b)
            err = rel(out, ref)
            ok = bool(torch.isfinite(out).all()) and err < 8e-3
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is reported, not fatal
            print(f"M={M:2d} {N}x{K} {cand.name:36s} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            if offered:
                bad.append(f"{cand.name} {N}x{K} M={M}: {type(exc).__name__}")
            continue
        if not ok:
            print(f"M={M:2d} {N}x{K} {cand.name:36s} WRONG rel {err:.2e}", flush=True)
            if offered:
                bad.append(f"{cand.name} {N}x{K} M={M}: rel {err:.2e}")
            continue
        us = time_calls([lambda w=w, c=cand: w4a16.run(c, x, w[0], w[1], None, 128, None) for w in ws], graph=True,
                        budget_s=0.08)
        rows.append(dict(op="w4a16", N=N, K=K, M=M, cand=cand.name, us=us, floor_us=floor, rel=err, offered=offered))
        print(f"M={M:2d} {N}x{K} {cand.name:36s} {us:7.1f} us  ×tinygemm {us_tg / us:4.2f}  rel {err:.1e}"
              f"{'' if offered else '  (not offered)'}", flush=True)
    del ws
    torch.cuda.empty_cache()


def sweep_codes(N: int, K: int, rows: list, bad: list) -> None:
    """W4A8 / W4A4 at one token, g128 weights: the one-launch codes GEMV configurations (and, for the
    record, the tuner's other decode candidates), checked against ``reference.linear_w4a8``."""
    ws = [rand_weight(N, K, 128) for _ in range(n_copies(w4_bytes(N, K)))]
    floor = w4_bytes(N, K) / (COPY_TBS * 1e12) * 1e6
    for bits, sym in ((8, True), (4, True), (8, False)):
        x = torch.randn(1, K, device="cuda")
        a, sa, za = reference.quantize_per_token(x, bits, sym, 1.0)
        za = None if sym else za.reshape(-1)
        sa = sa.reshape(-1)
        for cand in w4ax.candidates(1, N, K, 128):
            kind = cand.meta.get("kind")
            if kind not in ("codes_gemv", "act_dequant_gemv"):
                continue
            p, s, z = rand_weight(N, K, 128, asym=True)
            bias = torch.randn(N, device="cuda")
            ref = reference.linear_w4a8(a, sa.reshape(1, 1), None if za is None else za.reshape(1, 1), p, s, z, 128,
                                        bias, torch.float32)
            out = w4ax.run(cand, a, sa, za, p, s, z, 128, bias.bfloat16(), torch.bfloat16)
            err = rel(out, ref)
            if not (bool(torch.isfinite(out).all()) and err < 8e-3):
                print(f"a{bits} {N}x{K} {cand.name:36s} WRONG rel {err:.2e}", flush=True)
                bad.append(f"{cand.name} {N}x{K} a{bits}: rel {err:.2e}")
                continue
            if not sym:
                continue  # checked; timed for symmetric activations (the recipes' decode path)
            us = time_calls([lambda w=w, c=cand: w4ax.run(c, a, sa, None, w[0], w[1], None, 128, None, torch.bfloat16)
                             for w in ws], graph=True, budget_s=0.08)
            rows.append(dict(op=f"w4a{bits}", N=N, K=K, M=1, cand=cand.name, us=us, floor_us=floor, rel=err))
            print(f"a{bits} {N}x{K} {cand.name:36s} {us:7.1f} us  rel {err:.1e}", flush=True)
    del ws
    torch.cuda.empty_cache()


def sweep_dynamic(N: int, K: int, rows: list, bad: list) -> None:
    """W4A8 / W4A4 at one token from the bf16 activation (``linear_w4ax_dynamic``): every candidate (the GEMV
    that quantizes x itself, and quantize-then-codes-GEMV, two launches) checked against the reference
    quantize-then-linear and timed as graph replay, beside the tuned W4A16 linear on the same weights."""
    ws = [rand_weight(N, K, 128) for _ in range(n_copies(w4_bytes(N, K)))]
    floor = w4_bytes(N, K) / (COPY_TBS * 1e12) * 1e6
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w4a16.linear(x, *ws[0][:2], None, 128, None)  # tuned once (do_bench), then timed as the others
    us16 = time_calls([lambda w=w: w4a16.linear(x, w[0], w[1], None, 128, None) for w in ws], graph=True,
                      budget_s=0.08)
    rows.append(dict(op="w4a16-tuned", N=N, K=K, M=1, cand="w4a16.linear", us=us16, floor_us=floor))
    print(f"a16 {N}x{K} {'w4a16.linear (tuned)':36s} {us16:7.1f} us", flush=True)
    for bits, sym in ((8, True), (4, True), (4, False)):
        for cand in [*w4a16.act_candidates(), *w4ax.dynamic_candidates()]:
            p, s, z = rand_weight(N, K, 128, asym=True)
            bias = torch.randn(N, device="cuda").bfloat16()
            xc = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            a, sa, za = reference.quantize_per_token(xc, bits, sym, 0.9)
            ref = reference.linear_w4a8(a, sa, None if sym else za, p, s, z, 128, bias, torch.float32)
            try:  # the same codes give ~1e-6 (float32 sums in another order); one code off by one ~1e-2
                out = w4ax.run_dynamic(cand, xc, bits, sym, 0.9, p, s, z, 128, bias, torch.float32)
                err = rel(out, ref)
                ok = bool(torch.isfinite(out).all()) and err < 1e-4
            except Exception as exc:  # noqa: BLE001
                ok, err = False, float("nan")
                print(f"dyn a{bits} {N}x{K} {cand.name} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            if not ok:
                print(f"dyn a{bits}{'' if sym else ' asym'} {N}x{K} {cand.name:36s} WRONG rel {err:.2e}", flush=True)
                bad.append(f"{cand.name} {N}x{K} a{bits}: rel {err:.2e}")
                continue
            if not sym:
                continue
            us = time_calls([lambda w=w, c=cand: w4ax.run_dynamic(c, x, bits, sym, 1.0, w[0], w[1], None, 128, None,
                                                                  torch.bfloat16) for w in ws], graph=True,
                            budget_s=0.08)
            rows.append(dict(op=f"dyn-w4a{bits}", N=N, K=K, M=1, cand=cand.name, us=us, floor_us=floor, rel=err))
            print(f"dyn a{bits} {N}x{K} {cand.name:36s} {us:7.1f} us  vs w4a16 {us16:5.1f}  rel {err:.1e}",
                  flush=True)
    del ws
    torch.cuda.empty_cache()


LEVER_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (11008, 4096), (6144, 4096),
                (28672, 4096), (4096, 14336)]
# the earlier sweep's winners among the configurations offered before these variants (kernels-h200.md, 14:38 run)
LEVER_BASE = {"mma_gemv_w8_s2_k1_q4_ahead", "mma_gemv_w4_s2_k1_q4_ahead", "mma_gemv_w8_s2_k1_q8_ahead",
              "mma_gemv_w16_s2_k1_q16_ahead", "gemv_n8_b256_w2_fused", "gemv_n8_b256_w2_fused_ahead",
              "gemv_n8_b512_w4_fused_ahead"}


def _lever_check(cand, N: int, K: int, row_scale: bool = False) -> float:
    """Relative error of ``cand`` against the float32 reference on fresh asymmetric, biased inputs."""
    p, s, z = rand_weight(N, K, 128, asym=True)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    xc = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    r = torch.rand(1, device="cuda") + 0.5 if row_scale else None
    ref = reference.linear_w4a16(xc.float(), p, s, z, 128, None)
    ref = (ref if r is None else ref * r) + b.float()
    out = w4a16.run(cand, xc, p, s, z, 128, b, r)
    return rel(out, ref) if bool(torch.isfinite(out).all()) else float("inf")


def sweep_levers(N: int, K: int, rows: list, bad: list) -> None:
    """Every variant alone (graph replays of GEMVs back to back), then the four fastest and the tuner's pick in a
    decode step's order: a CUDA graph of an elementwise kernel making x, then the GEMV of x. The tuner picks as
    ``w4a16.linear`` does on its first call (``autotune.step_time``; into ``QCOMPILE_KERNEL_CACHE``, which a decode
    run in the same call then uses), and its pick is checked with a row scale (the codes route's)."""
    ws = [rand_weight(N, K, 128) for _ in range(n_copies(w4_bytes(N, K)))]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    nbytes = w4_bytes(N, K)
    floor = nbytes / (COPY_TBS * 1e12) * 1e6
    tg = [tinygemm_weight(N, K, 128) for _ in range(n_copies(nbytes))]
    us_tg = time_calls([lambda t=t: torch._weight_int4pack_mm(x, t[0], 128, t[1]) for t in tg], graph=True,
                       budget_s=0.05)
    del tg
    rows.append(dict(op="tinygemm", N=N, K=K, M=1, cand="tinygemm", us=us_tg, floor_us=floor))
    print(f"{N}x{K} {'tinygemm':40s} {us_tg:6.1f} us {nbytes / us_tg / 1e6:5.2f} TB/s", flush=True)
    new = {w4a16.mma_candidate(*c).name for c in w4a16.MMA_M1_CONFIGS}
    offered = w4a16.candidates(1, N, K, 128, True, torch.bfloat16)
    cands = [c for c in offered if c.name in new | LEVER_BASE]
    by_name = {c.name: c for c in offered}
    alone, ordered = {}, {}
    for cand in cands:
        try:
            err = _lever_check(cand, N, K)
            if not err < 8e-3:
                raise ValueError(f"WRONG rel {err:.2e}")
            alone[cand.name] = time_calls([lambda w=w, c=cand: w4a16.run(c, x, w[0], w[1], None, 128, None)
                                           for w in ws], graph=True, budget_s=0.04)
        except Exception as exc:  # noqa: BLE001 - reported, never chosen
            print(f"{N}x{K} {cand.name:40s} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            bad.append(f"{cand.name} {N}x{K}: {type(exc).__name__} {str(exc)[:80]}")
            continue
        us = alone[cand.name]
        rows.append(dict(op="w4a16", N=N, K=K, M=1, cand=cand.name, us=us, floor_us=floor, rel=err,
                         tbs=nbytes / us / 1e6, new=cand.name in new))
        print(f"{N}x{K} {cand.name:40s} {us:6.1f} us {nbytes / us / 1e6:5.2f} TB/s  ×tinygemm {us_tg / us:4.2f}  "
              f"rel {err:.1e}{'  (new)' if cand.name in new else ''}", flush=True)
    w4a16.linear(x, ws[0][0], ws[0][1], None, 128, None)  # the tuner's own pick, timed as a decode step runs it
    pick = w4a16.chosen_candidate(x, ws[0][0], None, 128, None).name
    x0 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    xs = torch.empty_like(x0)
    for name in dict.fromkeys([*sorted(alone, key=alone.get)[:4], pick]):
        cand = by_name[name]

        def pair(w, c=cand):
            torch.mul(x0, 1.0001, out=xs)
            return w4a16.run(c, xs, w[0], w[1], None, 128, None)
        try:
            ordered[name] = time_calls([lambda w=w: pair(w) for w in ws], graph=True, budget_s=0.04)
        except Exception as exc:  # noqa: BLE001
            print(f"{N}x{K} in order {name} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            bad.append(f"{name} {N}x{K} in order: {type(exc).__name__}")
            continue
        rows.append(dict(op="pair", N=N, K=K, M=1, cand=name, us=ordered[name], alone=alone.get(name),
                         floor_us=floor))
        print(f"{N}x{K} elementwise + {name:40s} {ordered[name]:6.1f} us (alone {alone.get(name, float('nan')):.1f})",
              flush=True)
    err = _lever_check(by_name[pick], N, K, row_scale=True)
    win = min(ordered, key=ordered.get) if ordered else None
    print(f"{N}x{K} tuner's pick {pick} (in order {ordered.get(pick, float('nan')):.1f} us; fastest in order "
          f"{win} {ordered.get(win, float('nan')):.1f}); with a row scale: rel {err:.1e}", flush=True)
    if not err < 8e-3:
        bad.append(f"{pick} {N}x{K} row scale: rel {err:.2e}")
    rows.append(dict(op="winner", N=N, K=K, M=1, cand=pick, us=alone.get(pick), ordered=ordered.get(pick),
                     best_ordered=win, best_ordered_us=ordered.get(win), floor_us=floor))
    del ws
    torch.cuda.empty_cache()


def lever_summary(rows: list) -> str:
    lines = ["| N×K | tinygemm µs | before µs (earlier configs, alone) | best alone µs | TB/s | × tinygemm | "
             "variant | floor µs | tuner's pick (elementwise + GEMV µs) |", "|---|---|---|---|---|---|---|---|---|"]
    for N, K in LEVER_SHAPES:
        tg = best(rows, "tinygemm", N, K, 1)
        mine = [r for r in rows if r["op"] == "w4a16" and r["N"] == N and r["K"] == K]
        win = next((r for r in rows if r["op"] == "winner" and r["N"] == N and r["K"] == K), None)
        if not tg or not mine:
            continue
        old = min((r for r in mine if not r["new"]), key=lambda r: r["us"], default=None)
        b = min(mine, key=lambda r: r["us"])
        pick = (f"{win['cand']} ({win['ordered']:.1f}; best {win['best_ordered']} {win['best_ordered_us']:.1f})"
                if win and win.get("ordered") else (win or {}).get("cand", ""))
        lines.append(f"| {N}×{K} | {tg['us']:.1f} | {old['us'] if old else float('nan'):.1f} | {b['us']:.1f} | "
                     f"{b['tbs']:.2f} | {tg['us'] / b['us']:.2f} | {b['cand']} | {b['floor_us']:.1f} | {pick} |")
    pairs = [r for r in rows if r["op"] == "pair"]
    if pairs:
        lines += ["", "| N×K | variant | elementwise + GEMV µs | GEMV alone µs |", "|---|---|---|---|"]
        lines += [f"| {r['N']}×{r['K']} | {r['cand']} | {r['us']:.1f} | "
              f"{'' if r['alone'] is None else format(r['alone'], '.1f')} |" for r in pairs]
    return "\n".join(lines)


def check_codes_route(bad: list) -> None:
    """The exact codes route on the GPU (the tuned W4A16 GEMV with the token's scale as its row scale) against
    ``reference.linear_w4a8`` in bfloat16: outputs that differ (float32 summation order can move a tie by one
    ulp) and the largest difference, at two shapes, symmetric and asymmetric 8-bit codes."""
    from qcompile.kernels.codes_route import linear_codes_w4a16

    for N, K in ((4096, 4096), (11008, 4096)):
        for sym in (True, False):
            p, s, z = rand_weight(N, K, 128, asym=not sym)
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16) * 2
            a, sa, za = reference.quantize_per_token(x, 8, sym, 1.0)
            za = None if sym else za
            want = reference.linear_w4a8(a, sa, za, p, s, z, 128, b, torch.bfloat16)
            got = linear_codes_w4a16(a, sa, za, p, s, z, 128, b, torch.bfloat16)
            got = linear_codes_w4a16(a, sa, za, p, s, z, 128, b, torch.bfloat16)  # the planned call
            diff = (got.float() - want.float()).abs()
            n_diff = int((got != want).sum())
            ok = float(diff.max()) <= 2 ** -7 * float(want.float().abs().max()) and n_diff <= N // 100
            print(f"codes route {N}x{K} {'sym' if sym else 'asym'}: {n_diff} of {N} outputs differ from "
                  f"linear_w4a8's, max |diff| {float(diff.max()):.2e} (max |y| {float(want.float().abs().max()):.2e})"
                  f"{'' if ok else '  WRONG'}", flush=True)
            if not ok:
                bad.append(f"codes route {N}x{K} sym={sym}")


def best(rows: list, op: str, N: int, K: int, M: int, offered_only: bool = True) -> dict | None:
    pick = [r for r in rows if r["op"] == op and r["N"] == N and r["K"] == K and r["M"] == M
            and (r.get("offered", True) or not offered_only)]
    return min(pick, key=lambda r: r["us"]) if pick else None


def summary(rows: list) -> str:
    lines = ["| N×K | M | tinygemm µs | best offered | µs | × tinygemm | best of all | µs | floor µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = {(r["N"], r["K"], r["M"]) for r in rows if r["op"] == "w4a16"}
    for N, K, M in sorted(keys, key=lambda t: (t[2], t[0] * t[1])):
        tg, b, a = best(rows, "tinygemm", N, K, M), best(rows, "w4a16", N, K, M), best(rows, "w4a16", N, K, M, False)
        lines.append(f"| {N}×{K} | {M} | {tg['us']:.1f} | {b['cand']} | {b['us']:.1f} | {tg['us'] / b['us']:.2f} | "
                     f"{a['cand']} | {a['us']:.1f} | {b['floor_us']:.1f} |")
    for N, K in sorted({(r["N"], r["K"]) for r in rows if r["op"] == "w4a16-tuned"}):
        w16 = best(rows, "w4a16-tuned", N, K, 1)
        for op in ("dyn-w4a8", "dyn-w4a4"):
            b = best(rows, op, N, K, 1)
            two = best([r for r in rows if r["cand"] == "quantize_then_linear"], op, N, K, 1)
            if b:
                lines.append(f"| {N}×{K} | 1 | {op} | {b['cand']} | {b['us']:.1f} | vs w4a16 {w16['us']:.1f} | "
                             f"two launches | {two['us'] if two else float('nan'):.1f} | {b['floor_us']:.1f} |")
    for N, K in sorted({(r["N"], r["K"]) for r in rows if r["op"] in ("w4a8", "w4a4")}):
        w16 = best(rows, "w4a16", N, K, 1)
        for op in ("w4a8", "w4a4"):
            b = best(rows, op, N, K, 1)
            if b:
                lines.append(f"| {N}×{K} | 1 | {op} | {b['cand']} | {b['us']:.1f} | vs w4a16 {w16['us']:.1f} | | | |")
    for r in rows:
        if r["op"] == "attention":
            lines.append(f"| attention {r['hq']}/{r['hk']}×{r['t']} ({r['seen']} kept) | 1 | {r['variant']} | | "
                         f"{r['us']:.1f} | {r['tbs']} TB/s | rel {r['rel']:.1e} | | |")
    return "\n".join(lines)


ATTENTION = [(32, 32, 768, 128), (32, 8, 768, 128)]  # q heads, kv heads, cache slots, head dim (7B, 8B)


def sweep_attention(hq: int, hk: int, t: int, d: int, rows: list, bad: list, seen: int = 640) -> None:
    """One query over a static cache of ``t`` slots with ``seen`` kept: ``decode_attention`` (split-key, unrepeated
    cache) against SDPA on the repeated cache (what the captured graph runs), both checked against float64."""
    import torch.nn.functional as F

    from qcompile.kernels.triton import decode_attention as tda

    caches = max(2, n_copies(2 * hk * t * d * 2))
    qs = [torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(caches)]
    ks = [torch.randn(1, hk, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(caches)]
    vs = [torch.randn(1, hk, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(caches)]
    mask = (torch.arange(t, device="cuda") < seen)[None, None, None]
    g = hq // hk
    rep = lambda x: x[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2)  # noqa: E731
    ref = reference.decode_attention(qs[0].double(), ks[0].double(), vs[0].double(), mask.cpu().cuda(), d ** -0.5)
    variants = {
        "split-key decode_attention": lambda i: tda.decode_attention(qs[i], ks[i], vs[i], mask, d ** -0.5),
        "SDPA, repeated cache, bool mask": lambda i: F.scaled_dot_product_attention(
            qs[i], rep(ks[i]), rep(vs[i]), attn_mask=mask, scale=d ** -0.5),
    }
    moved = 2 * hk * seen * d * 2
    for name, fn in variants.items():
        err = rel(fn(0).double(), ref)
        if not err < 1e-2:
            bad.append(f"attention {name} {hq}/{hk}x{t}: rel {err:.2e}")
        us = time_calls([lambda i=i: fn(i) for i in range(caches)], graph=True)
        rows.append(dict(op="attention", variant=name, hq=hq, hk=hk, t=t, seen=seen, us=round(us, 2),
                         rel=float(err), tbs=round(moved / us / 1e6, 2)))
        print(f"attention {hq}/{hk} heads x {t} slots ({seen} kept) {name}: {us:.2f} us, {moved / us / 1e6:.2f} TB/s "
              f"of kept K/V, rel {err:.1e}", flush=True)


INLINE_CONFIGS = ((8, True, 1.0), (4, True, 1.0), (4, True, 0.9), (8, False, 1.0), (4, False, 0.9))  # bits, sym, clip


def check_inline_quant(dev: str = "cuda") -> int:
    """``quant_inline``: Inductor's code for the inlined quantization (GPU, with the backend's patches) against the
    op (Triton ``rotate_quant``) bit for bit, standalone at decode widths (a row of exact .5 ties, random rows),
    fused after an RMSNorm through the backend (inlined vs the op), and a 2-layer 7B-shaped W4A8 model's logits
    through the backend against the eager lowered model's. Prints a table; non-zero exit on any mismatch."""
    import os

    import torch._dynamo

    from qcompile.export.backend import qcompile_backend
    from qcompile.kernels.quant_inline import INDUCTOR_PATCHES, quantize_per_token_inline

    op = torch.ops.qcompile.quantize_per_token.default
    lines, bad = [], []

    def run_all(x):
        return [t for b, s, c in INLINE_CONFIGS for t in quantize_per_token_inline(x, b, s, c)]

    def want_all(x):
        return [t for b, s, c in INLINE_CONFIGS for t in op(x, b, s, c, False, 0)]

    def diff(got, want):
        return sum(int((g.view(torch.int32) != w.view(torch.int32)).sum()) if g.dtype == torch.float32
                   else int((g != w).sum()) for g, w in zip(got, want))

    for K in (4096, 11008, 14336):
        gen = torch.Generator(device=dev).manual_seed(K)
        x = torch.randn(64, K, device=dev, generator=gen) * 3
        x[0] = (torch.arange(K, device=dev) % 200 - 99.5)  # exact ties at scale 1 (8-bit, max|x| = 127)
        x[0, 0] = 127.0
        x = x.bfloat16()
        torch._dynamo.reset()
        fn = torch.compile(run_all, fullgraph=True, dynamic=False, options=dict(INDUCTOR_PATCHES))
        n = diff(fn(x), want_all(x))
        n_ref = diff(want_all(x), [t.to(dev) for b, s, c in INLINE_CONFIGS
                                   for t in reference.quantize_per_token(x.cpu(), b, s, c)])
        lines.append(f"| standalone 64x{K} bf16, 5 configs | {n} | op vs CPU reference: {n_ref} |")
        print(lines[-1], flush=True)
        bad += [f"standalone K={K}: {n} differ"] if n else []

    class NormQuant(torch.nn.Module):
        def forward(self, h, w):
            hf = h.float()
            x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
            a = op(x, 8, True, 1.0, False, 0)
            b = op(x, 4, True, 0.9, False, 0)
            return a[0], a[1], a[2], b[0], b[1], b[2]

    for K in (4096, 14336):
        gen = torch.Generator(device=dev).manual_seed(7 + K)
        h = torch.randn(1, K, device=dev, generator=gen) * 4
        w = (torch.rand(K, device=dev, generator=gen) + 0.5).bfloat16()
        outs = {}
        for on in ("1", "0"):
            os.environ["QCOMPILE_INLINE_QUANT"] = on
            torch._dynamo.reset()
            outs[on] = torch.compile(NormQuant(), backend=qcompile_backend, fullgraph=True, dynamic=False)(h, w)
        n = diff(outs["1"], outs["0"])
        lines.append(f"| RMSNorm + 2 quantizations 1x{K}, backend inlined vs op | {n} | |")
        bad += [f"fused K={K}: {n} differ"] if n else []
    os.environ["QCOMPILE_INLINE_QUANT"] = "1"

    import dataclasses

    import qcompile.api as qc
    from decode import build
    from qcompile.decoding import CachedDecoder
    from qcompile.passes.kv_cache import CacheLayout, add_kv_cache
    from qcompile.passes.lower import lower
    from qcompile.recipe import load_recipe

    rtn = load_recipe("rtn")
    rtn = dataclasses.replace(rtn, weights=dataclasses.replace(rtn.weights, clip_search=False))
    lowered = lower(qc.compile(qc.capture(build("llama2-7b", 2, dev)), rtn.with_bits(group=128, a=8),
                               progress=False))
    layout = CacheLayout.of(lowered.model_map)
    step = add_kv_cache(lowered).module
    eager = CachedDecoder(step, layout, torch.bfloat16, dev)
    ids = torch.randint(0, 32000, (1, 17), device=dev, generator=torch.Generator(device=dev).manual_seed(3))
    _, cache = eager.step(ids[:, :16], eager.empty_cache(1))
    want, _ = eager.step(ids[:, 16:], cache)  # one decode step, the eager lowered model (the ops)
    got = {}
    for name, inline, route in (("inlined", "1", "0"), ("op", "0", "0"), ("inlined + W4A16 GEMV route", "1", "1")):
        os.environ["QCOMPILE_INLINE_QUANT"], os.environ["QCOMPILE_CODES_W4A16"] = inline, route
        torch._dynamo.reset()
        fast = CachedDecoder(torch.compile(step, backend=qcompile_backend, fullgraph=True, dynamic=False), layout,
                             torch.bfloat16, dev)
        got[name] = fast.step(ids[:, 16:], cache)[0].float()
        err = rel(got[name], want.float())
        lines.append(f"| 2-layer 7B W4A8 decode-step logits, backend ({name}) vs eager lowered | rel {err:.2e} | |")
        bad += [f"logits ({name}) rel {err:.2e}"] if not err < 1e-2 else []
    os.environ["QCOMPILE_INLINE_QUANT"], os.environ["QCOMPILE_CODES_W4A16"] = "1", "0"
    lines.append(f"| same: inlined vs op | rel {rel(got['inlined'], got['op']):.2e} | "
                 f"equal: {torch.equal(got['inlined'], got['op'])} |")
    print("\n| check | elements differing (bit for bit) | note |\n|---|---|---|\n" + "\n".join(lines), flush=True)
    if bad:
        print("INLINE QUANT MISMATCH: " + "; ".join(bad), flush=True)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--m16", default=",".join(f"{n}x{k}" for n, k in M16_SHAPES), help="shapes swept at M = 16")
    ap.add_argument("--codes", default="4096x4096,11008x4096,4096x11008", help="shapes of the W4A8/W4A4 rows")
    ap.add_argument("--dynamic", default="", help="shapes of the W4A8/W4A4 rows from the bf16 activation "
                    "(linear_w4ax_dynamic), e.g. 4096x4096,12288x4096,22016x4096,4096x11008")
    ap.add_argument("--attention", default="", help="attention shapes HQxHKVxTxD (e.g. 32x32x768x128)")
    ap.add_argument("--attention-only", action="store_true", help="only the attention rows (the default shapes)")
    ap.add_argument("--inline-quant", action="store_true", help="only the inlined-quantization checks (quant_inline)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="launch the offered M = 1 candidates once each (ncu)")
    ap.add_argument("--levers", default=None, nargs="?", const=",".join(f"{n}x{k}" for n, k in LEVER_SHAPES),
                    help="only the M = 1 levers sweep (default: the 7B/8B decode shapes)")
    args = ap.parse_args()
    parse = lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",") if t]  # noqa: E731
    if args.inline_quant:
        return check_inline_quant()
    if args.levers is not None:
        t0 = time.time()
        rows, bad = [], []
        for N, K in parse(args.levers):
            sweep_levers(N, K, rows, bad)
        check_codes_route(bad)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rows=rows, bad=bad, device=torch.cuda.get_device_name(),
                                                       torch=torch.__version__, seconds=round(time.time() - t0)),
                                                  indent=1))
        print(f"\nlevers sweep took {time.time() - t0:.0f} s\n" + lever_summary(rows), flush=True)
        if bad:
            print("WRONG OR FAILED: " + "; ".join(bad), flush=True)
        return 1 if bad else 0
    if args.profile:
        for N, K in parse(args.shapes):
            p, s, _ = rand_weight(N, K, 128)
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            for cand, _ in m1_candidates(N, K):
                w4a16.run(cand, x, p, s, None, 128, None)
        torch.cuda.synchronize()
        return 0
    t0 = time.time()
    rows: list = []
    bad: list = []
    for shape in ATTENTION if args.attention_only and not args.attention else parse(args.attention):
        sweep_attention(*shape, rows, bad)
    for N, K in parse("" if args.attention_only else args.shapes):
        sweep_w4a16(N, K, 1, rows, bad)
    for N, K in parse("" if args.attention_only else args.m16):
        sweep_w4a16(N, K, 16, rows, bad)
    for N, K in parse("" if args.attention_only else args.codes):
        sweep_codes(N, K, rows, bad)
    for N, K in parse(args.dynamic):
        sweep_dynamic(N, K, rows, bad)
    text = summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, bad=bad, device=torch.cuda.get_device_name(),
                                                   torch=torch.__version__, seconds=round(time.time() - t0)), indent=1))
    print(f"\nsweep took {time.time() - t0:.0f} s\n" + text, flush=True)
    if bad:
        print("WRONG OR FAILED (offered to the tuner): " + "; ".join(bad), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
