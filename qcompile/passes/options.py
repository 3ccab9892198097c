"""Pass options as data, and the one table of how passes may be ordered.

Each equivalence-preserving pass has one frozen options dataclass (``RotateOptions``, ...): the recipe
validates a pass's mapping by building it (``from_dict``), the pipeline hands the same object to the pass's
``plan`` and its run, and a Python caller may build it or give its fields as keyword arguments. Every class
carries ``name`` (the pass it configures) and ``version`` (bumped when a field changes meaning; a recipe
may pin it with a ``version`` key). Bad values are a ``RecipeError`` naming the pass and the key.

The ordering rules live here once, as data:
- ``OPTIONS`` lists the passes in the order a chain must use;
- ``NEEDS``: a pass that needs another to have run before it;
- ``CONFLICTS``: (earlier, later) pairs that cannot compose, each with its reason, some only under an
  option of the later pass.
``check_chain`` applies them to a recipe's list of passes (``RecipeError``) and ``check_can_run`` to a
Program's history before a pass runs (``UnsafeRewriteError``), so a recipe is refused at validation for
exactly the reasons its run would be.

This module imports nothing from the passes, the pipeline or the recipe, so all of them can import it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Iterable, Sequence

from qcompile.errors import RecipeError, UnsafeRewriteError

ROTATION_KINDS = ("hadamard", "orthogonal")
DUQUANT_PLACEMENTS = ("duquant", "fused")
DUQUANT_INDEX = ("channel", "row")
RUN_ARGUMENTS = ("calibration", "progress")  # given when a recipe runs, never written in it


@dataclass(frozen=True)
class PassOptions:
    """Base of every pass's options: type-checked fields, ``from_dict``/``to_dict``, a ``version``."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v, want = getattr(self, f.name), hints[f.name]
            if type(v) is not want:  # bool is not an int, an int is not a float: a recipe says what it means
                raise RecipeError(f"pass {self.name} option {f.name} must be {want.__name__}, got {v!r}")
        self.check()

    def check(self) -> None:
        """Range checks of a pass's values; raise ``RecipeError`` naming the pass and key."""

    def _fail(self, message: str) -> None:
        raise RecipeError(f"pass {self.name}: {message}")

    @classmethod
    def from_dict(cls, d: dict | None, where: str | None = None) -> "PassOptions":
        """The options a recipe's mapping gives (missing keys take their defaults; ``version``, when present,
        must be this class's)."""
        where = where or f"pass {cls.name}"
        if d is not None and not isinstance(d, dict):
            raise RecipeError(f"{where}: options must be a mapping, got {type(d).__name__}")
        d = dict(d or {})
        version = d.pop("version", cls.version)
        if version != cls.version:
            raise RecipeError(f"{where}: options are version {cls.version} here, the recipe was written for "
                              f"version {version!r}")
        known = sorted(f.name for f in fields(cls))
        for k in d:
            if k not in known:
                hint = f" ({k} is given when the recipe runs, not in it)" if k in RUN_ARGUMENTS else ""
                raise RecipeError(f"pass {cls.name} has no option {k!r}{hint}; options: {known}")
        return cls(**d)

    @classmethod
    def of(cls, options: "PassOptions | None", overrides: dict) -> "PassOptions":
        """``options`` (or the defaults) with keyword overrides, as a pass's Python signature takes them."""
        if options is not None and not isinstance(options, cls):
            raise RecipeError(f"pass {cls.name} takes {cls.__name__}, got {type(options).__name__}")
        base = options.to_dict() if options is not None else {}
        return cls.from_dict({**base, **overrides})

    def to_dict(self) -> dict:
        """Every field, as a recipe would write it (without ``version``)."""
        return dataclasses.asdict(self)


def _bits(opts: PassOptions, *keys: str) -> None:
    for k in keys:
        b = getattr(opts, k)
        if not (2 <= b <= 8 or b >= 16):
            opts._fail(f"{k} must be 2..8 (or ≥ 16 for float), got {b}")


@dataclass(frozen=True)
class FoldNormsOptions(PassOptions):
    """fold_norms has no options."""

    name: ClassVar[str] = "fold_norms"


@dataclass(frozen=True)
class SmoothOptions(PassOptions):
    """SmoothQuant: migration strength ``alpha`` and the sites smoothed; ``batch`` windows per statistics run."""

    name: ClassVar[str] = "smooth"
    alpha: float = 0.5
    norms: bool = True
    v_o: bool = True
    up_down: bool = True
    batch: int = 4

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            self._fail(f"alpha must be in [0, 1], got {self.alpha}")
        if self.batch < 1:
            self._fail(f"batch must be ≥ 1, got {self.batch}")


@dataclass(frozen=True)
class ShiftScaleOptions(PassOptions):
    """OS+: shift and/or scale; the threshold search's bit widths, grid (``floor`` 0: the official one,
    ``max_steps`` 0: uncapped, ``coarse`` 0: every threshold) and windows."""

    name: ClassVar[str] = "shift_scale"
    shift: bool = True
    scale: bool = True
    w_bits: int = 4
    a_bits: int = 4
    floor: float = 0.0
    max_steps: int = 0
    coarse: int = 0
    search_windows: int = 1
    up_down: bool = True
    batch: int = 4

    def check(self) -> None:
        _bits(self, "w_bits", "a_bits")
        for k in ("floor", "max_steps", "coarse"):
            if getattr(self, k) < 0:
                self._fail(f"{k} must be ≥ 0, got {getattr(self, k)}")
        for k in ("search_windows", "batch"):
            if getattr(self, k) < 1:
                self._fail(f"{k} must be ≥ 1, got {getattr(self, k)}")


@dataclass(frozen=True)
class RotateOptions(PassOptions):
    """QuaRot's fused rotations: R1 on the stream, R2 per head on v→o; ``kind`` of matrix, its ``seed``."""

    name: ClassVar[str] = "rotate"
    kind: str = "hadamard"
    seed: int = 0
    r1: bool = True
    r2: bool = True

    def check(self) -> None:
        if self.kind not in ROTATION_KINDS:
            self._fail(f"kind {self.kind!r} is not one of {ROTATION_KINDS}")


@dataclass(frozen=True)
class SpinQuantOptions(PassOptions):
    """SpinQuant's Cayley SGD schedule, the quantizers in its training forward, and its R3/R4 placement
    (which the recipe's online_hadamard must match)."""

    name: ClassVar[str] = "spinquant"
    steps: int = 100
    lr: float = 1.5
    batch: int = 8
    seq: int = 2048
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    learn_weights_16bit: bool = False
    r3: bool = True
    r4: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0 or self.batch < 1 or self.seq < 2 or not self.lr > 0:
            self._fail(f"needs steps ≥ 0, lr > 0, batch ≥ 1 and seq ≥ 2; got steps={self.steps}, lr={self.lr}, "
                       f"batch={self.batch}, seq={self.seq}")
        for k in ("w_bits", "a_bits", "kv_bits"):
            b = getattr(self, k)
            if b < 16 and not 2 <= b <= 8:
                self._fail(f"{k} must be in 2..8, or ≥ 16 for no quantization; got {b}")


@dataclass(frozen=True)
class DuQuantOptions(PassOptions):
    """DuQuant: ``placement`` (online per linear, or fused into the stream), the greedy's block, steps,
    permutation and indexing, token rows kept per site, seed, windows per statistics batch."""

    name: ClassVar[str] = "duquant"
    placement: str = "duquant"
    block: int = 128
    steps: int = 256
    permute: bool = True
    index: str = "channel"
    tokens: int = 2048
    seed: int = 0
    batch: int = 4

    def check(self) -> None:
        if self.placement not in DUQUANT_PLACEMENTS:
            self._fail(f"placement {self.placement!r} is not one of {DUQUANT_PLACEMENTS}")
        if self.index not in DUQUANT_INDEX:
            self._fail(f"index {self.index!r} is not one of {DUQUANT_INDEX}")
        if self.block < 2 or self.steps < 0 or self.tokens < 1 or self.batch < 1:
            self._fail(f"block ≥ 2, steps ≥ 0, tokens ≥ 1 and batch ≥ 1 are required; got block={self.block}, "
                       f"steps={self.steps}, tokens={self.tokens}, batch={self.batch}")


@dataclass(frozen=True)
class OnlineHadamardOptions(PassOptions):
    """QuaRot's online Hadamards: R3 on q/k after RoPE, R4 on the down inputs."""

    name: ClassVar[str] = "online_hadamard"
    r3: bool = True
    r4: bool = True


# every pass, in the order a chain must use
OPTIONS: dict[str, type[PassOptions]] = {c.name: c for c in (
    FoldNormsOptions, SmoothOptions, ShiftScaleOptions, RotateOptions, SpinQuantOptions, DuQuantOptions,
    OnlineHadamardOptions)}
ORDER = tuple(OPTIONS)


def _always(opts: PassOptions) -> bool:
    return True


def _r1(opts: RotateOptions) -> bool:
    return opts.r1


def _fused(opts: DuQuantOptions) -> bool:
    return opts.placement == "fused"


@dataclass(frozen=True)
class Need:
    """``later`` needs ``first`` to have run before it (where ``when`` holds of its options)."""

    first: str
    later: str
    why: str
    when: Callable[[PassOptions], bool] = _always


@dataclass(frozen=True)
class Conflict:
    """``first`` then ``later`` cannot compose (where ``when`` holds of ``later``'s options)."""

    first: str
    later: str
    why: str
    when: Callable[[PassOptions], bool] = _always


MIGRATIONS = ("smooth", "shift_scale")  # passes that move channel scales between activations and weights

NEEDS = (
    Need("fold_norms", "rotate", "a norm's γ does not commute with a rotation"),
    Need("fold_norms", "spinquant", "a norm's γ does not commute with R1"),
    Need("fold_norms", "duquant", "γ does not commute with the fused stream transform", _fused),
)

_ONLINE_STATS = "its statistics would be taken through transforms that the migration cannot pass; run it before"
_UNDO = "would fold γ through its transforms (or fold its 1/s back into the readers and undo it); run fold_norms first"
_SPIN_FIRST = ("spinquant learns R1/R2 from its own Hadamard start with R3/R4 in its forward and fuses them in "
               "rotate's place; run it right after fold_norms")
CONFLICTS = (
    Conflict("smooth", "rotate", "smooth writes 1/s into the norms' γ, and R1 needs plain norms (γ = 1) to commute; "
                                 "use duquant's per-linear placement after smoothing", _r1),
    Conflict("shift_scale", "rotate", "shift_scale writes (β − z)/s and 1/s into the norms, which R1 cannot pass",
             _r1),
    Conflict("smooth", "duquant", "duquant's fused placement transforms the stream like R1, which needs γ = 1; "
                                  "use placement: duquant (online per linear) after smoothing", _fused),
    Conflict("shift_scale", "duquant", "duquant's fused placement cannot pass the norms' shift and scale; "
                                       "use placement: duquant", _fused),
    Conflict("smooth", "shift_scale", "OS+ would search on SmoothQuant-scaled statistics; pick one migration"),
    Conflict("rotate", "spinquant", "a rotate before it would stack a second R1/R2 on spinquant's; use one of them"),
    Conflict("smooth", "spinquant", "smooth writes 1/s into the norms' γ, and the learned R1 needs plain norms"),
    Conflict("shift_scale", "spinquant", "shift_scale writes (β − z)/s and 1/s into the norms, which R1 cannot pass"),
    Conflict("spinquant", "duquant", "duquant refuses to stack its transforms on spinquant's; use one of them"),
    Conflict("duquant", "duquant", "its transforms would be stacked on online ops"),
    Conflict("spinquant", "spinquant", _SPIN_FIRST),
    # out of order, with the reason (other out-of-order pairs are refused by ORDER alone)
    *(Conflict(first, "fold_norms", _UNDO) for first in ("smooth", "shift_scale", "duquant", "spinquant")),
    *(Conflict(first, later, _ONLINE_STATS) for first in ("duquant", "spinquant") for later in MIGRATIONS),
    *(Conflict(first, "rotate", "R1/R2 would not pass its online transforms; rotate first")
      for first in ("duquant", "spinquant")),
    *(Conflict(first, "spinquant", _SPIN_FIRST) for first in ("duquant", "online_hadamard")),
)


def _check_names(names: Iterable[str]) -> None:
    for n in names:
        if n not in OPTIONS:
            raise RecipeError(f"unknown pass {n!r}; known: {sorted(OPTIONS)}")


def chain_refusal(chain: Sequence[tuple[str, PassOptions]]) -> str | None:
    """Why a chain of (pass, options) cannot run in this order, or None. Reasons come first, then the order."""
    names = [n for n, _ in chain]
    _check_names(names)
    for i, (later, opts) in enumerate(chain):
        before = names[:i]
        for need in NEEDS:
            if need.later == later and need.when(opts) and need.first not in before:
                return f"{later} needs {need.first} before it: {need.why}"
        for c in CONFLICTS:
            if c.later == later and c.first in before and c.when(opts):
                return f"{c.first} then {later} cannot compose: {c.why}"
    order = [n for n in ORDER if n in names]
    if [n for n in names if n in order] != order:
        return f"passes must run in the order {order}"
    return None


def check_chain(chain: Sequence[tuple[str, PassOptions]], where: str = "recipe") -> None:
    """Refuse a recipe's chain (``RecipeError``) that a run would refuse."""
    why = chain_refusal(chain)
    if why:
        raise RecipeError(f"{where}: {why}")


def check_can_run(history: Sequence[str], opts: PassOptions) -> None:
    """Refuse (``UnsafeRewriteError``) running the pass of ``opts`` on a Program whose passes so far were
    ``history`` (names; other steps such as quantize are ignored)."""
    name = opts.name
    done = [n for n in history if n in OPTIONS]
    for need in NEEDS:
        if need.later == name and need.when(opts) and need.first not in done:
            raise UnsafeRewriteError(f"{name} needs {need.first} first: {need.why}")
    for c in CONFLICTS:
        if c.later == name and c.first in done and c.when(opts):
            raise UnsafeRewriteError(f"{name} after {c.first}: {c.why}")
    late = [n for n in done if ORDER.index(n) > ORDER.index(name)]
    if late:
        raise UnsafeRewriteError(f"{name} after {late[0]}: passes run in the order {' → '.join(ORDER)}; "
                                 f"run {name} before {late[0]}")


def history(program) -> list[str]:
    """The names of the passes a Program has been through, in order."""
    return [r.name for r in program.reports]
