"""Each pass name bound to its options class, its run and its plan; the order is ``options.ORDER``.

A pass's run is ``run(program, options=None, *, [calibration], [progress], **overrides)`` and its plan
``plan(model_map, options)``; ``calibration`` and ``progress`` are what the pipeline supplies when it runs
a recipe (the flags below say which a pass takes), never recipe options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qcompile.passes import duquant, fold_norms, online_hadamard, rotate, shift_scale, smooth, spinquant
from qcompile.passes.options import OPTIONS, ORDER, PassOptions


@dataclass(frozen=True)
class Pass:
    """A registered pass: its options class, run and plan, and what the pipeline must give its run."""

    options: type[PassOptions]
    run: Callable
    plan: Callable
    calibration: bool = False  # reads calibration windows [n, seq]
    progress: bool = False  # shows a progress bar (the pipeline passes ``progress``)
    per_site: bool = False  # plans every site of any matched layout (else: sequential pre-norm blocks only)

    @property
    def name(self) -> str:
        return self.options.name


_BOUND = {
    "fold_norms": dict(run=fold_norms.fold_norms, plan=fold_norms.plan, per_site=True),
    "smooth": dict(run=smooth.smooth, plan=smooth.plan, calibration=True),
    "shift_scale": dict(run=shift_scale.shift_scale, plan=shift_scale.plan, calibration=True, progress=True),
    "rotate": dict(run=rotate.rotate, plan=rotate.plan, per_site=True),
    "spinquant": dict(run=spinquant.spinquant, plan=spinquant.plan, calibration=True, progress=True),
    "duquant": dict(run=duquant.duquant, plan=duquant.plan, calibration=True, progress=True),
    "online_hadamard": dict(run=online_hadamard.online_hadamard, plan=online_hadamard.plan, per_site=True),
}
assert tuple(_BOUND) == ORDER, "every pass in options.OPTIONS is bound here, in the same order"

PASSES: dict[str, Pass] = {name: Pass(OPTIONS[name], **kw) for name, kw in _BOUND.items()}
