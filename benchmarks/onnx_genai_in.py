"""onnxruntime-genai's fp32 SmolLM2 build in, a qcompile recipe out, against the builder's own int4 output.

    python benchmarks/onnx_genai_in.py --source GENAI_FP32 --row "LABEL=DIR" ... --peer DIR ... \
        [--windows 4 --threads 2 --repeats 3 --ab ROUNDS --out benchmarks/results/onnx-in-cpu.md]

GENAI_FP32 is ``python -m onnxruntime_genai.models.builder -i HF -o GENAI_FP32 -p fp32 -e cpu``; each DIR of a
``--row`` is ``qcompile quantize GENAI_FP32/model.onnx --recipe ... --out DIR``; ``--peer`` DIRs are the
builder's int4 folders. Every folder is measured as ``benchmarks/onnx_cpu.py`` measures its rows (its
functions: perplexity on the first ``--windows`` WikiText-2 test windows of 2048 in plain onnxruntime with an
empty cache, prefill of 2048 tokens, onnxruntime-genai greedy decode tokens/s after a 512-token prompt, file
size); the section is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from gptq_parity import provenance, publish  # noqa: E402  (benchmarks/ is the script's folder)
from onnx_cpu import _session, decode, perplexity, prefill, size_mb

from qcompile.eval import data
from qcompile.export.runtime import tokenizer_of


def measure(folder: Path, windows, prefill_ids, prompt, args) -> dict:
    s = _session(folder, args.threads)
    r = {"size_mb": round(size_mb(folder), 1), "ppl": round(perplexity(s, windows), 3),
         "prefill_2048_s": round(prefill(s, prefill_ids, args.repeats), 3)}
    del s
    r["decode_tok_s"] = round(decode(folder, prompt, 128, args.repeats, args.threads), 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="the builder's fp32 folder (the input)")
    ap.add_argument("--row", action="append", default=[], metavar="LABEL=DIR", help="a qcompile output folder")
    ap.add_argument("--peer", action="append", default=[], metavar="LABEL=DIR", help="a builder int4 folder")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="then decode the folders again, alternating, ROUNDS times (the spread under shared load)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "onnx-in-cpu.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = tokenizer_of(args.source)  # the builder's copy of SmolLM2's tokenizer
    test = data.token_ids(tokenizer, data.TEST)
    windows = data.eval_windows(test, 2048, args.windows)
    prefill_ids = test[:2048][None].numpy().astype(np.int64)
    prompt = test[4096:4096 + 512].tolist()
    rows = [("source: the builder's fp32 build", args.source)]
    rows += [tuple(r.rsplit("=", 1)) for r in args.row + args.peer]  # the folder after the last "="
    results = []
    for label, folder in rows:
        r = {"row": label, "folder": folder} | measure(Path(folder), windows, prefill_ids, prompt, args)
        print(json.dumps(r), flush=True)
        results.append(r)
    versions = (f"onnxruntime {__import__('onnxruntime').__version__}, onnxruntime-genai "
                f"{__import__('onnxruntime_genai').__version__}")
    lines = [f"## onnxruntime-genai's fp32 build in, quantized by qcompile, against the builder's int4 "
             f"({provenance()})", "",
             f"ppl: WikiText-2 test, first {args.windows} windows of 2048 (plain onnxruntime, empty KV cache); "
             f"prefill: one 2048-token pass, median of {args.repeats}; decode: onnxruntime-genai greedy, prompt 512, "
             f"128 new tokens, tokens/s after the first, median of {args.repeats}; {args.threads} threads; {versions}.",
             *[f"- {n}" for n in args.note], "",
             "| row | ppl | prefill 2048 (s) | decode (tok/s) | size (MB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} (`{r['folder']}`) | {r['ppl']:.3f} | {r['prefill_2048_s']:.3f} | "
              f"{r['decode_tok_s']:.1f} | {r['size_mb']:.1f} |" for r in results]
    if args.ab:
        rates = {label: [] for label, _ in rows}
        for _ in range(args.ab):
            for label, folder in rows:
                rates[label].append(round(decode(Path(folder), prompt, 128, args.repeats, args.threads), 1))
        lines += ["", f"Decode A/B, the folders alternated {args.ab} times (tok/s, each a median of "
                      f"{args.repeats}):", ""]
        lines += [f"- {label}: {', '.join(map(str, r))}" for label, r in rates.items()]
    publish("\n".join(lines) + "\n", args.out)
    print(json.dumps({"argv": sys.argv[1:], "results": results}))


if __name__ == "__main__":
    main()
