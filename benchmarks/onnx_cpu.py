"""SmolLM2-135M through onnxruntime on the CPU: qcompile's exports against fp32 and onnxruntime-genai's builder.

    python benchmarks/onnx_cpu.py --w4a16 DIR --w4a8 DIR --w4a4 DIR [--threads 2 --repeats 3]

DIRs are `qcompile quantize` outputs. Every row is an ONNX folder run by onnxruntime 1.x with ``threads``
intra-op threads: perplexity (WikiText-2 test, first ``--windows`` windows of 2048, plain onnxruntime),
prefill latency of 2048 tokens (plain onnxruntime, median of ``--repeats``), decode tokens/s (onnxruntime-genai,
prompt 512, 128 new tokens, greedy, median of ``--repeats``) and the size of the files. The peer is
``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu --extra_options block_size=128``
on an HF folder saved from the same (GGUF-loaded) weights. The latencies are measured round-robin over the rows
(a machine shared with other jobs loads every row alike). Writes benchmarks/results/onnx-cpu.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent


def _feed(session, ids: np.ndarray) -> dict:
    """Inputs for a full-sequence pass of any decoder graph (ours or the builder's) from an empty cache."""
    return session.signature.feeds(ids, [i.name for i in session.get_inputs()])


def _session(folder: Path, threads: int):
    import onnx_ir as ir
    import onnxruntime as ort

    from qcompile.graph.onnx_genai import signature

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    path = folder / decoder["filename"]
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.signature = signature(ir.load(str(path)), str(path), path)  # names from the folder's genai_config
    return session


def perplexity(session, windows) -> float:
    import torch
    import torch.nn.functional as F

    losses = []
    for w in windows:
        ids = w[None].numpy().astype(np.int64)
        logits = torch.from_numpy(session.run(["logits"], _feed(session, ids))[0]).float()
        losses.append(F.cross_entropy(logits[0, :-1], w[1:]).item())
    return float(np.exp(np.mean(losses)))


def prefill(session, ids: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(["logits"], _feed(session, ids))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode(folder: Path, prompt: list[int], new: int, repeats: int, threads: int) -> float:
    """Tokens/s of onnxruntime-genai generating ``new`` tokens after ``prompt`` (the prefill excluded)."""
    import onnxruntime_genai as og

    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["intra_op_num_threads"], so["inter_op_num_threads"] = threads, 1
    cfg_path.write_text(json.dumps(cfg, indent=1))
    model = og.Model(str(folder))
    rates = []
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        gen.generate_next_token()  # the first new token comes with the prefill
        t, n = time.perf_counter(), 0
        while not gen.is_done() and n < new - 1:
            gen.generate_next_token()
            n += 1
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx") or
               f.suffix in (".onnx", ".data")) / 1e6


def build_rows(args) -> list[tuple[str, Path, str]]:
    """(row name, ONNX folder, how it was made), exporting/building what is missing."""
    import qcompile.api as qc
    from qcompile.export import export_onnx
    from qcompile.models import load
    from qcompile.recipe import Recipe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    model, tokenizer = load("smollm2-135m")
    fp = work / "fp32"
    if not fp.exists():
        export_onnx(qc.capture(model), fp, recipe=Recipe(name="fp"), model="smollm2-135m", tokenizer=tokenizer,
                    hf_config=model.config)
    rows.append(("fp32 ONNX (qcompile export, no quantization)", fp, "qcompile.export_onnx(capture(model))"))
    for name, src, path, level in (
            (f"W4A16 {args.w4a16_label} (MatMulNBits, float activations)", args.w4a16, "matmulnbits", None),
            (f"W4A16 {args.w4a16_label} (MatMulNBits accuracy_level 4, as the builder's int4 runs)", args.w4a16,
             "matmulnbits", 4),
            (f"W4A8 {args.w4a8_label} (MatMulNBits accuracy_level 4: onnxruntime's int8 activations per block)",
             args.w4a8, "matmulnbits", None),
            (f"W4A8 {args.w4a8_label} (MatMulInteger: the recipe's per-token int8 activations)", args.w4a8,
             "matmulinteger", None),
            (f"W4A4 {args.w4a4_label} (per-token A4 codes, MatMulNBits)", args.w4a4, "matmulnbits", None)):
        if not src:
            continue
        out = work / f"{Path(src).name}-{path}{'' if level is None else f'-l{level}'}"
        if not out.exists():
            export_onnx(src, out, int8_path=path, accuracy_level=level)
        flag = "" if level is None else f" --accuracy-level {level}"
        rows.append((name, out, f"qcompile export {src} --onnx {out} --int8 {path}{flag}"))
    if args.no_peer:
        return rows
    hf, peer = work / "hf", work / "peer-int4"
    if not hf.exists():  # the GGUF's weights, dequantized: transformers refuses to save a "gguf-quantized" model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    for label, folder, extra in (("default: the tied embedding/lm_head int4 too", peer, []),
                                 ("shared_embeddings=false: embedding in fp32", work / "peer-int4-fp32-embedding",
                                  ["shared_embeddings=false"])):
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder), "-p",
               "int4", "-e", "cpu", "--extra_options", "block_size=128", *extra]
        if not folder.exists():
            subprocess.run(cmd, check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        rows.append((f"peer: onnxruntime-genai builder int4 RTN block 128, accuracy_level 4 ({label})", folder,
                     " ".join(["python"] + cmd[1:])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w4a16")
    ap.add_argument("--w4a8")
    ap.add_argument("--w4a4")
    ap.add_argument("--w4a16-label", default="g128 asym quarot+gptq")
    ap.add_argument("--w4a8-label", default="per-channel quarot+gptq")
    ap.add_argument("--w4a4-label", default="g64 asym quarot+gptq")
    ap.add_argument("--resume", action="store_true", help="keep the rows an interrupted run already measured")
    ap.add_argument("--no-peer", action="store_true", help="skip the onnxruntime-genai builder rows")
    ap.add_argument("--note", action="append", default=[], help="a line for the results file (how DIRs were made)")
    ap.add_argument("--work", default="out/onnx-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "results" / "onnx-cpu"))
    args = ap.parse_args()

    import torch

    from qcompile.eval import data
    from qcompile.models import load

    torch.set_num_threads(args.threads)
    rows = build_rows(args)
    _, tokenizer = load("smollm2-135m")
    test = data.token_ids(tokenizer, data.TEST)
    windows = data.eval_windows(test, 2048, args.windows)
    prefill_ids = test[:2048][None].numpy().astype(np.int64)
    prompt = test[4096:4096 + 512].tolist()
    done = {}  # --resume: rows whose size and perplexity an interrupted run of the same command measured
    partial = Path(args.out + ".partial.jsonl")
    if args.resume and partial.exists():
        done = {(r["row"], r["folder"]): r for r in map(json.loads, partial.read_text().splitlines())}
    elif partial.exists():
        partial.unlink()
    results = []
    for name, folder, how in rows:
        r = done.get((name, str(folder)))
        if r is None:
            r = {"row": name, "folder": str(folder), "made_by": how, "size_mb": round(size_mb(folder), 1),
                 "ppl": round(perplexity(_session(folder, args.threads), windows), 3)}
            with partial.open("a") as f:
                f.write(json.dumps(r) + "\n")
        results.append({k: r[k] for k in ("row", "folder", "made_by", "size_mb", "ppl")})
    # latencies round-robin over the rows, one of each per round, so that every row sees the same mix of the
    # machine's load (it is shared); the load average is kept with each round
    sessions = [_session(Path(r["folder"]), args.threads) for r in results]
    rounds = []
    for i in range(args.repeats):
        for r, s in zip(results, sessions):
            r.setdefault("prefill_runs", []).append(round(prefill(s, prefill_ids, 1), 3))
            r.setdefault("decode_runs", []).append(round(decode(Path(r["folder"]), prompt, 128, 1, args.threads), 1))
        rounds.append(round(os.getloadavg()[0], 2))
        print(f"round {i + 1}: load {rounds[-1]}", flush=True)
    for r in results:
        r["prefill_2048_s"] = statistics.median(r["prefill_runs"])
        r["decode_tok_s"] = statistics.median(r["decode_runs"])
        print(json.dumps(r), flush=True)
    fp_size = results[0]["size_mb"]
    lines = [
        "# SmolLM2-135M through onnxruntime on the CPU",
        "",
        f"- command: `python benchmarks/onnx_cpu.py {' '.join(sys.argv[1:])}`",
        f"- machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; {args.threads} threads; "
        f"onnxruntime {__import__('onnxruntime').__version__}, onnxruntime-genai "
        f"{__import__('onnxruntime_genai').__version__}",
        f"- date: {date.today().isoformat()}",
        f"- ppl: WikiText-2 test, first {args.windows} windows of 2048 (plain onnxruntime, empty KV cache); prefill: "
        f"one 2048-token pass, median of {args.repeats}; decode: onnxruntime-genai greedy, prompt 512, 128 new "
        f"tokens, tokens/s after the first, median of {args.repeats}; the latencies are taken round-robin over "
        f"the rows (1-minute load average after each round: {', '.join(map(str, rounds))}); size: model.onnx + "
        f"external data.",
        *[f"- {n}" for n in args.note],
        "",
        "| row | ppl | prefill 2048 (s) | decode (tok/s) | size (MB) | × fp32 size |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {r['prefill_2048_s']:.3f} | {r['decode_tok_s']:.1f} | "
                     f"{r['size_mb']:.1f} | {r['size_mb'] / fp_size:.2f} |")
    lines += ["", "How each row was made:", ""] + [f"- {r['row']}: `{r['made_by']}`" for r in results]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"argv": sys.argv[1:], "load_per_round": rounds,
                                                    "results": results}, indent=1))
    partial.unlink(missing_ok=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
