"""``qcompile inspect|plan|quantize|eval|generate``: the command line.

``inspect MODEL --recipe NAME --stats [--plot DIR]`` measures what a recipe's transforms do to the
activations its linears will quantize (``qcompile.analysis.stats``) and draws it (``analysis.plots``).

Every command takes a MODEL: ``smollm2-135m``, a local checkpoint folder or .gguf file, or
``tiny:ARCH`` (a small random model of a known architecture, for trying things out); ``plan``, ``quantize``
and ``eval`` also take an ONNX decoder ``MODEL.onnx`` (``input_ids → logits``, e.g. from
``torch.onnx.export(dynamo=True)``), quantized in ONNX and written as an ONNX folder; ``eval`` also
takes a directory written by ``quantize``.
"""

from __future__ import annotations

import argparse
import json
import sys

from qcompile.errors import QCompileError


def _recipe_with_bits(args):
    from qcompile.recipe import Recipe, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else Recipe(name="fp")
    recipe = recipe.with_bits(w=args.w, a=args.a, kv=args.kv, group=args.group,
                              symmetric=False if args.asym else None, vocab=args.vocab_bits,
                              lm_head=True if args.lm_head else None)
    recipe = recipe.with_calibration(args.calib_samples, args.calib_seq)
    return recipe


def cmd_inspect(args) -> None:
    from qcompile.api import capture, load_model
    from qcompile.pipeline import describe_model

    if args.stats or args.plot or args.recipe:
        return cmd_stats(args)
    model, _ = load_model(args.model)
    mm = capture(model).model_map
    if args.json:
        print(json.dumps(mm.to_dict(), default=str))
        return
    print(f"{args.model}: {describe_model(mm)}")
    print(json.dumps(mm.summary(), indent=1))
    for b in mm.blocks:
        a, f = b.attention, b.ffn
        attn = (f"q {a.q.linear}[{a.q.start}:{a.q.stop}] k {a.k.linear}[{a.k.start}:{a.k.stop}] "
                f"v {a.v.linear}[{a.v.start}:{a.v.stop}] → {a.node} → o {a.o}") if a else "attention not matched"
        ffn = (f"{f.kind} gate {f.gate.linear if f.gate else '-'} up {f.up.linear} down {f.down}") if f else \
            "FFN not matched"
        print(f"block {b.index}: norm {b.attn_norm.node} → {attn} | norm {b.ffn_norm.node} → {ffn}")
    for inv in mm.invariances:
        if not inv.holds:
            print(f"not proved: {inv.name}: {inv.reason}")


def cmd_stats(args) -> None:
    """Activation max |x| and kurtosis at every linear input, before and after the recipe's transforms."""
    from qcompile.analysis import plots, stats
    from qcompile.api import capture, load_model
    from qcompile.recipe import Recipe, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else Recipe(name="fp")
    recipe = recipe.with_calibration(args.calib_samples, args.calib_seq)
    model, tokenizer = load_model(args.model)
    program = capture(model)
    stats.check_keys(program, args.plot_site or [])
    c = stats.compare(program, recipe, tokenizer, args.calib_samples, args.calib_seq,
                      seed=recipe.calibration.seed + 1, keep_tokens=args.calib_seq if args.plot else 0,
                      progress=not args.no_progress)
    if args.plot:
        keys = args.plot_site or list(dict.fromkeys([c.largest(), c.largest("qkv"), "0:down"]))
        c.plots = plots.write(c, args.model, keys, args.plot)
    if args.json:
        print(json.dumps({"model": args.model} | c.to_dict()))
        return
    print(f"{args.model}: activation statistics at the inputs of the quantized linears")
    for line in c.lines():
        print(line)


def cmd_plan(args) -> None:
    from qcompile.api import program_of
    from qcompile.pipeline import plan

    recipe = _recipe_with_bits(args)
    program, _ = program_of(args.model, args.tokenizer)
    for line in plan(program.model_map, recipe):
        print(line)
    print("recipe, every flag:")
    print("  " + recipe.to_yaml().rstrip().replace("\n", "\n  "))


def cmd_eval(args) -> None:
    from qcompile.api import evaluate

    result = evaluate(args.model, _recipe_with_bits(args), fp=args.fp, windows=args.windows, seq=args.seq,
                      progress=not args.no_progress, tokenizer=args.tokenizer, lazy=args.lazy)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} {result['recipe']} W{result['wbits']}A{result['abits']}KV{result['kvbits']}: "
              f"ppl {result['ppl']:.4f} on {result['windows']}×{result['seq']} tokens ({result['seconds']} s)")


def cmd_quantize(args) -> None:
    from qcompile.api import quantize_to

    out = quantize_to(args.model, _recipe_with_bits(args), args.out, progress=not args.no_progress,
                      tokenizer=args.tokenizer, force=args.force, lazy=args.lazy)
    print(f"saved {out}")


def cmd_generate(args) -> None:
    from qcompile.api import decoder, generate_text
    from qcompile.decoding import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    dec, tokenizer = decoder(args.model, _recipe_with_bits(args) if args.recipe else None, use_cache=not args.no_cache,
                             progress=not args.no_progress)
    text = generate_text(dec, tokenizer, args.prompt, args.max_new_tokens, sampling, chat=args.chat,
                         progress=not args.no_progress)
    print(text)


def cmd_export(args) -> None:
    from qcompile.api import export_onnx

    out = export_onnx(args.model, args.onnx, force=args.force, int8_path=args.int8, accuracy_level=args.accuracy_level)
    print(f"exported {out}")


def _bits(parser):
    parser.add_argument("--recipe", help="recipe name, .yaml file, or a +-composition (quarot+gptq)")
    parser.add_argument("--w", type=int, help="weight bits (16: off)")
    parser.add_argument("--a", type=int, help="activation bits (16: off)")
    parser.add_argument("--kv", type=int, help="KV-cache bits (16: off)")
    parser.add_argument("--group", type=int, help="weight group size along K (default: per channel)")
    parser.add_argument("--asym", action="store_true", help="asymmetric weights (a zero point per group)")
    parser.add_argument("--vocab-bits", type=int, choices=(4, 8, 16),
                        help="embedding table and lm_head: RTN symmetric groups of 32 (16: float, the default)")
    parser.add_argument("--lm-head", action="store_true",
                        help="quantize the lm_head like the other linears (the recipe's method, GPTQ's Hessian "
                             "included); with --vocab-bits that then covers the embedding table alone")
    parser.add_argument("--calib-samples", type=int, help="override the recipe's calibration window count")
    parser.add_argument("--calib-seq", type=int, help="override the recipe's calibration window length")
    parser.add_argument("--tokenizer", metavar="SPEC",
                        help="MODEL.onnx only: the model spec or folder whose tokenizer to use (default: the "
                             "tokenizer files next to the file, else its qcompile.model metadata)")


_LAZY_HELP = ("a safetensors checkpoint folder: build the model on the meta device and read each block's weights from "
              "the memory-mapped shards only while the block runs, so host memory holds the codes, one block and "
              "the calibration activations, not the float32 model; weight quantization only (gptq, leanquant, rtn: "
              "recipes with passes are refused). Default: lazy when the float32 model would take more than half "
              "of the available memory (MemAvailable); --no-lazy: always load the whole model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="match the model's structure and print its map")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--stats", action="store_true",
                   help="activation max |x| and kurtosis per linear input, before and after --recipe's transforms")
    p.add_argument("--recipe", help="the transforms to measure (quantization off); default: none (fp)")
    p.add_argument("--plot", metavar="DIR", help="also write PNG plots to DIR (implies --stats)")
    p.add_argument("--plot-site", action="append", metavar="LAYER:ROLE",
                   help="site to plot per channel and per token (role: qkv, o, up, down); repeatable; "
                        "default: the largest input, the largest qkv input and 0:down")
    p.add_argument("--calib-samples", type=int, default=4,
                   help="windows to measure on (and to fit calibrating transforms on; default 4)")
    p.add_argument("--calib-seq", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("plan", help="print every site a recipe rewrites, and refusals")
    p.add_argument("model")
    _bits(p)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("quantize", help="compile, lower to INT4 ops and save to a directory")
    p.add_argument("model")
    _bits(p)
    p.add_argument("--out", required=True, help="a new directory for model.pt2, weights, recipe, manifest (an ONNX "
                                                "folder, model.onnx + external data, for a MODEL.onnx)")
    p.add_argument("--force", action="store_true", help="MODEL.onnx: replace OUT if it exists")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None, help=_LAZY_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("eval", help="WikiText-2 test perplexity")
    p.add_argument("model")
    _bits(p)
    p.add_argument("--fp", action="store_true", help="run the recipe's transforms with quantization off")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="end with one JSON line of the result")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=False,
                   help="as quantize's --lazy (default here: off; the perplexity then runs block by block)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("generate", help="continue a prompt, one token per step with a KV cache")
    p.add_argument("model", help="a MODEL, or a directory written by quantize")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    _bits(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("export", help="export a directory written by quantize to an ONNX folder")
    p.add_argument("model", help="a directory written by quantize")
    p.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX folder to write (model.onnx, genai_config)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--accuracy-level", type=int, choices=(0, 4),
                   help="every INT4 MatMulNBits: 0 float activations, 4 onnxruntime's int8 per block (default: 0 "
                        "for W4A16, 4 for A8)")
    p.add_argument("--int8", choices=["matmulnbits", "matmulinteger"], default="matmulnbits",
                   help="W4A8/W4A4 linears: 4-bit MatMulNBits (default; A8 with onnxruntime's int8 activations per "
                        "block, A4 by the recipe's per-token codes) or the recipe's per-token int8 codes and "
                        "MatMulInteger (exact A8, int8 weights in the file)")
    p.set_defaults(fn=cmd_export)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except QCompileError as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
