"""Decode speed at batch 1 on the GPU: tokens/s of 256 new tokens after a prompt of 512, random weights of
real shapes (speed does not depend on the values), every variant through the same decoding loop
(``qcompile.decoding`` over a ``StaticKVStep`` of the ``kv_cache`` pass's static-cache graph, so every
decode step has one shape and replays as one CUDA graph).

Variants (per shape):

- ``bf16-eager``: the captured fx step, run as it is;
- ``bf16-compile``: ``torch.compile(step, mode="reduce-overhead")`` (Inductor with CUDA graphs; its best
  mode at batch 1, where the step is launch-bound without graphs);
- ``w4a16`` / ``w4a8`` / ``w4a4``: RTN int4 weights (g128, symmetric; per-token symmetric activations for
  A8/A4) lowered to the ``qcompile`` ops, compiled through the ``qcompile`` backend with
  ``mode="reduce-overhead"``; ``-fused`` (``w4a16-fused``, ...): the same after ``fuse_linears`` (one INT4
  op for q|k|v and one for gate|up, sharing one activation quantization); ``-head``: the lm_head quantized
  too (``weights.include_lm_head``, same bits and groups: changes accuracy, so its own row); ``-sdpa``: the
  backend's attention fold off (``QCOMPILE_DECODE_ATTENTION=0``: Inductor's attention over the repeated cache);
  ``-op``: per-token quantizations kept as the custom op (``QCOMPILE_INLINE_QUANT=0``; by default the backend
  inlines the unrotated ones so that Inductor fuses them into the kernel making x, ``kernels/quant_inline.py``);
  ``-codesgemv``: one-token A8/A4 linears through the codes GEMV (``QCOMPILE_CODES_W4A16=0``; by default, on
  CUDA, they go through the W4A16 GEMV on the exact codes, ``kernels/codes_route.py``); ``-fp32mid``: the backend without ``emulate_precision_casts``
  (``QCOMPILE_EAGER_NUMERICS=0``: Inductor's float32 intermediates, not eager's bf16 roundings: the backend
  before ``export/backend.INDUCTOR_SETTINGS``); ``-nosplit``: Inductor's split reductions off
  (``QCOMPILE_SPLIT_REDUCTIONS=0``: one kernel for SiLU·mul + quantization, slower); ``-coop``: Inductor's
  cooperative reductions forced (``QCOMPILE_COOPERATIVE_REDUCTIONS=1``); ``-combo``: Inductor's
  ``combo_kernels`` on (independent kernels, such as a layer's RoPE of q and k and its cache writes,
  horizontally fused into one launch); ``-prevattn``: ``decode_attention``'s previous kernel
  (``QCOMPILE_ATTENTION_PREVIOUS=1``: split and combine as two launches);
- ``torchao-int4wo``: torchao's int4 weight-only (``Int4WeightOnlyConfig(group_size=128,
  int4_packing_format="tile_packed_to_4d")``, i.e. torch's tinygemm ``_weight_int4pack_mm``) on the same
  linears as ours (the lm_head stays bf16 in both), compiled by Inductor with ``reduce-overhead`` and the
  Inductor options torchao sets (restored afterwards); last by default.

``--profile N`` adds, per variant, the GPU kernels of N decode steps (CUDA-graph replays) under
``torch.profiler``: name, launches per step, µs per step, grouped.

Only the decode step is compiled (``dynamic=False``): the prompt runs through the same step eagerly and its
time is reported as such; compiling a second graph per variant would double the setup time, not change
tokens/s. RTN runs without its clip search (the values do not change the speed).

    python benchmarks/decode.py --shapes llama2-7b,llama3-8b --out benchmarks/results/decode-h200.md
    python benchmarks/decode.py --shapes smoke --device cpu --prompt 16 --new 8 --no-inductor   # CPU check
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

SHAPES = {  # hidden, ffn, heads, kv heads, layers, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 8, 32, 128256),
    "smoke": (256, 512, 4, 2, 2, 1000),  # a CPU check of the script itself
}
VARIANTS = "bf16-compile,w4a16-fused,w4a4-fused,w4a8-fused,bf16-eager,torchao-int4wo"


def build(shape: str, layers: int | None, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, ffn, heads, kv, n, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=layers or n, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.model.rotary_emb.inv_freq.copy_(
            1.0 / (10000 ** (torch.arange(0, hidden // heads, 2, device=device).float() / (hidden // heads))))
    return model.eval()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_decode(decoder, prompt, new_tokens: int, runs: int) -> tuple[float, float, list[float]]:
    """(median tokens/s of the decode phase, median prefill ms, every run's tokens/s) over ``runs`` runs
    after one warm-up run (which also records the CUDA graph)."""
    rates, prefills = [], []
    for r in range(runs + 1):
        cache = decoder.empty_cache(1)
        _sync(prompt.device)
        t0 = time.perf_counter()
        logits, cache = decoder.step(prompt, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        _sync(prompt.device)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits, cache = decoder.step(token, cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
        _sync(prompt.device)
        t2 = time.perf_counter()
        if r:
            rates.append((new_tokens - 1) / (t2 - t1))
            prefills.append(1e3 * (t1 - t0))
    return statistics.median(rates), statistics.median(prefills), rates


_GROUPS = (  # kernel-name pattern → group, first match wins (Inductor's names carry the ops they fuse)
    ("Inductor fused (triton_)", ("triton_",)),
    ("int4 GEMV (qcompile)", ("_gemv", "_mma_gemv", "_skinny", "_w4ax", "_gemm_kernel", "_dequant_kernel")),
    ("activation quantize (qcompile)", ("_rotate_quant", "_codes_to_fp8", "_unpack")),
    ("attention (qcompile split-key)", ("_split_kernel", "_combine_kernel")),
    ("attention (flash/efficient)", ("fmha", "flash", "attention", "cutlassF", "efficient")),
    ("int4 GEMV (tinygemm)", ("int4", "tinygemm")),
    ("bf16 GEMM/GEMV (cuBLAS)", ("gemv", "gemm", "sm90_", "cutlass", "nvjet", "splitK", "xmma")),
)


def _group(name: str) -> str:
    for group, keys in _GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def profile_decode(decoder, prompt, steps: int) -> dict:
    """GPU kernels of ``steps`` decode steps after the prompt (and a few warm steps): per kernel name its
    launches and µs per step, and the totals per group, with the wall time per step around them."""
    from torch.profiler import ProfilerActivity, profile

    cache = decoder.empty_cache(1)
    logits, cache = decoder.step(prompt, cache)
    token = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(8):
        logits, cache = decoder.step(token, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = decoder.step(token, cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e6
    kernels: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.time_range.elapsed_us()
    rows = sorted(((n, c / steps, t / steps) for n, (c, t) in kernels.items()), key=lambda r: -r[2])
    groups: dict[str, list] = {}
    for n, c, t in rows:
        g = groups.setdefault(_group(n), [0.0, 0.0])
        g[0] += c
        g[1] += t
    return {"steps": steps, "wall_us_per_step": round(wall, 1), "kernel_us_per_step": round(sum(r[2] for r in rows), 1),
            "groups": {g: [round(c, 2), round(t, 1)] for g, (c, t) in sorted(groups.items(), key=lambda x: -x[1][1])},
            "kernels": [[n[:110], round(c, 2), round(t, 1)] for n, c, t in rows[:40]]}


def profile_table(name: str, p: dict) -> str:
    lines = [f"\n### {name}: {p['steps']} decode steps profiled; wall {p['wall_us_per_step']} µs a step, "
             f"kernels {p['kernel_us_per_step']} µs a step\n", "| group | launches a step | µs a step |", "|---|---|---|"]
    lines += [f"| {g} | {c:g} | {t} |" for g, (c, t) in p["groups"].items()]
    lines += ["", "| kernel | launches a step | µs a step | µs each |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {c:g} | {t} | {t / c:.2f} |" for n, c, t in p["kernels"][:25]]
    return "\n".join(lines) + "\n"


def _machine(device: str) -> str:
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU ({platform.processor()})"


def torchao_int4(module: torch.nn.Module, linears: list[str], group_size: int = 128) -> torch.nn.Module:
    """``module`` (a captured step) with the weights of ``linears`` replaced by torchao's int4 weight-only
    tensors (tinygemm layout); the graph's ``aten.linear`` calls reach torchao's kernel through the tensor
    subclass. Each weight goes through ``quantize_`` on a one-layer ``nn.Linear`` (its public API)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    for name in linears:
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        w = getattr(owner, leaf)
        holder = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
        holder.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
        quantize_(holder, config)
        setattr(owner, leaf, holder.weight)
    return module


def _builtin_min_max(gm: torch.fx.GraphModule) -> None:
    """``torch.sym_min``/``sym_max`` calls of the captured graph as Python's ``min``/``max`` (the same int).
    On the H200 machine (torch 2.11, transformers 5.17) Dynamo refused the Llama-3-8B step with "torch.* op
    returned non-Tensor ... sym_min" (the 7B step traced; not reproduced with this checkout's versions, and
    this rewrite is not yet re-run there)."""
    import builtins

    swap = {torch.sym_min: builtins.min, torch.sym_max: builtins.max}
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in swap]
    for n in nodes:
        n.target = swap[n.target]
    if nodes:
        gm.recompile()


class SplitStep:
    """The decode step compiled, the prompt through the same step eagerly (they share the cache buffers)."""

    def __init__(self, eager, compiled):
        self.eager, self.compiled = eager, compiled

    def __call__(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return (self.compiled if ids.shape[1] == 1 else self.eager)(ids, position)


def run_shape(shape: str, args, t_start: float) -> tuple[list[dict], dict]:
    import qcompile.api as qc
    from qcompile.decoding import StaticCachedDecoder, StaticKVStep
    from qcompile.export.backend import qcompile_backend
    from qcompile.passes.kv_cache import CacheLayout, with_kv_cache
    from qcompile.passes.lower import lower
    from qcompile.recipe import load_recipe, quantized_linears

    dev = args.device
    max_len = args.prompt + args.new
    t0 = time.time()
    model = build(shape, args.layers, dev)
    program = qc.capture(model)
    del model
    layout = CacheLayout.of(program.model_map)
    info = dict(shape=shape, layers=len(layout.n_heads), capture_s=round(time.time() - t0, 1))
    print(f"built and captured {shape} ({info['layers']} layers) in {info['capture_s']} s", flush=True)
    vocab = SHAPES[shape][5]
    prompt = torch.randint(0, vocab, (1, args.prompt), device=dev, generator=torch.Generator(dev).manual_seed(1))
    rtn = load_recipe("rtn")
    rtn = dataclasses.replace(rtn, weights=dataclasses.replace(rtn.weights, clip_search=False))

    def decoder_of(module, compile_with=None):
        _builtin_min_max(module)
        step = StaticKVStep(with_kv_cache(module, layout, static=True), layout, 1, max_len, torch.bfloat16, dev)
        if compile_with is None:
            return StaticCachedDecoder(step, max_len)
        if args.no_inductor:  # the CPU check: the script's plumbing, without Inductor's C++ compile
            backend = "eager" if compile_with == "inductor" else qcompile_backend
            compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False,
                                     options={"inductor": False} if compile_with == "qcompile" else None)
        else:  # the backend by function: the GPU machine runs from the tree, without the entry point
            backend = qcompile_backend if compile_with == "qcompile" else "inductor"
            compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False, mode=args.mode)
        return StaticCachedDecoder(SplitStep(step, compiled), max_len)

    rows = []
    for name in args.variants.split(","):
        elapsed = time.time() - t_start
        if args.budget_s and elapsed > args.budget_s:
            rows.append({"variant": name, "error": f"not run: the run's time budget ({args.budget_s} s) was spent"})
            print(f"{name}: skipped (budget)", flush=True)
            continue
        t1 = time.time()
        dec = None
        # torchao's quantize_ sets its recommended Inductor options globally (coordinate-descent tuning,
        # ...): they apply to its own compile, and are undone before the next variant
        inductor_config, precision = torch._inductor.config.save_config(), torch.get_float32_matmul_precision()
        try:
            if name == "bf16-eager":
                dec = decoder_of(copy.deepcopy(program.module))
            elif name == "bf16-compile":
                dec = decoder_of(copy.deepcopy(program.module), "inductor")
            elif name.startswith("w4a"):
                bits, *suffix = name[3:].split("-")
                if not set(suffix) <= {"fused", "head", "sdpa", "op", "codesgemv", "fp32mid", "nosplit", "coop",
                                       "combo", "prevattn"}:
                    raise ValueError(f"unknown variant {name}")
                a = int(bits)
                recipe = rtn.with_bits(group=128, a=None if a == 16 else a, lm_head=True if "head" in suffix else None)
                os.environ["QCOMPILE_DECODE_ATTENTION"] = "0" if "sdpa" in suffix else "1"
                os.environ["QCOMPILE_INLINE_QUANT"] = "0" if "op" in suffix else "1"
                os.environ["QCOMPILE_CODES_W4A16"] = "0" if "codesgemv" in suffix else "1"
                os.environ["QCOMPILE_EAGER_NUMERICS"] = "0" if "fp32mid" in suffix else "1"
                os.environ["QCOMPILE_SPLIT_REDUCTIONS"] = "0" if "nosplit" in suffix else "1"
                os.environ["QCOMPILE_COOPERATIVE_REDUCTIONS"] = "1" if "coop" in suffix else "0"
                os.environ["QCOMPILE_ATTENTION_PREVIOUS"] = "1" if "prevattn" in suffix else "0"
                torch._inductor.config.combo_kernels = "combo" in suffix  # restored after the variant
                lowered = lower(qc.compile(program, recipe, progress=False))
                if "fused" in suffix:  # q|k|v and gate|up as one INT4 op each
                    from qcompile.passes.fuse_linears import fuse_linears

                    lowered = fuse_linears(lowered)
                dec = decoder_of(lowered.module, "qcompile")
                del lowered
            elif name == "torchao-int4wo":
                module = copy.deepcopy(program.module)
                weights = [program.model_map.linears[n].weight for n in quantized_linears(program.model_map, rtn)]
                dec = decoder_of(torchao_int4(module, weights), "inductor")
            else:
                raise ValueError(f"unknown variant {name}")
            rate, prefill, all_rates = time_decode(dec, prompt, args.new, args.runs)
            if args.profile:
                prof = profile_decode(dec, prompt, args.profile)
                info.setdefault("profiles", {})[name] = prof
                print(profile_table(f"{shape} {name}", prof), flush=True)
        except Exception as e:  # a variant that fails is reported, the others still run
            msg = " ".join(str(e).split())
            rows.append({"variant": name, "error": f"{type(e).__name__}: {msg[:240]}"})
            print(f"{name}: FAILED {rows[-1]['error']}", flush=True)
        else:
            rows.append({"variant": name, "tok_s": round(rate, 1), "runs_tok_s": [round(r, 1) for r in all_rates],
                         "prefill_ms": round(prefill, 2), "setup_s": round(time.time() - t1, 1)})
            if args.profile:
                rows[-1]["profile"] = info["profiles"][name]
            print(f"{name}: {rate:.1f} tok/s (runs {', '.join(f'{r:.1f}' for r in all_rates)}), prefill "
                  f"{prefill:.1f} ms eager, setup+timing {time.time() - t1:.0f} s", flush=True)
        del dec
        torch._inductor.config.load_config(inductor_config)
        torch.set_float32_matmul_precision(precision)
        torch._dynamo.reset()
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**{k: v for k, v in info.items() if k != "profiles"}, **rows[-1]}) + "\n")
    return rows, info


def table(rows: list[dict], info: dict, args, argv: list[str], device: str) -> str:
    compiled = next((r["tok_s"] for r in rows if r["variant"] == "bf16-compile" and "tok_s" in r), None)
    eager = next((r["tok_s"] for r in rows if r["variant"] == "bf16-eager" and "tok_s" in r), None)
    head = (f"\n## {info['shape']} ({info['layers']} layers), batch 1, prompt {args.prompt}, {args.new} new tokens\n\n"
            f"- command: `python benchmarks/{Path(__file__).name} {' '.join(argv)}`\n- machine: {_machine(device)}, "
            f"torch {torch.__version__}, {platform.platform()}\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- median of {args.runs} runs after a warm-up run; tokens/s of the decode phase; prefill eager\n\n"
            f"| variant | tokens/s | × bf16 compiled | × bf16 eager | prefill {args.prompt} eager (ms) | setup (s) |\n"
            "|---|---|---|---|---|---|\n")
    lines = []
    profiles = "".join(profile_table(f"{info['shape']} {name}", p) for name, p in info.get("profiles", {}).items())
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | |")
        else:
            xc = f"{r['tok_s'] / compiled:.2f}" if compiled else "-"
            xe = f"{r['tok_s'] / eager:.2f}" if eager else "-"
            lines.append(f"| {r['variant']} | {r['tok_s']} | {xc} | {xe} | {r['prefill_ms']} | {r['setup_s']} |")
    return head + "\n".join(lines) + "\n" + profiles


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama2-7b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (a smoke run)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the compiled variants")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=0, help="start no variant after this many seconds")
    ap.add_argument("--profile", type=int, default=0, help="profile this many decode steps per variant (CUDA)")
    ap.add_argument("--no-inductor", action="store_true", help="CPU check: Dynamo without Inductor")
    ap.add_argument("--out", help="append the tables to this markdown file")
    ap.add_argument("--json", help="append one JSON line per variant to this file")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    t_start = time.time()
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape}; known: {', '.join(SHAPES)}")
        rows, info = run_shape(shape, args, t_start)
        text = table(rows, info, args, argv, args.device)
        print(text, flush=True)
        if args.out:
            with Path(args.out).open("a") as f:
                f.write(text)


if __name__ == "__main__":
    main()
