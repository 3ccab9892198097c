"""The quantization pipeline on a GPU at Llama-2-7B and -70B shapes: time and memory per block, extrapolated.

Random weights of the real shapes (LlamaConfig with the real hidden/FFN/heads and a few layers): every
stage (capture, the recipe's passes, GPTQ block by block) is timed; passes and GPTQ are linear in the
number of blocks, so the whole model's time is ``fixed + per_block × layers`` where the per-block time is
measured on ``--layers`` blocks. Peak GPU memory is ``torch.cuda.max_memory_allocated`` per stage; host
memory is the process's peak RSS.

    python benchmarks/gpu_pipeline.py --shape 7b --recipe quarot+gptq --layers 2 --samples 128 --seq 2048
    python benchmarks/gpu_pipeline.py --shape 70b --recipe gptq --a 16 --kv 16 --layers 1 --json out.json

Under ``torchrun --nproc-per-node 2`` GPTQ is shared out among the processes (``passes.distributed``: one GPU
each, the calibration windows split, Hessians all-reduced, a stage's linears dealt out and broadcast); every
rank builds the same random model. ``--compare-single`` then also runs the one-process path on rank 0's GPU
(the other ranks wait) and reports both times and how many codes agree:

    torchrun --nproc-per-node 2 benchmarks/gpu_pipeline.py --shape 70b --recipe gptq --a 16 --kv 16 --layers 2 \
        --tf32 --compare-single
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import resource
import time

import torch

SHAPES = {  # hidden, ffn, heads, kv heads, layers of the real model, vocab
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               real_layers=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                real_layers=80, vocab_size=32000),
}


def build(shape: str, layers: int, seed: int = 0, shrink: int = 1, init_on=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SHAPES[shape])
    real = s.pop("real_layers")
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        s[k] //= shrink
    config = LlamaConfig(**s, num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False,
                         use_cache=False)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator(device=init_on or "cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=g.device))
            elif init_on is not None:  # drawn on the GPU (other values than the CPU's draws), copied home
                p.copy_(torch.empty(p.shape, device=init_on).normal_(0, 0.02, generator=g))
            else:
                p.normal_(0, 0.02, generator=g)
        model.model.rotary_emb.__init__(config)  # inv_freq, left empty by to_empty
    return model, real


def warm_up(dev: torch.device) -> None:
    """cuBLAS, cuSOLVER, the allocator and GPTQ's fused column loop (Triton compiles it at its first call in a
    process: ≈ 1 s, which a first timed run would otherwise carry and a second not) started before anything is
    timed."""
    a = torch.randn(512, 512, device=dev)
    torch.linalg.cholesky(a @ a.T + 512 * torch.eye(512, device=dev))
    if dev.type == "cuda":
        from qcompile.quant.gptq import damped_inverse_cholesky
        from qcompile.quant.gptq_fused import fused_block_columns

        U = damped_inverse_cholesky(a.T @ a / 512)[:128, :128].contiguous()
        w = torch.randn(64, 128, device=dev) * 0.02
        s = (w.abs().amax(1, keepdim=True) / 7).expand(64, 128).contiguous()
        fused_block_columns(w, U, (s, torch.full_like(s, 8.0)), 15)
    torch.cuda.synchronize()


def factor_check(dev: torch.device, n: int = 28672, rows: int = 4096) -> dict:
    """GPTQ's factor U of ``(H + 0.01·mean(diag H)·I)⁻¹`` by its two methods (``gptq.damped_inverse_cholesky``:
    ``inverse``, the reference's; ``reversed``, one Cholesky and one triangular inverse), each under TF32 (the
    last stop's benchmark setting, which reached the factor) and in IEEE float32 (as shipped), against the float64
    factor of the same float32 H: ``‖U − U64‖/‖U64‖``, seconds. H = XᵀX/m for X [2n, n] random normal ("plain")
    and with columns scaled by e^(1.5·N(0,1)) ("outliers": an ill-conditioned H). Then GPTQ (W [rows, n] ~
    N(0, 0.02²), W4 g128 min/max) with each factor in the same loop, and with the last stop's whole path (inverse,
    TF32 in the factor and in the updates): the share of codes equal to float64's and the GPTQ objective
    tr(ΔW·H·ΔWᵀ) relative to float64's."""
    from unittest import mock

    import qcompile.quant.gptq as gptq_mod
    from qcompile.quant.formats import QuantSpec

    def clock(fn):
        torch.cuda.synchronize()
        t = time.time()
        r = fn()
        torch.cuda.synchronize()
        return r, round(time.time() - t, 4)

    def no_ieee(t):  # the caller's TF32 setting reaches cuBLAS (the code before this stop)
        return contextlib.nullcontext()

    spec = QuantSpec(4, False, "group", 128)
    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for kind in ("plain", "outliers"):
        x = torch.randn(2 * n, n, device=dev, generator=g)
        if kind == "outliers":
            x *= (1.5 * torch.randn(n, device=dev, generator=g)).exp()
        torch.backends.cuda.matmul.allow_tf32 = False
        H = x.T @ x / x.shape[0]
        del x
        torch.cuda.empty_cache()
        H64 = H.double()
        U64, out[f"{kind}_float64_s"] = clock(lambda: gptq_mod.damped_inverse_cholesky(H64, method="inverse"))
        ref = U64.norm()
        U = {}
        for m in ("inverse", "reversed"):
            for tf32 in (True, False):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                with mock.patch.object(gptq_mod, "_ieee_float32", no_ieee):
                    gptq_mod.damped_inverse_cholesky(H[:1024, :1024], method=m)  # warm
                    u, t = clock(lambda: gptq_mod.damped_inverse_cholesky(H, method=m))
                key = f"{m}_{'tf32' if tf32 else 'ieee'}"
                out[f"{kind}_{key}_s"] = t
                out[f"{kind}_{key}_rel_diff_to_float64"] = float((u.double() - U64).norm() / ref)
                U[key] = u
        torch.backends.cuda.matmul.allow_tf32 = False
        whole = gptq_mod._reversed_lower_inverse  # reversed with L⁻¹ from one solve against I (n³, not n³/3)
        with mock.patch.object(gptq_mod, "_reversed_lower_inverse", lambda L, **k: whole(L, block=L.shape[0], **k)):
            u, out[f"{kind}_reversed_one_solve_ieee_s"] = clock(
                lambda: gptq_mod.damped_inverse_cholesky(H, method="reversed"))
        out[f"{kind}_reversed_one_solve_ieee_rel_diff_to_float64"] = float((u.double() - U64).norm() / ref)
        del u
        W = torch.randn(rows, n, device=dev, generator=g) * 0.02

        def run(u, tf32=False):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            with mock.patch.object(gptq_mod, "damped_inverse_cholesky", lambda *a, **k: u), \
                    mock.patch.object(gptq_mod, "_ieee_float32", no_ieee if tf32 else gptq_mod._ieee_float32):
                q = gptq_mod.gptq_quantize(W, H, spec)
            torch.backends.cuda.matmul.allow_tf32 = False
            d = (W - q.weight).double()
            return q.codes, float(((d @ H64) * d).sum())

        codes64, loss64 = run(U64.float())
        for key, (u, tf32) in {"inverse_ieee": (U["inverse_ieee"], False), "reversed_ieee": (U["reversed_ieee"], False),
                               "reversed_tf32": (U["reversed_tf32"], False),
                               "last_stop_inverse_tf32_updates_tf32": (U["inverse_tf32"], True)}.items():
            c, loss = run(u, tf32)
            out[f"{kind}_codes_{key}_equal_to_float64"] = round(float((c == codes64).float().mean()), 6)
            out[f"{kind}_objective_{key}_over_float64"] = round(loss / loss64, 7)
        del H, H64, U64, U, W
        torch.cuda.empty_cache()
    return out


def split_gptq(parts: dict):
    """Seconds inside GPTQ's quantize phase by part, the device synchronized around each call: the factor
    (``damped_inverse_cholesky``), the clip search (``mse_qparams``), the fused column loops, and each
    ``Ranks.agree`` (a rank's wait for the others at the end of a step), by the step's kind."""
    from unittest import mock

    import qcompile.quant.gptq as gptq_mod
    import qcompile.quant.gptq_fused as fused_mod
    from qcompile.passes.distributed import Ranks

    def timed(fn, key):
        def call(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = fn(*a, **k)
            torch.cuda.synchronize()
            name = key(a) if callable(key) else key
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
            return r
        return call

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(gptq_mod, "damped_inverse_cholesky",
                                          timed(gptq_mod.damped_inverse_cholesky, "factor")))
    stack.enter_context(mock.patch.object(gptq_mod, "mse_qparams", timed(gptq_mod.mse_qparams, "clip search")))
    stack.enter_context(mock.patch.object(fused_mod, "fused_block_columns",
                                          timed(fused_mod.fused_block_columns, "column loops")))
    stack.enter_context(mock.patch.object(Ranks, "agree", timed(Ranks.agree, lambda a: "agree: " + a[2].split()[0])))
    return stack


def column_loops(shape: str, dev: torch.device, group: int = 128, shrink: int = 1, eager: bool = True) -> dict:
    """GPTQ alone on one block's linears of ``shape`` (random W, H of random inputs): seconds per block for
    each linear on its own with the eager column loop (the previous path), the stages' stacked rows eager, and
    stacked with the CUDA-graph loop (the first call of each shape captures; a second, timed, replays), and
    stacked with the fused Triton loop (``quant.gptq_fused``) in both roundings of ``W − e·U`` (``fma``: one
    rounding; ``mul``: the product rounded first); whether each result equals the graphed one bit for bit, and
    the share of equal codes. ``eager=False`` skips the two eager rows (minutes at the 70B shape)."""
    from unittest import mock

    import qcompile.quant.gptq as gptq_mod
    from qcompile.quant.formats import QuantSpec
    from qcompile.quant.gptq import gptq_quantize
    from qcompile.quant.gptq_fused import fused_block_columns

    s = SHAPES[shape]
    d, f = s["hidden_size"] // shrink, s["intermediate_size"] // shrink
    kv = d * s["num_key_value_heads"] // s["num_attention_heads"]
    stages = [(d, [d, kv, kv]), (d, [d]), (d, [f, f]), (f, [d])]  # (in, outs): q|k|v, o, gate|up, down
    spec = QuantSpec(4, False, "group", group)
    g = torch.Generator(device=dev).manual_seed(0)
    times = {"per_linear_eager_s": 0.0, "stacked_eager_s": 0.0, "stacked_graph_first_s": 0.0,
             "stacked_graph_s": 0.0, "fused_fma_first_s": 0.0, "fused_fma_s": 0.0, "fused_mul_s": 0.0}
    equal = True
    same = {"fma": [0, True], "mul": [0, True]}
    codes_total = 0

    def clock(fn):
        torch.cuda.synchronize()
        t = time.time()
        out = fn()
        torch.cuda.synchronize()
        return out, time.time() - t

    def fused(fma: bool):
        with mock.patch.object(gptq_mod, "_use_fused", lambda *a: True), \
                mock.patch("qcompile.quant.gptq_fused.fused_block_columns",
                           lambda *a, **k: fused_block_columns(*a, **{**k, "fma": fma})):
            return gptq_quantize(W, H, spec)

    for k, outs in stages:
        x = torch.randn(2 * k, k, device=dev, generator=g)
        H = x.T @ x / x.shape[0]
        del x
        ws = [torch.randn(n, k, device=dev, generator=g) * 0.02 for n in outs]
        W = torch.cat(ws)
        if eager:
            for w in ws:
                times["per_linear_eager_s"] += clock(lambda: gptq_quantize(w, H, spec, cuda_graph=False,
                                                                           fused=False))[1]
            eager_q, t = clock(lambda: gptq_quantize(W, H, spec, cuda_graph=False, fused=False))
            times["stacked_eager_s"] += t
        if dev.type == "cuda":
            times["stacked_graph_first_s"] += clock(lambda: gptq_quantize(W, H, spec, cuda_graph=True,
                                                                          fused=False))[1]
            graphed, t = clock(lambda: gptq_quantize(W, H, spec, cuda_graph=True, fused=False))
            times["stacked_graph_s"] += t
            if eager:
                equal &= torch.equal(eager_q.codes, graphed.codes) and torch.equal(eager_q.weight, graphed.weight)
            times["fused_fma_first_s"] += clock(lambda: fused(True))[1]
            for name, fma in (("fma", True), ("mul", False)):
                q, t = clock(lambda: fused(fma))
                times[f"fused_{name}_s"] += t
                same[name][0] += int((q.codes == graphed.codes).sum())
                same[name][1] &= torch.equal(q.codes, graphed.codes) and torch.equal(q.weight, graphed.weight)
            codes_total += graphed.codes.numel()
        del ws, W, H
    sweep = fused_sweep(dev, f, d) if dev.type == "cuda" else {}
    return {**{k: round(v, 3) for k, v in times.items()}, "graph_equals_eager": bool(equal) if eager else None,
            "fused_block_us_by_rows_x_warps": sweep,
            **{f"fused_{n}_bit_equal_graph": v[1] for n, v in same.items()},
            **{f"fused_{n}_codes_equal": round(v[0] / max(codes_total, 1), 6) for n, v in same.items()},
            "columns": sum(k for k, _ in stages), "rows_x_columns": sum(k * sum(o) for k, o in stages)}


def fused_sweep(dev: torch.device, n: int, k: int, b: int = 128) -> dict:
    """Microseconds of one fused 128-column block (``fused_block_columns``) on ``n`` rows, per (rows per
    program, warps): CUDA events over 20 calls after a warm-up."""
    from qcompile.quant.gptq import damped_inverse_cholesky
    from qcompile.quant.gptq_fused import fused_block_columns

    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(2 * b, b, device=dev, generator=g)
    U = damped_inverse_cholesky(x.T @ x / x.shape[0])
    W = torch.randn(n, b, device=dev, generator=g) * 0.02
    s = (W.abs().amax(1, keepdim=True) / 7).expand(n, b).contiguous()
    z = torch.full_like(s, 8.0)
    out = {}
    for rows in (8, 16, 32, 64):
        for warps in (2, 4, 8):
            call = lambda: fused_block_columns(W, U, (s, z), 15, rows=rows, num_warps=warps)  # noqa: E731
            try:
                call()
                torch.cuda.synchronize()
                a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(20):
                    call()
                e.record()
                torch.cuda.synchronize()
                out[f"{rows}x{warps}"] = round(a.elapsed_time(e) * 1000 / 20, 1)
            except Exception as ex:  # noqa: BLE001 - a configuration that does not compile is reported, not fatal
                out[f"{rows}x{warps}"] = f"failed: {type(ex).__name__}"
    return out


def gptq_parts(dev: torch.device, rows=(57344, 28672, 8192, 4096)) -> dict:
    """Seconds of the parts of GPTQ whose time does not follow the rows a rank gets: the damped inverse
    Cholesky (``damped_inverse_cholesky``: Cholesky of H, its inverse through ``cholesky_inverse``, Cholesky of
    that) at the 70B widths, each step alone, and the same factor through the reversed matrix
    (``U = J·L⁻¹·J`` with ``L = chol(J·H·J)``: one Cholesky and one triangular solve, the inverse never formed),
    with its relative difference; and the clip search of one 128-column group (``mse_qparams``) per row count."""
    from qcompile.quant.formats import QuantSpec
    from qcompile.quant.gptq import damped_inverse_cholesky, gptq_quantize
    from qcompile.quant.rtn import mse_qparams

    def clock(fn, reps=1, warm=False):
        if warm:  # compile and allocate off the clock
            fn()
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(reps):
            out = fn()
        torch.cuda.synchronize()
        return out, (time.time() - t) / reps

    g = torch.Generator(device=dev).manual_seed(0)
    out = {}
    for n in (8192, 28672):
        x = torch.randn(2 * n, n, device=dev, generator=g)
        H = x.T @ x / x.shape[0]
        del x
        U, out[f"inverse_cholesky_{n}_s"] = clock(lambda: damped_inverse_cholesky(H), warm=n == 8192)
        Hd = H.clone()
        Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
        L, out[f"cholesky_{n}_s"] = clock(lambda: torch.linalg.cholesky_ex(Hd)[0])
        Hi, out[f"cholesky_inverse_{n}_s"] = clock(lambda: torch.cholesky_inverse(L))
        out[f"cholesky_upper_of_inverse_{n}_s"] = clock(lambda: torch.linalg.cholesky_ex(Hi, upper=True)[0])[1]
        del Hi
        eye = torch.eye(n, device=dev)

        def flipped():
            Lr = torch.linalg.cholesky_ex(Hd.flip(0, 1))[0]
            return torch.linalg.solve_triangular(Lr, eye, upper=False).flip(0, 1)

        Uf, out[f"flipped_{n}_s"] = clock(flipped)
        out[f"flipped_rel_diff_{n}"] = float((Uf - U).norm() / U.norm())
        del U, Uf, L, Hd, H, eye
        torch.cuda.empty_cache()
    spec = QuantSpec(4, True)
    for k, outs in ((28672, (8192, 4096)), (8192, (57344, 28672))):  # down, gate|up: all rows and half
        x = torch.randn(2 * k, k, device=dev, generator=g)
        H = x.T @ x / x.shape[0]
        del x
        for r in outs:
            W = torch.randn(r, k, device=dev, generator=g) * 0.02
            gs = QuantSpec(4, True, "group", 128)
            out[f"gptq_mse_g128_{r}x{k}_s"] = clock(lambda: gptq_quantize(W, H, gs, mse=True), warm=r == 8192 and k == 28672)[1]
            out[f"gptq_minmax_g128_{r}x{k}_s"] = clock(lambda: gptq_quantize(W, H, gs))[1]
            del W
        del H
        torch.cuda.empty_cache()
    for r in rows:
        W = torch.randn(r, 128, device=dev, generator=g) * 0.02
        out[f"clip_search_group_{r}_rows_ms"] = round(1000 * clock(
            lambda: mse_qparams(W, spec, scale_dtype=torch.float16), reps=5, warm=True)[1], 2)
    return {k: round(v, 4) if isinstance(v, float) and "rel_diff" not in k else v for k, v in out.items()}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def host_pipeline(args, recipe, dev: torch.device) -> dict:
    """The whole model's Program on the host from capture to GPTQ, the GPU holding one weight or one block:

    - each pass of the recipe (fold_norms, rotate, online_hadamard) with every weight computed on ``dev``
      (``weights.computed_on``: read there, updated in float64, written back), timed and its peak GPU memory
      taken; only the latest Program is kept (each pass works on a copy);
    - with ``--spin-steps``, SpinQuant's learning on the folded Program before the other passes (its training
      copy on the GPU, the loss block by block under activation checkpointing; the time per Cayley step is each
      step's wall time, the first step apart), then the learned R1/R2 fused on the host: the SpinQuant recipe's
      stage on the same capture;
    - GPTQ block by block (``quantize(..., device=)``) on the linears of the first ``--gptq-blocks`` blocks only
      (a benchmark-only restriction of ``quantized_linears``; its time is linear in blocks).
    The whole model's time is capture + passes + the Program clone ``quantize`` starts with + GPTQ per block ×
    blocks."""
    import qcompile.passes.quantize as quantize_mod
    import qcompile.passes.spinquant as spin_mod
    from qcompile.passes import weights
    from qcompile.passes.registry import PASSES
    from qcompile.pipeline import plan
    from qcompile.program import Program
    from qcompile.recipe import load_recipe

    out = {}

    def stage(name, fn):
        gc.collect()  # a captured graph holds reference cycles: the Programs passes left behind go now
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = time.time()
        r = fn()
        torch.cuda.synchronize()
        out[f"{name}_s"] = round(time.time() - t, 1)
        out[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out[f"{name}_host_peak_gib"] = round(peak_rss_gib(), 1)
        print(name, out[f"{name}_s"], "s", out[f"{name}_peak_gib"], "GiB, host", out[f"{name}_host_peak_gib"], "GiB",
              flush=True)
        return r

    t = time.time()
    model, real_layers = build(args.shape, args.layers, shrink=args.shrink, init_on=dev if args.fast_init else None)
    out["build_s"] = round(time.time() - t, 1)
    state = {"p": stage("capture", lambda: Program.capture(model))}
    del model
    gc.collect()
    warm_up(dev)
    plan(state["p"].model_map, recipe)
    calib = torch.randint(0, 32000, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))
    with weights.computed_on(dev):
        for name, options in recipe.pass_options():
            spec = PASSES[name]
            kw = {**({"calibration": calib} if spec.calibration else {}),
                  **({"progress": False} if spec.progress else {})}
            state["p"] = stage(name, lambda: spec.run(state["p"], options, **kw))
            if name == "fold_norms" and args.spin_steps:
                spin = dict(load_recipe("spinquant").pass_options())["spinquant"]
                spin = type(spin).of(spin, {"steps": args.spin_steps})
                ids = torch.randint(0, 32000, (spin.batch * args.spin_steps, spin.seq),
                                    generator=torch.Generator().manual_seed(1))
                learned = {}
                real_learn = spin_mod.learn_rotations

                def keep(*a, **k):
                    learned["r"] = real_learn(*a, **k)
                    return learned["r"]

                spin_mod.learn_rotations = keep
                try:
                    stage("spinquant", lambda: PASSES["spinquant"].run(state["p"], spin, calibration=ids,
                                                                          progress=True))
                except torch.cuda.OutOfMemoryError as e:  # reported, and the recipe's own passes still run
                    out["spinquant_error"] = str(e).splitlines()[0]
                    out["spinquant_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    print("spinquant:", out["spinquant_error"], flush=True)
                    continue
                finally:
                    spin_mod.learn_rotations = real_learn
                steps = learned["r"].seconds
                later = sorted(steps[1:]) or steps
                out["spin_step_s"] = [round(x, 2) for x in steps]
                out["spin_s_per_step"] = round(later[len(later) // 2], 2)
                out["spin_losses"] = [round(x, 4) for x in learned["r"].losses]
                out["spin_100_steps_min"] = round(100 * out["spin_s_per_step"] / 60, 1)
                print("spinquant steps", out["spin_step_s"], "losses", out["spin_losses"], flush=True)
                if args.spin_only:
                    out["host_peak_gib"] = round(peak_rss_gib(), 1)
                    return out
    out["passes_s"] = round(sum(out[f"{n}_s"] for n, _ in recipe.pass_options()), 1)
    out["passes_peak_gib"] = max(out[f"{n}_peak_gib"] for n, _ in recipe.pass_options())
    keep_nodes = _block_linears(state["p"], args.gptq_blocks)
    real_targets = quantize_mod.quantized_linears
    quantize_mod.quantized_linears = lambda mm, r: [n for n in real_targets(mm, r) if n in keep_nodes]
    try:
        t = time.time()
        state["p"].clone()
        out["program_clone_s"] = round(time.time() - t, 1)
        phases = {}
        stage("gptq", lambda: quantize_mod.quantize(state["p"], recipe, calib, progress=False, device=dev,
                                                     batch=args.batch, timings=phases))
    finally:
        quantize_mod.quantized_linears = real_targets
    out["gptq_phases_s"] = {k: round(v, 2) for k, v in phases.items()}
    per_block = (out["gptq_s"] - out["program_clone_s"]) / args.gptq_blocks
    out["gptq_per_block_s"] = round(per_block, 1)
    out["real_layers"] = real_layers
    out["whole_model_min"] = round((out["capture_s"] + out["passes_s"] + out["program_clone_s"]
                                    + per_block * real_layers) / 60, 1)
    out["host_peak_gib"] = round(peak_rss_gib(), 1)
    return out


def _block_linears(p, n: int) -> set[str]:
    """The linear nodes of the graph's first ``n`` blocks (the segments ``blockwise`` cuts)."""
    from qcompile.passes.blockwise import Segments

    segs = Segments(p.module, p.model_map)
    return {node.name for seg in segs.nodes[:n] for node in seg if node.name in p.model_map.linears}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--recipe", default="quarot+gptq")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--w", type=int, default=4)
    ap.add_argument("--a", type=int, default=None)
    ap.add_argument("--kv", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--passes-on", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (off: plain float32)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--shrink", type=int, default=1, help="divide every width by this (a CPU smoke test)")
    ap.add_argument("--spin-steps", type=int, default=None,
                    help="SpinQuant's Cayley steps (default: the recipe's 100); the time per step extrapolates")
    ap.add_argument("--column-loops", action="store_true",
                    help="only time GPTQ's column loops on one block's linears (per linear / stacked / CUDA graph)")
    ap.add_argument("--gptq-parts", action="store_true",
                    help="only time GPTQ's row-independent parts (inverse Cholesky, one group's clip search)")
    ap.add_argument("--no-eager", action="store_true", help="--column-loops without the (slow) eager rows")
    ap.add_argument("--factor-check", action="store_true",
                    help="only compare GPTQ's two factor methods with float64 at the 28,672 width (time, codes)")
    ap.add_argument("--split-gptq", action="store_true",
                    help="also time GPTQ's factor, clip search, column loops and each rank's waits (synchronized)")
    ap.add_argument("--host-passes", action="store_true",
                    help="the Program on the host throughout: each pass's weights computed on the GPU, GPTQ on "
                         "--gptq-blocks blocks, SpinQuant's learning on the folded Program with --spin-steps")
    ap.add_argument("--gptq-blocks", type=int, default=2, help="--host-passes: GPTQ on this many first blocks")
    ap.add_argument("--spin-only", action="store_true", help="--host-passes: stop after SpinQuant's stage")
    ap.add_argument("--fast-init", action="store_true",
                    help="draw the random weights on the GPU (seconds instead of a minute; other values)")
    ap.add_argument("--compare-single", action="store_true",
                    help="under torchrun: also time the one-process path on rank 0 and compare the codes")
    args = ap.parse_args(argv)

    from qcompile.passes.quantize import quantize
    from qcompile.pipeline import run_passes
    from qcompile.program import Program
    from qcompile.recipe import load_recipe

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    ranks = None
    if "WORLD_SIZE" in os.environ:
        from qcompile.passes.distributed import init_ranks

        ranks = init_ranks()
        dev = ranks.device
    if not cuda:  # a smoke test of the script; the timings mean nothing
        torch.cuda.synchronize = torch.cuda.reset_peak_memory_stats = torch.cuda.empty_cache = lambda *a: None
        torch.cuda.max_memory_allocated = lambda *a: 0
        torch.cuda.get_device_name = lambda *a: "cpu"
    if args.gptq_parts:
        out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tf32": args.tf32,
               **gptq_parts(dev)}
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    if args.factor_check:
        out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), **factor_check(dev)}
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    if args.column_loops:
        out = {"shape": args.shape, "group": args.group, "gpu": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "date": datetime.date.today().isoformat(),
               **column_loops(args.shape, dev, args.group, args.shrink, eager=not args.no_eager)}
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    recipe = load_recipe(args.recipe).with_bits(w=args.w, a=args.a, kv=args.kv, group=args.group)
    recipe = recipe.with_calibration(samples=args.samples, seq=args.seq)
    if args.host_passes:
        out = {"shape": args.shape, "recipe": recipe.name, "layers": args.layers, "samples": args.samples,
               "seq": args.seq, "tf32": args.tf32, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "gptq_blocks": args.gptq_blocks,
               "spin_steps": args.spin_steps, **host_pipeline(args, recipe, dev)}
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    if args.spin_steps is not None:
        recipe = dataclasses.replace(recipe, passes=tuple((n, {**o, "steps": args.spin_steps}) if n == "spinquant"
                                                          else (n, o) for n, o in recipe.passes))
    out = {"shape": args.shape, "recipe": recipe.name, "layers_measured": args.layers, "samples": args.samples,
           "seq": args.seq, "group": args.group, "w": args.w, "a": args.a, "kv": args.kv, "batch": args.batch,
           "tf32": args.tf32, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "gpus": ranks.world if ranks else 1,
           "spin_steps": args.spin_steps, "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0")}
    t = time.time()
    model, real_layers = build(args.shape, args.layers, shrink=args.shrink)
    out["build_s"] = round(time.time() - t, 1)
    t = time.time()
    program = Program.capture(model)
    del model
    out["capture_s"] = round(time.time() - t, 1)
    calib = torch.randint(0, 32000, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))

    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    if recipe.passes:
        if args.passes_on == "cuda":
            program.to(dev if args.passes_on == "cuda" and cuda else "cpu")
        program = run_passes(program, recipe, calib)
        program.to("cpu")
    torch.cuda.synchronize()
    out["passes_s"] = round(time.time() - t, 1)
    out["passes_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    needs = recipe.weights and recipe.weights.method != "rtn"
    if not needs:  # RTN (and its clip search) runs where the Program is: on the GPU, not on the host
        program.to(dev)
    warm_up(dev)

    def timed(prefix: str, ranks_=None):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if ranks_ is not None:
            torch.distributed.barrier()
        t, phases, parts = time.time(), {}, {}
        with split_gptq(parts) if args.split_gptq else contextlib.nullcontext():
            q = quantize(program, recipe, calib if needs else None, progress=False, device=dev, batch=args.batch,
                         ranks=ranks_, timings=phases)
        torch.cuda.synchronize()
        out[f"{prefix}quantize_s"] = round(time.time() - t, 1)
        out[f"{prefix}phases_s"] = {k: round(v, 2) for k, v in phases.items()}
        if args.split_gptq:
            out[f"{prefix}gptq_parts_s"] = {k: round(v, 3) for k, v in parts.items()}
        if ranks_ is not None:  # every rank's phases (the lead's are the ones above)
            every = [None] * ranks_.world
            torch.distributed.all_gather_object(every, (phases, parts))
            out[f"{prefix}rank_phases_s"] = [{**{k: round(v, 2) for k, v in p.items()},
                                              **{f"gptq {k}": round(v, 3) for k, v in s.items()}} for p, s in every]
        out[f"{prefix}quantize_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out[f"{prefix}per_block_phases_s"] = round(sum(phases.values()) / args.layers, 2)
        per_block = (out["passes_s"] + out[f"{prefix}quantize_s"]) / args.layers
        out[f"{prefix}per_block_s"] = round(per_block, 1)
        out[f"{prefix}extrapolated_min"] = round((out["capture_s"] + per_block * real_layers) / 60, 1)
        return q

    t = time.time()
    program.clone()
    out["program_clone_s"] = round(time.time() - t, 2)  # quantize() starts with one: part of the "rest"
    q = timed("", ranks)
    out["real_layers"] = real_layers
    out["quantized_linears"] = len(q.quantized)
    if ranks is not None and args.compare_single:
        if ranks.lead:
            one = timed("single_")
            codes = sum(qw.codes.numel() for qw in one.quantized.values())
            same = sum(int((qw.codes == q.quantized[k].codes).sum()) for k, qw in one.quantized.items())
            out["codes_equal_to_single"] = round(same / codes, 6)
            # a code that flips on a near-tie (the Hessians differ in summation order) changes GPTQ's error
            # feedback for the rest of its row, so codes can differ widely while the error stays the same
            ref = {k: program.weight(k).detach().float().reshape(qw.weight.shape) for k, qw in one.quantized.items()}

            def rel_error(qs):
                return round(sum(float((qs[k].weight.cpu() - w.cpu()).norm() ** 2) for k, w in ref.items()) /
                             sum(float(w.cpu().norm() ** 2) for w in ref.values()), 6)

            out["weight_rel_sq_error"] = {"single": rel_error(one.quantized), "distributed": rel_error(q.quantized)}
            out["speedup_vs_single"] = round(out["single_quantize_s"] / out["quantize_s"], 2)
        torch.distributed.barrier()
    out["host_peak_gib"] = round(peak_rss_gib(), 1)
    if ranks is not None and not ranks.lead:
        return out
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
