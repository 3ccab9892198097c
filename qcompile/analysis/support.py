"""What qcompile does on each tiny architecture, measured by running it: the README's support table.

For every family of ``models.FAMILIES`` (a small random model, randomized norms and biases) this captures the
model, runs fold_norms, rotate (R1 + R2), online_hadamard (R3 + R4) and checks each against the original
logits (float32, max|Δ| ≤ 1e-4·max|logits|); asks the plan of smooth / shift_scale (OS+), duquant and spinquant
whether they accept the layout; runs W4 GPTQ on a few random windows and lowers the result. A cell is ✔, ✔ with
the sites skipped and why, or ✘ with the reason.
"""

from __future__ import annotations

import torch

from qcompile.errors import QCompileError

TOL = 1e-4
COLUMNS = ("capture", "fold", "rotate", "online Hadamards", "smooth/OS+", "DuQuant", "SpinQuant", "GPTQ", "lower")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _cell(program_or_error, ref, ids) -> tuple[str, object]:
    if isinstance(program_or_error, Exception):
        return "✘ " + str(program_or_error).split(";")[0][:80], None
    p = program_or_error
    err = _rel(p.logits(ids), ref)
    if err > TOL:
        return f"✘ not exact ({err:.1e})", p
    skipped = p.reports[-1].skipped
    if not skipped:
        return "✔", p
    reasons = sorted({r.split(":")[0][:90] for _, r in skipped})
    return f"✔ ({len(skipped)} sites skipped: {'; '.join(reasons)})", p


def _try(f, *args, **kw):
    try:
        return f(*args, **kw)
    except QCompileError as e:
        return e


def family_row(arch: str) -> dict[str, str]:
    """One row of the table: every column's cell for ``arch``."""
    from qcompile.models import tiny
    from qcompile.passes.fold_norms import fold_norms
    from qcompile.passes.lower import lower
    from qcompile.passes.online_hadamard import online_hadamard
    from qcompile.passes.quantize import quantize
    from qcompile.passes.rotate import rotate
    from qcompile.pipeline import check_layout
    from qcompile.program import Program
    from qcompile.recipe import load_recipe

    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    model = tiny(arch)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    row = {}
    p = _try(Program.capture, model)
    if isinstance(p, Exception):
        return {c: "✘ " + str(p)[:80] for c in COLUMNS}
    gaps = p.model_map.gaps()
    err = _rel(p.logits(ids), ref)
    row["capture"] = ("✔" if err == 0 else f"✘ logits differ ({err:.1e})") + (
        f" ({len(gaps)} sites not matched: {'; '.join(sorted({r.split(':')[0][:90] for _, r in gaps}))})" if gaps else "")
    row["fold"], folded = _cell(_try(fold_norms, p), ref, ids)
    row["rotate"], _ = _cell(_try(rotate, folded), ref, ids) if folded else ("✘ needs fold", None)
    row["online Hadamards"], _ = _cell(_try(online_hadamard, p), ref, ids)
    for col, names in (("smooth/OS+", ("smooth", "shift_scale")), ("DuQuant", ("duquant",)), ("SpinQuant", ("spinquant",))):
        errors = [e for e in (_try(check_layout, p.model_map, n) for n in names) if e is not None]
        row[col] = "✔ (layout accepted by the plan)" if not errors else "✘ " + str(errors[0]).split("; ", 1)[-1][:80]
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    recipe = load_recipe("gptq")
    q = _try(quantize, p, recipe, calib, progress=False)
    if isinstance(q, Exception):
        row["GPTQ"], row["lower"] = "✘ " + str(q)[:80], "✘ not quantized"
        return row
    skipped = q.reports[-1].skipped
    row["GPTQ"] = "✔" + (f" ({len(skipped)} expert weights by RTN: no per-expert Hessians)" if skipped else "")
    low = _try(lower, q)
    if isinstance(low, Exception):
        row["lower"] = "✘ " + str(low)[:80]
    else:
        err = _rel(low.logits(ids), q.logits(ids))
        n = sum(low.reports[-1].counts.values())
        left = low.reports[-1].skipped
        row["lower"] = (f"✔ {n} INT4 linears" if err < 1e-3 else f"✘ lowered logits differ ({err:.1e})") + (
            f" ({len(left)} left fake-quantized: {sorted({r for _, r in left})[0]})" if left else "")
    return row


def table(archs=None) -> str:
    """The markdown table over ``archs`` (default: every family)."""
    from qcompile.models import FAMILIES

    lines = ["| architecture | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for arch in archs or FAMILIES:
        row = family_row(arch)
        lines.append(f"| {arch} | " + " | ".join(row[c] for c in COLUMNS) + " |")
    return "\n".join(lines)
