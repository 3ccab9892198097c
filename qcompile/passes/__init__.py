"""The equivalence-preserving passes, each ``Program -> Program`` with a ``plan`` that predicts it."""

from qcompile.passes import duquant, fold_norms, online_hadamard, rotate, shift_scale, smooth, spinquant

# name -> (run, plan); the order here is the order a recipe must use
PASSES = {
    "fold_norms": (fold_norms.fold_norms, fold_norms.plan),
    "smooth": (smooth.smooth, smooth.plan),
    "shift_scale": (shift_scale.shift_scale, shift_scale.plan),
    "rotate": (rotate.rotate, rotate.plan),
    "spinquant": (spinquant.spinquant, spinquant.plan),
    "duquant": (duquant.duquant, duquant.plan),
    "online_hadamard": (online_hadamard.online_hadamard, online_hadamard.plan),
}

# (earlier pass, later pass, why the chain cannot compose); checked by the recipe before anything runs
INCOMPATIBLE = (
    ("smooth", "rotate", "smooth writes 1/s into the norms' γ, and R1 needs plain norms (γ = 1) to commute; "
                         "rotate first, or use duquant's per-linear placement"),
    ("shift_scale", "rotate", "shift_scale writes (β − z)/s and 1/s into the norms, which R1 cannot pass"),
    ("smooth", "duquant", "duquant's fused placement transforms the stream like R1, which needs γ = 1; "
                          "use placement: duquant (online per linear) after smoothing"),
    ("shift_scale", "duquant", "duquant's fused placement cannot pass the norms' shift and scale; use placement: duquant"),
    ("smooth", "shift_scale", "OS+ would search on SmoothQuant-scaled statistics; pick one migration"),
    ("rotate", "spinquant", "spinquant learns R1/R2 from its own Hadamard start and fuses them in rotate's place; "
                            "a rotate before it would stack a second R1/R2; use one of them"),
    ("smooth", "spinquant", "smooth writes 1/s into the norms' γ, and the learned R1 needs plain norms (γ = 1)"),
    ("shift_scale", "spinquant", "shift_scale writes (β − z)/s and 1/s into the norms, which R1 cannot pass"),
    ("spinquant", "duquant", "duquant refuses to stack its transforms on spinquant's; use one of them"),
)
