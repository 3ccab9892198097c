"""Wall time of every shipped recipe quantizing SmolLM2 on this machine's CPU (issue 13: ≤ 10 min each).

Each recipe runs as the user would run it, ``qcompile quantize smollm2-135m --recipe NAME --calib-samples 16
--out DIR``, in its own process under the shared heavy-job lock (``flock``; the time waiting for the lock is not
counted; a run is stopped at ``--limit`` seconds), with the 1-minute load average read before and after;
``--eval NAME`` also measures the result's
WikiText-2 perplexity on the first 4 windows of 2048 (``qcompile eval DIR``). One JSON line per run is appended
to ``--out`` as it finishes, so a long sweep keeps what it measured.

    python benchmarks/cpu_recipes.py --out benchmarks/results/cpu-recipes.jsonl duquant+gptq gptq rtn
    python benchmarks/cpu_recipes.py --out ... --all --eval duquant+gptq
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK = "/tmp/qcompile-heavy.lock"
RECIPES = Path(__file__).resolve().parents[1] / "qcompile" / "recipes"


def _qcompile() -> str:
    return str(Path(sys.executable).with_name("qcompile"))


def run(recipe: str, samples: int, evaluate: bool, workdir: Path, limit: float) -> dict:
    out = workdir / recipe.replace("+", "_")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [_qcompile(), "quantize", "smollm2-135m", "--recipe", recipe, "--calib-samples", str(samples),
           "--out", str(out), "--no-progress"]
    timed = ("import subprocess, sys, time, os, json; la = lambda: open('/proc/loadavg').read().strip(); "
             "l0 = la(); t = time.time(); "
             f"r = subprocess.run(['timeout', '{limit:.0f}', *sys.argv[1:]], capture_output=True, text=True); "
             "l1 = la(); print(json.dumps({'rc': r.returncode, 'seconds': round(time.time() - t, 1), "
             "'load_before': float(l0.split()[0]), 'load_after': float(l1.split()[0]), "
             "'loadavg_before': l0, 'loadavg_after': l1, "
             "'started': time.strftime('%Y-%m-%d %H:%M', time.gmtime(t)), 'tail': (r.stdout + r.stderr)[-600:]}))")
    res = subprocess.run(["flock", LOCK, sys.executable, "-c", timed, *cmd], capture_output=True, text=True)
    row = {"recipe": recipe, "calib_samples": samples, **json.loads(res.stdout.strip().splitlines()[-1])}
    if row["rc"] == 0:
        row.pop("tail")
    elif row["rc"] == 124:
        row["stopped_at_limit"] = limit
    if evaluate and row["rc"] == 0:
        ev = subprocess.run(["flock", LOCK, _qcompile(), "eval", str(out), "--windows", "4", "--json",
                             "--no-progress"], capture_output=True, text=True)
        try:
            row["ppl4"] = json.loads(ev.stdout.strip().splitlines()[-1])["ppl"]
        except (ValueError, IndexError, KeyError):
            row["eval_error"] = (ev.stdout + ev.stderr)[-400:]
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the last row of each recipe), slowest first."""
    last = {r["recipe"]: r for r in rows}
    lines = ["| recipe | wall time | ≤ 10 min | ppl 4×2048 | /proc/loadavg (1, 5, 15 min) at start → end | started (UTC) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(last.values(), key=lambda r: -r["seconds"]):
        if r["rc"] == 0:
            wall, ok = f"{r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min)", "yes" if r["seconds"] <= 600 else "**no**"
        elif "stopped_at_limit" in r:
            wall, ok = f"> {r['stopped_at_limit']:.0f} s (stopped)", "**no**"
        else:
            wall, ok = f"failed (rc {r['rc']}) after {r['seconds']:.0f} s", "–"
        ppl = f"{r['ppl4']:.3f}" if "ppl4" in r else "–"
        load = (f"{' '.join(r['loadavg_before'].split()[:3])} → {' '.join(r['loadavg_after'].split()[:3])}"
                if "loadavg_before" in r else f"{r['load_before']:.2f} → {r['load_after']:.2f}")
        lines.append(f"| {r['recipe']} | {wall} | {ok} | {ppl} | {load} | "
                     f"{r.get('started', r['date'][:10])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--all", action="store_true", help="every recipe in qcompile/recipes")
    ap.add_argument("--eval", nargs="*", default=[], help="recipes whose perplexity (4 × 2048) is also measured")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--limit", type=float, default=900, help="seconds after which a run is stopped")
    ap.add_argument("--out", required=True, help="a JSON-lines file the rows are appended to")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out's rows and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return
    recipes = list(args.recipes) + (sorted(p.stem for p in RECIPES.glob("*.yaml")) if args.all else [])
    machine = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
               "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="minutes")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in recipes:
            row = {**run(r, args.samples, r in args.eval, Path(tmp), args.limit), **machine}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
