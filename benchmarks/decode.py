"""Decode speed at batch 1 on the GPU: tokens/s of a prompt of 512 and 256 new tokens, random weights of real
shapes (speed does not depend on the values), every variant through the same decoding loop
(``qcompile.decoding`` over the ``kv_cache`` pass's static-cache step, so every step has one shape).

Variants: bf16 eager; bf16 ``torch.compile`` (Inductor, ``reduce-overhead``: CUDA graphs); qcompile W4A16
(RTN g128), W4A8 and W4A4 (per-token activations) lowered to the INT4 ops and compiled through the
``qcompile`` backend with CUDA graphs; torchao's int4 weight-only (``Int4WeightOnlyConfig(group_size=128)``,
tinygemm) on the same captured step, compiled by Inductor with CUDA graphs.

    python benchmarks/decode.py --shape llama2-7b --layers 32 --out benchmarks/results/decode-h200.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, ffn, heads, kv heads, layers, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 8, 32, 128256),
    "smoke": (256, 512, 4, 2, 2, 32000),  # a CPU check of the script itself
}


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
        for name, p in model.named_parameters():
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


def time_decode(decoder, prompt, new_tokens: int, runs: int) -> tuple[float, float]:
    """(median tokens/s of the decode phase, median prefill ms) over ``runs`` runs after one warm-up."""
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
    return statistics.median(rates), statistics.median(prefills)


def _machine(device: str) -> str:
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"CPU ({platform.processor()})"


def main(argv=None) -> None:
    import qcompile.api as qc
    from qcompile.export.backend import qcompile_backend
    from qcompile.decoding import StaticCachedDecoder, StaticKVStep
    from qcompile.passes.kv_cache import CacheLayout, with_kv_cache
    from qcompile.passes.lower import lower
    from qcompile.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (a smoke run)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="bf16-eager,bf16-compile,w4a16,w4a8,w4a4,torchao-int4wo")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", help="append the table to this markdown file (and a .json beside it)")
    args = ap.parse_args(argv)
    dev = args.device
    max_len = args.prompt + args.new
    t0 = time.time()
    model = build(args.shape, args.layers, dev)
    program = qc.capture(model)
    layout = CacheLayout.of(program.model_map)
    print(f"built and captured {args.shape} ({len(layout.n_heads)} layers) in {time.time() - t0:.0f} s", flush=True)
    prompt = torch.randint(0, 32000, (1, args.prompt), device=dev, generator=torch.Generator(dev).manual_seed(1))

    def step_of(module, compile_with=None, mode="reduce-overhead"):
        step = StaticKVStep(with_kv_cache(copy.deepcopy(module), layout, static=True), layout, 1, max_len,
                            torch.bfloat16, dev)
        if compile_with:  # the backend by function: the GPU machine runs from the tree, without the entry point
            backend = qcompile_backend if compile_with == "qcompile" else compile_with
            step = torch.compile(step, backend=backend, fullgraph=True, mode=mode)
        return StaticCachedDecoder(step, max_len)

    rows = []
    for name in args.variants.split(","):
        t1 = time.time()
        try:
            if name == "bf16-eager":
                dec = step_of(program.module)
            elif name == "bf16-compile":
                dec = step_of(program.module, "inductor")
            elif name.startswith("w4a"):
                a = int(name[3:])
                recipe = load_recipe("rtn").with_bits(group=128, a=None if a == 16 else a)
                lowered = lower(qc.compile(program, recipe, progress=False))
                dec = step_of(lowered.module, "qcompile")
            elif name == "torchao-int4wo":
                from torchao.quantization import Int4WeightOnlyConfig, quantize_

                ao = copy.deepcopy(model)
                quantize_(ao, Int4WeightOnlyConfig(group_size=128))
                dec = step_of(qc.capture(ao).module, "inductor")
            else:
                raise ValueError(name)
            rate, prefill = time_decode(dec, prompt, args.new, args.runs)
        except Exception as e:  # a variant that fails is reported, the others still run
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"{name}: FAILED {rows[-1]['error']}", flush=True)
            continue
        rows.append({"variant": name, "tok_s": round(rate, 1), "prefill_ms": round(prefill, 2),
                     "setup_s": round(time.time() - t1, 1)})
        print(f"{name}: {rate:.1f} tok/s, prefill {prefill:.1f} ms (setup {time.time() - t1:.0f} s)", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    compiled = next((r["tok_s"] for r in rows if r["variant"] == "bf16-compile" and "tok_s" in r), None)
    head = (f"\n## {args.shape} ({len(layout.n_heads)} layers), batch 1, prompt {args.prompt}, {args.new} new tokens\n\n"
            f"- command: `python {' '.join(sys.argv)}`\n- machine: {_machine(dev)}, torch "
            f"{torch.__version__}, {platform.platform()}\n- date: {datetime.date.today()}\n"
            f"- median of {args.runs} runs after a warm-up; tokens/s of the decode phase\n\n"
            f"| variant | tokens/s | × bf16 compiled | prefill {args.prompt} (ms) | setup (s) |\n|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | |")
        else:
            x = f"{r['tok_s'] / compiled:.2f}" if compiled else "-"
            lines.append(f"| {r['variant']} | {r['tok_s']} | {x} | {r['prefill_ms']} | {r['setup_s']} |")
    table = head + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        with out.open("a") as f:
            f.write(table)
        with out.with_suffix(".json").open("a") as f:
            f.write(json.dumps({"shape": args.shape, "layers": len(layout.n_heads), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
