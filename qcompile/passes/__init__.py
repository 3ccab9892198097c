"""The equivalence-preserving passes, each ``Program -> Program`` with a ``plan`` that predicts it."""

from qcompile.passes import fold_norms, online_hadamard, rotate

# name -> (run, plan); the order here is the order a recipe must use
PASSES = {
    "fold_norms": (fold_norms.fold_norms, fold_norms.plan),
    "rotate": (rotate.rotate, rotate.plan),
    "online_hadamard": (online_hadamard.online_hadamard, online_hadamard.plan),
}
