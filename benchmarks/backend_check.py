"""The qcompile backend's Inductor settings on the GPU: kernels and equality with eager.

Four checks; the first and last with the backend's ``INDUCTOR_SETTINGS`` (``export/backend.py``) and without
them (the settings before: ``QCOMPILE_EAGER_NUMERICS=0``), the first also with split reductions off
(``QCOMPILE_SPLIT_REDUCTIONS=0``):

- **kernels**: Inductor's code for the decode step's per-token quantized activations at one token —
  SiLU·mul of the fused gate|up output followed by the inlined quantization of down's input (FFN 11008 and
  14336), and RMSNorm + residual followed by it (4096) — the Triton kernels it generates (counted in its
  code), µs a call (100 calls replayed as one CUDA graph, median of 5 replays), and whether its outputs are
  eager's;
- **attention**: ``decode_attention`` at the 7B and 8B decode step as in a step (32 layers' caches, read from
  HBM, one CUDA graph): the previous two-launch kernel, the one-launch combine, the skipping of masked slots
  alone and with it, and other chunk sizes (µs a call, error against float64);
- **replays**: the one-launch combine under CUDA-graph replay with fresh queries each time, against the
  two-launch kernel (a race in the combine would show);
- **logits**: a random 2-layer Llama-2-7B-shaped model (``decode.build``), RTN g128 W4A16 / W4A8 / W4A4,
  one decode step after a 16-token prompt: the backend's logits against the eager lowered step's
  (relative L2 and bit-for-bit equality), also with ``codes_route`` the other way from its default.

    python benchmarks/backend_check.py              # all four, on CUDA
    python benchmarks/backend_check.py --device cpu --only logits --bits 8   # the logits check on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import rel  # noqa: E402

SETTINGS = {"default": {"QCOMPILE_EAGER_NUMERICS": "1", "QCOMPILE_SPLIT_REDUCTIONS": "1"},
            "before (float32 intermediates)": {"QCOMPILE_EAGER_NUMERICS": "0", "QCOMPILE_SPLIT_REDUCTIONS": "1"}}
NO_SPLIT = {"split reductions off": {"QCOMPILE_EAGER_NUMERICS": "1", "QCOMPILE_SPLIT_REDUCTIONS": "0"}}


def _graph_us(fn, args, calls: int = 100) -> float:
    """µs a call of ``fn(*args)``, ``calls`` calls captured as one CUDA graph, median of 5 replays (NaN off CUDA)."""
    if not torch.cuda.is_available():
        return float("nan")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def check_kernels(dev: str) -> list[str]:
    from torch._inductor.utils import run_and_get_code

    from qcompile.export.backend import inductor_settings
    from qcompile.kernels.quant_inline import INDUCTOR_PATCHES, quantize_per_token_inline

    def silu_mul_quant(gate_up, bits):
        gate, up = gate_up.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
        return quantize_per_token_inline(x, bits, True, 1.0)

    def norm_quant(h, r, w, bits):
        s = h + r
        sf = s.float()
        x = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
        return (s, *quantize_per_token_inline(x, bits, True, 1.0))

    gen = torch.Generator(device=dev).manual_seed(0)
    cases = [(f"SiLU·mul + quantize 1x{f} (a{b})", silu_mul_quant,
              ((torch.randn(1, 2 * f, device=dev, generator=gen) * 2).bfloat16(), b))
             for f, b in ((11008, 8), (14336, 8), (11008, 4))]
    h = torch.randn(1, 4096, device=dev, generator=gen).bfloat16()
    cases.append(("RMSNorm + residual + quantize 1x4096 (a8)", norm_quant,
                  (h, h.clone(), (torch.rand(4096, device=dev, generator=gen) + 0.5).bfloat16(), 8)))
    lines = ["| kernel | settings | Triton kernels | µs a call (CUDA graph) | outputs = eager's |",
             "|---|---|---|---|---|"]
    for name, fn, args in cases:
        want = fn(*args)
        for label, env in {**SETTINGS, **NO_SPLIT}.items():
            os.environ.update(env)
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, dynamic=False,
                                     options={**inductor_settings(), **INDUCTOR_PATCHES})
            out, codes = run_and_get_code(compiled, *args)
            n = sum(code.count("@triton.jit") for code in codes)
            us = _graph_us(compiled, args)
            same = all(torch.equal(a, b) for a, b in zip(out, want))
            lines.append(f"| {name} | {label} | {n} | {us:.2f} | {same} |")
            print(lines[-1], flush=True)
    return lines


def check_attention(dev: str) -> list[str]:
    """``decode_attention`` at the 7B / 8B decode step (one query, 32 query heads, 32 / 8 cache heads, a static
    cache of 768 slots, 512 / 640 / 768 kept: the first, middle and last of 256 new tokens after a 512-token
    prompt), as in a step: 32 calls, one per layer's cache (a 7B step's caches are 403 MB, 8× the L2, so each
    call reads its cache from HBM), captured as one CUDA graph; µs a call, median of 5 replays. Variants: the
    previous kernel (two launches), one launch (the default), masked slots not read (``skip_masked``) alone and
    with one launch, and other chunk sizes; each checked against the float64 reference."""
    from qcompile.kernels import reference
    from qcompile.kernels.triton import decode_attention as attn

    lines = ["| attention | kept of 768 | variant | chunk | µs a call (32 layers, graph) | rel vs float64 |",
             "|---|---|---|---|---|---|"]
    gen = torch.Generator(device=dev).manual_seed(1)
    variants = {"previous (two launches)": {"one_launch": False},
                "one launch (default)": {"one_launch": True},
                "masked slots skipped": {"one_launch": False, "skip_masked": True},
                "both": {"one_launch": True, "skip_masked": True}}
    for name, hk in (("7B 32/32 heads", 32), ("8B 32/8 heads", 8)):
        q = torch.randn(32, 1, 32, 1, 128, device=dev, generator=gen).bfloat16()
        k, v = (torch.randn(32, 1, hk, 768, 128, device=dev, generator=gen).bfloat16() for _ in range(2))
        for kept in (512, 640, 768):
            mask = torch.zeros(1, 1, 1, 768, dtype=torch.bool, device=dev)
            mask[..., :kept] = True
            want = [reference.decode_attention(q[i].double(), k[i].double(), v[i].double(), mask, 128 ** -0.5)
                    for i in (0, 31)]
            plans = [(label, kw, None) for label, kw in variants.items()]
            plans += [(f"one launch, chunk {c}", {"one_launch": True}, c) for c in (64, 128)] if kept == 640 else []
            for label, kw, chunk in plans:
                def step(q=q, k=k, v=v, mask=mask, kw=kw, chunk=chunk):
                    for i in range(32):
                        attn.decode_attention(q[i], k[i], v[i], mask, 128 ** -0.5, chunk, **kw)

                try:
                    err = max(rel(attn.decode_attention(q[i], k[i], v[i], mask, 128 ** -0.5, chunk, **kw), w)
                              for i, w in zip((0, 31), want))
                    us = _graph_us(step, (), calls=1) / 32
                except Exception as e:  # a configuration Triton refuses is reported, the others still run
                    lines.append(f"| {name} | {kept} | {label} | {chunk or 'plan'} | failed: {type(e).__name__}: "
                                 f"{str(e)[:80]} | |")
                    continue
                plan = attn.split_plan(32, 768)[0] if chunk is None else chunk
                lines.append(f"| {name} | {kept} | {label} | {plan} | {us:.2f} | {err:.1e} |")
                print(lines[-1], flush=True)
    return lines


def check_attention_replays(dev: str, replays: int = 200) -> list[str]:
    """The one-launch combine under CUDA-graph replay (a race would read partial states the other programs had
    not yet stored, or the last call's): 32 calls of the default kernel captured as one graph, replayed with
    fresh queries copied into its input each time, every output against the two-launch kernel's on the same
    inputs (the same float32 partial states; only the combine's summation order and the bf16 rounding may differ,
    ≤ 1e-2 relative where a stale state would be O(1)). 7B and 8B shapes, 640 of 768 slots kept."""
    from qcompile.kernels.triton import decode_attention as attn

    lines = ["| one launch under graph replay | replays × calls | max rel vs two launches | calls over 1e-2 |",
             "|---|---|---|---|"]
    gen = torch.Generator(device=dev).manual_seed(2)
    for name, hk in (("7B 32/32 heads", 32), ("8B 32/8 heads", 8)):
        q = torch.randn(32, 1, 32, 1, 128, device=dev, generator=gen).bfloat16()
        k, v = (torch.randn(32, 1, hk, 768, 128, device=dev, generator=gen).bfloat16() for _ in range(2))
        mask = torch.zeros(1, 1, 1, 768, dtype=torch.bool, device=dev)
        mask[..., :640] = True
        for i in range(32):  # counters made, kernels compiled, outside the capture
            attn.decode_attention(q[i], k[i], v[i], mask, 128 ** -0.5, one_launch=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [attn.decode_attention(q[i], k[i], v[i], mask, 128 ** -0.5, one_launch=True) for i in range(32)]
        worst, bad = 0.0, 0
        for _ in range(replays):
            q.copy_(torch.randn(q.shape, device=dev, generator=gen))
            graph.replay()
            for i in range(32):
                err = rel(outs[i], attn.decode_attention(q[i], k[i], v[i], mask, 128 ** -0.5, one_launch=False))
                worst, bad = max(worst, err), bad + (not err <= 1e-2)
        lines.append(f"| {name} | {replays} × 32 | {worst:.1e} | {bad} |")
        print(lines[-1], flush=True)
    return lines


def check_logits(dev: str, bits: list[int]) -> list[str]:
    import qcompile.api as qc
    from decode import build
    from qcompile.decoding import CachedDecoder
    from qcompile.export.backend import qcompile_backend
    from qcompile.kernels import codes_route
    from qcompile.passes.kv_cache import CacheLayout, add_kv_cache
    from qcompile.passes.lower import lower
    from qcompile.recipe import load_recipe

    rtn = load_recipe("rtn")
    rtn = dataclasses.replace(rtn, weights=dataclasses.replace(rtn.weights, clip_search=False))
    program = qc.capture(build("llama2-7b", 2, dev))
    ids = torch.randint(0, 32000, (1, 17), device=dev, generator=torch.Generator(device=dev).manual_seed(3))
    route, route_env = ("on" if codes_route.enabled() else "off"), os.environ.get("QCOMPILE_CODES_W4A16")
    lines = [f"| 2-layer 7B decode-step logits | settings (codes route {route} by default) | rel vs eager lowered | "
             "bit for bit |", "|---|---|---|---|"]
    runs = {**SETTINGS, f"default, codes route {'off' if route == 'on' else 'on'}":
            {**SETTINGS["default"], "QCOMPILE_CODES_W4A16": "0" if route == "on" else "1"}}
    for a in bits:
        lowered = lower(qc.compile(program, rtn.with_bits(group=128, a=None if a == 16 else a), progress=False))
        layout = CacheLayout.of(lowered.model_map)
        step = add_kv_cache(lowered).module
        eager = CachedDecoder(step, layout, torch.bfloat16, dev)
        _, cache = eager.step(ids[:, :16], eager.empty_cache(1))
        want, _ = eager.step(ids[:, 16:], cache)
        for label, env in runs.items():
            if a == 16 and "route" in label:
                continue
            os.environ.update(env)
            torch._dynamo.reset()
            fast = CachedDecoder(torch.compile(step, backend=qcompile_backend, fullgraph=True, dynamic=False), layout,
                                 torch.bfloat16, dev)
            got, _ = fast.step(ids[:, 16:], cache)
            lines.append(f"| W4A{a} | {label} | {rel(got, want):.2e} | {torch.equal(got, want)} |")
            print(lines[-1], flush=True)
            os.environ.pop("QCOMPILE_CODES_W4A16", None) if route_env is None else os.environ.update(
                QCOMPILE_CODES_W4A16=route_env)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", choices=("kernels", "attention", "replays", "logits"))
    ap.add_argument("--bits", default="16,8,4", help="activation bits of the logits check")
    args = ap.parse_args(argv)
    saved = {k: os.environ.get(k) for k in (*SETTINGS["default"], "QCOMPILE_CODES_W4A16")}
    try:
        lines = []
        if args.only in (None, "kernels"):
            lines += check_kernels(args.device) + [""]
        if args.only in (None, "attention"):
            lines += check_attention(args.device) + [""]
        if args.only in (None, "replays"):
            lines += check_attention_replays(args.device) + [""]
        if args.only in (None, "logits"):
            lines += check_logits(args.device, [int(b) for b in args.bits.split(",")])
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    print("\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
