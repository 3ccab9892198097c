"""What qcompile does on each tiny architecture, measured by running it: the README's support table.

For every family of ``models.FAMILIES`` (a small random model, randomized norms and biases) this captures the
model and runs every pass as ``tests/graph/test_archs.py`` does, each checked against the original logits
(float32, max|Δ| ≤ 1e-4·max|logits|): fold_norms, rotate (R1 + R2), online_hadamard (R3 + R4); smooth (on the
captured and on the folded model) and shift_scale (OS+); DuQuant in its online and fused placements; SpinQuant
(3 Cayley steps) followed by the online Hadamards. A pass the plan refuses for the layout is ✘ with the plan's
reason. Then W4 GPTQ on a few random windows (routed experts one by one on their own tokens) and the lowering,
whose logits must match the fake-quantized ones. A cell is ✔, ✔ with the sites skipped and why, or ✘ with the
reason.
"""

from __future__ import annotations

import re

import torch

from qcompile.errors import QCompileError

TOL = 1e-4
COLUMNS = ("capture", "fold", "rotate", "online Hadamards", "smooth/OS+", "DuQuant", "SpinQuant", "GPTQ", "lower")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _cell(program_or_error, ref, ids) -> tuple[str, object]:
    if isinstance(program_or_error, Exception):
        return "✘ " + _clean(program_or_error), None
    p = program_or_error
    err = _rel(p.logits(ids), ref)
    if err > TOL:
        return f"✘ not exact ({err:.1e})", p
    skipped = p.reports[-1].skipped
    return ("✔" + (f" ({_reasons(skipped)})" if skipped else "")), p


def _try(f, *args, **kw):
    try:
        return f(*args, **kw)
    except QCompileError as e:
        return e


def calibrated_runs(col: str, p, calib) -> dict:
    """{label: thunk returning the rewritten Program}: the runs that prove calibrated column ``col`` on ``p``."""
    from qcompile.passes.duquant import duquant
    from qcompile.passes.fold_norms import fold_norms
    from qcompile.passes.online_hadamard import online_hadamard
    from qcompile.passes.shift_scale import shift_scale
    from qcompile.passes.smooth import smooth
    from qcompile.passes.spinquant import spinquant

    return {
        "smooth/OS+": {"smooth": lambda: smooth(p, calibration=calib),
                       "smooth after fold": lambda: smooth(fold_norms(p), calibration=calib, alpha=0.6),
                       "OS+": lambda: shift_scale(fold_norms(p), calibration=calib, max_steps=8, progress=False)},
        "DuQuant": {"online": lambda: duquant(p, calibration=calib, block=32, steps=8, progress=False),
                    "fused": lambda: online_hadamard(duquant(fold_norms(p), calibration=calib, placement="fused",
                                                             block=16, steps=8, progress=False), r4=False)},
        "SpinQuant": {"SpinQuant": lambda: online_hadamard(spinquant(fold_norms(p), calibration=calib, steps=3,
                                                                     batch=2, seq=32, progress=False))},
    }[col]


CALIBRATED = {"smooth/OS+": ("smooth", "shift_scale"), "DuQuant": ("duquant",), "SpinQuant": ("spinquant",)}


def calibration_windows() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


def _clean(reason, width: int = 120) -> str:
    """A reason as one kind of refusal reads at every site: node numbers, row ranges, op tuples and a leading node
    name dropped, cut at its first ``;`` outside parentheses and at a word boundary."""
    text = re.sub(r"\b([A-Za-z]\w*?)_\d+\b", r"\1", str(reason))
    text = re.sub(r"\s*\((?:rows |aten\.|torch\.)(?:[^()]|\([^()]*\))*\)", "", text)  # one nested level: shapes
    text = re.sub(r"^(?:linear|addmm|matmul|grouped_mm_fallback): ", "", text)
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            text = text[:i]
            break
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " …"


def _reasons(skipped) -> str:
    """The distinct reasons of (site, reason) pairs (one per kind)."""
    return f"{len(skipped)} sites skipped: {'; '.join(sorted({_clean(r) for _, r in skipped}))}"


def calibrated_cell(col: str, p, ref, ids) -> str:
    """✘ with the plan's refusal; else each run ✔ (with the sites the pass skipped) or ✘ (not exact, or the pass's
    refusal), one verdict when all runs agree."""
    from qcompile.pipeline import check_layout

    errors = [e for e in (_try(check_layout, p.model_map, n) for n in CALIBRATED[col]) if e is not None]
    if errors:
        return "✘ " + _clean(str(errors[0]).split("; ", 1)[-1])
    verdicts, skipped = {}, []
    for label, run in calibrated_runs(col, p, calibration_windows()).items():
        out = _try(run)
        if isinstance(out, Exception):
            verdicts[label] = "✘ " + _clean(out)
            continue
        err = _rel(out.logits(ids), ref)
        verdicts[label] = "✔" if err <= TOL else f"✘ not exact ({err:.1e})"
        skipped += [s for r in out.reports if r.name in CALIBRATED[col] for s in r.skipped]
    note = f" ({_reasons(skipped)})" if skipped else ""
    if len(set(verdicts.values())) == 1:
        return next(iter(verdicts.values())) + note
    return "; ".join(f"{label} {v}" for label, v in verdicts.items()) + note


def family_row(arch: str) -> dict[str, str]:
    """One row of the table: every column's cell for ``arch``."""
    from qcompile.models import tiny
    from qcompile.passes.fold_norms import fold_norms
    from qcompile.passes.lower import lower
    from qcompile.passes.online_hadamard import online_hadamard
    from qcompile.passes.quantize import quantize
    from qcompile.passes.rotate import rotate
    from qcompile.program import Program
    from qcompile.recipe import load_recipe

    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    model = tiny(arch)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    row = {}
    p = _try(Program.capture, model)
    if isinstance(p, Exception):
        return {c: "✘ " + _clean(p) for c in COLUMNS}
    gaps = p.model_map.gaps()
    err = _rel(p.logits(ids), ref)
    row["capture"] = ("✔" if err == 0 else f"✘ logits differ ({err:.1e})") + (
        f" ({_reasons(gaps).replace('skipped', 'not matched')})" if gaps else "")
    row["fold"], folded = _cell(_try(fold_norms, p), ref, ids)
    row["rotate"], _ = _cell(_try(rotate, folded), ref, ids) if folded else ("✘ needs fold", None)
    row["online Hadamards"], _ = _cell(_try(online_hadamard, p), ref, ids)
    for col in CALIBRATED:
        row[col] = calibrated_cell(col, p, ref, ids)
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))  # as test_archs' GPTQ test
    recipe = load_recipe("gptq")
    q = _try(quantize, p, recipe, calib, progress=False)
    if isinstance(q, Exception):
        row["GPTQ"], row["lower"] = "✘ " + _clean(q), "✘ not quantized"
        return row
    rep = q.reports[-1]
    experts = rep.counts.get("gptq experts (own routed tokens)", 0)
    rtn = rep.counts.get("RTN experts (no routed token)", 0)
    row["GPTQ"] = "✔" + (f" ({experts} routed experts each on its own tokens" + (
        f", {rtn} by RTN: no routed token" if rtn else "") + ")" if experts or rtn else "")
    low = _try(lower, q)
    if isinstance(low, Exception):
        row["lower"] = "✘ " + _clean(low)
    else:
        err = _rel(low.logits(ids), q.logits(ids))
        counts = low.reports[-1].counts
        grouped = sum(v for k, v in counts.items() if "grouped experts" in k)
        n = sum(counts.values()) - grouped
        left = low.reports[-1].skipped
        row["lower"] = (f"✔ {n} INT4 linears" + (f" + {grouped} grouped INT4 expert ops" if grouped else "")
                        if err < 1e-3 else f"✘ lowered logits differ ({err:.1e})") + (
            f" ({len(left)} left fake-quantized: {sorted({r for _, r in left})[0]})" if left else "")
    return row


def rows(archs=None) -> dict[str, dict[str, str]]:
    """{family: its row} over ``archs`` (default: every family)."""
    from qcompile.models import FAMILIES

    return {arch: family_row(arch) for arch in archs or FAMILIES}


def markdown(table_rows: dict[str, dict[str, str]]) -> str:
    lines = ["| architecture | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {arch} | " + " | ".join(row[c] for c in COLUMNS) + " |" for arch, row in table_rows.items()]
    return "\n".join(lines)


def refusals(table_rows: dict[str, dict[str, str]]) -> list[str]:
    """One line per distinct ✘ reason: the reason, then the (family: columns) it holds for."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    for arch, row in table_rows.items():
        for col in COLUMNS:
            cell = re.sub(r" \(\d+ sites (?:skipped|not matched): .*\)$", "", row[col])
            for part in re.split(r"; (?=[\w+ /]+ [✔✘])", cell):  # "label ✔; label ✘ reason" per run
                label, _, verdict = part.partition(" ✘ ") if " ✘ " in part else ("", "", part[2:])
                if " ✘ " in part or part.startswith("✘"):
                    cols = by_reason.setdefault(verdict, {}).setdefault(arch, [])
                    cols.append(f"{col} ({label})" if label else col)
    return [f"- {reason}: " + "; ".join(f"{arch} ({', '.join(cols)})" for arch, cols in archs.items())
            for reason, archs in sorted(by_reason.items())]


def table(archs=None) -> str:
    """The markdown table over ``archs`` (default: every family), then every ✘ with its reason."""
    table_rows = rows(archs)
    return markdown(table_rows) + "\n\nEvery ✘, by reason (family and columns):\n\n" + "\n".join(refusals(table_rows))
