"""Host memory and time of an eager vs a lazy load (``qcompile.lazy``) followed by RTN/GPTQ W4A16 g128, on the CPU.

Writes a Llama-2-7B-shaped random checkpoint (hidden 4096, FFN 11008, 32 heads, vocabulary 32000; ``--layers`` of
its 32 blocks; ``--moe``: Qwen3-30B-A3B's blocks, 128 experts of width 768, stored one tensor per expert and
projection as transformers 5 saves them) in bf16 safetensors, one shard per block plus one for the embedding,
norm and lm_head, with a small word-level tokenizer, then runs each (load, method) in its own process: ``api.program_of(DIR, lazy=…)`` then
``api.compile`` with ``--windows`` × ``--seq`` random calibration tokens, block by block on the CPU for both loads
(the same algorithm; GPTQ's codes must come out equal: a sha256 of all codes is recorded). A thread samples
/proc/self/status every 10 ms for the peak RssAnon (the process's own memory) and RssFile (mapped file pages: the
page cache's, reclaimable); VmHWM is the kernel's peak RSS of both. One JSON line per run; the checkpoint is
deleted at the end unless ``--keep``.

    flock /tmp/qcompile-heavy.lock python benchmarks/lazy_load.py --layers 4 --out rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False)
# Qwen3-30B-A3B's blocks (128 routed experts of width 768, 8 a token, QK-norm), the Llama rows' vocabulary
MOE_SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                 num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 max_position_embeddings=4096, tie_word_embeddings=False)


def write_checkpoint(folder: Path, layers: int, moe: bool = False, seed: int = 0) -> int:
    """A random bf16 checkpoint of ``layers`` blocks shaped as Llama-2-7B's (``moe``: Qwen3-30B-A3B's), one shard per
    block, its tensors named and shaped as transformers saves them (``lazy.stored_as``: a MoE's one per expert and
    projection); returns its bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    from qcompile.lazy import stored_as

    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen3MoeConfig(**MOE_SHAPE) if moe else LlamaConfig(**SHAPE)
    config.num_hidden_layers = layers
    config.save_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    blocks: dict[str, list] = {}  # a block's parameters, and the rest (embedding, final norm, lm_head)
    for name, param in model.named_parameters():
        blocks.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", []).append((name, param))
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for n, params in enumerate(blocks.values()):
        tensors = {}
        for name, param in params:
            for key, shape in stored_as(model, name, param).items():
                t = 0.02 * torch.randn(shape, generator=g)
                tensors[key] = (1 + 5 * t if "norm" in key else t).to(torch.bfloat16)
        shard = f"model-{n + 1:05d}-of-{len(blocks):05d}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map |= {k: shard for k in tensors}
        total += (folder / shard).stat().st_size
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    _tokenizer(config.vocab_size).save_pretrained(folder)
    return total


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": 3 + i for i in range(vocab - 3)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def measure(folder: str, lazy: bool, method: str, windows: int, seq: int) -> dict:
    """One run in this process (``--child``): load, compile, and the peaks."""
    import hashlib
    import threading

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            s = status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.01)

    import torch

    from qcompile import api
    from qcompile.recipe import load_recipe

    torch.manual_seed(0)
    base = status()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    program, _ = api.program_of(folder, lazy=lazy)
    t1 = time.perf_counter()
    after_load = status()
    recipe = load_recipe(method).with_bits(a=16, kv=16, group=128)
    calib = torch.randint(3, SHAPE["vocab_size"], (windows, seq), generator=torch.Generator().manual_seed(1))
    q = api.compile(program, recipe, calibration=calib, progress=False, device="cpu")
    t2 = time.perf_counter()
    stop.set()
    thread.join()
    end = status()
    h = hashlib.sha256()
    for name in sorted(q.quantized):
        h.update(q.quantized[name].codes.contiguous().numpy().tobytes())
    gib = 2 ** 30
    return {"load": "lazy" if lazy else "eager", "method": method, "load_s": round(t1 - t0, 1),
            "quantize_s": round(t2 - t1, 1), "rss_anon_after_load_gib": round((after_load["RssAnon"]) / gib, 2),
            "peak_rss_anon_gib": round(peak["RssAnon"] / gib, 2), "base_rss_anon_gib": round(base["RssAnon"] / gib, 2),
            "peak_rss_file_gib": round(peak["RssFile"] / gib, 2), "vm_hwm_gib": round(end["VmHWM"] / gib, 2),
            "lazy_weights_left": len(q.lazy), "codes_sha256": h.hexdigest()[:16], "linears": len(q.quantized)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--moe", action="store_true", help="Qwen3-30B-A3B-shaped blocks (transformers 5's per-expert "
                                                        "tensors) instead of Llama-2-7B's")
    ap.add_argument("--dir", default="/tmp/qcompile-lazy-7b")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--loads", default="eager,lazy")
    ap.add_argument("--out", help="append one JSON line per run")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--child", nargs=2, metavar=("LOAD", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.dir, args.child[0] == "lazy", args.child[1], args.windows, args.seq)))
        return
    folder = Path(args.dir)
    try:
        t = time.perf_counter()
        size = write_checkpoint(folder, args.layers, args.moe)
        print(f"checkpoint: {args.layers} blocks, {size / 2**30:.2f} GiB bf16 in {folder} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        for method in args.methods.split(","):
            for load in args.loads.split(","):
                load_avg = open("/proc/loadavg").read().split()[0]
                res = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--windows", str(args.windows),
                                      "--seq", str(args.seq), "--child", load, method], capture_output=True, text=True)
                if res.returncode:
                    row = {"load": load, "method": method, "error": (res.stdout + res.stderr)[-800:]}
                else:
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                row |= {"shape": "qwen3-30b-a3b" if args.moe else "llama-2-7b", "layers": args.layers, "checkpoint_gib": round(size / 2**30, 2), "windows": args.windows,
                        "seq": args.seq, "loadavg_before": float(load_avg),
                        "loadavg_after": float(open("/proc/loadavg").read().split()[0]),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
