"""Recipes: which passes run, with which settings, and how weights, activations and KV are quantized.

A recipe is data (a YAML file under ``qcompile/recipes/`` or a user's file), validated completely
before anything runs: an unknown pass, key or value is a ``RecipeError`` naming it. Recipes compose by
name with ``+`` (``quarot+gptq``): the passes are concatenated in order (a pass repeated with the same
options runs once, with other options it is an error), and each later recipe's quantization sections
override the earlier ones. A chain has one channel migration: when an earlier recipe migrates (smooth or
shift_scale), it stands in for a later recipe's, so ``osplus+duquant`` is DuQuant with OS+ in the place
of its SmoothQuant.

    name: quarot
    passes:
      - fold_norms: {}
      - rotate: {kind: hadamard, seed: 0}
      - online_hadamard: {r3: true, r4: true}
    weights: {method: rtn, bits: 4, symmetric: true, granularity: channel, clip_search: true}
    activations: {bits: 4, symmetric: true, clip_ratio: 0.9}
    kv: {bits: 4, symmetric: false, clip_ratio: 0.95}
    calibration: {samples: 128, seq: 2048, seed: 0}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from qcompile.errors import RecipeError
from qcompile.passes.options import MIGRATIONS, OPTIONS, PassOptions, check_chain
from qcompile.quant.formats import Granularity, QuantSpec

RECIPE_DIR = Path(__file__).parent / "recipes"
WEIGHT_METHODS = ("rtn", "gptq", "leanquant", "leanquant-nu")


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}") from None


@dataclass(frozen=True)
class WeightQuant:
    """How linear weights are quantized (lm_head and embeddings stay in float unless ``include_lm_head`` or
    ``vocab_bits`` says otherwise)."""

    method: str = "rtn"
    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None  # None: per output channel
    clip_search: bool = True  # RTN's MSE clip search (also picks GPTQ's per-group grid with mse)
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    percdamp: float = 0.01
    p: float = 4.0  # LeanQuant's loss-error exponent
    include_lm_head: bool = False  # the lm_head quantized by ``method`` with the other linears (untied first)
    vocab_bits: int | None = None  # the embedding table (and the lm_head unless included): RTN, sym, g32 (passes.vocab)

    def __post_init__(self):
        if self.vocab_bits not in (None, 4, 8):
            raise RecipeError(f"weights.vocab_bits must be 4, 8 or null (float), got {self.vocab_bits!r}")
        if self.method not in WEIGHT_METHODS:
            raise RecipeError(f"weights.method {self.method!r} is not one of {WEIGHT_METHODS}")
        if self.method == "leanquant-nu" and self.group_size:
            raise RecipeError("weights.group_size does not apply to leanquant-nu (one codebook per row)")
        self.spec  # validates bits / group_size

    @property
    def spec(self) -> QuantSpec:
        gran = Granularity.GROUP if self.group_size else Granularity.CHANNEL
        return QuantSpec(self.bits, self.symmetric, gran, self.group_size)


@dataclass(frozen=True)
class ActQuant:
    """Per-token dynamic quantization of every quantized linear's input."""

    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0

    def __post_init__(self):
        QuantSpec(self.bits, self.symmetric, Granularity.TOKEN, clip_ratio=self.clip_ratio)


@dataclass(frozen=True)
class KVQuant:
    """K (after RoPE and R3) and V quantized per (token, head), asymmetric by default."""

    bits: int = 4
    symmetric: bool = False
    clip_ratio: float = 0.95

    def __post_init__(self):
        QuantSpec(self.bits, self.symmetric, Granularity.HEAD, 1, clip_ratio=self.clip_ratio)


@dataclass(frozen=True)
class Calibration:
    samples: int = 128
    seq: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.seq < 2:
            raise RecipeError(f"calibration needs samples ≥ 1 and seq ≥ 2, got {self.samples} × {self.seq}")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    passes: tuple = ()  # ((pass name, {options}), ...)
    weights: WeightQuant | None = None
    activations: ActQuant | None = None
    kv: KVQuant | None = None
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self):
        names = [n for n, _ in self.passes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RecipeError(f"recipe {self.name}: pass(es) {dup} named more than once")
        chain = self.pass_options()
        check_chain(chain, f"recipe {self.name}")
        if "spinquant" in names:
            self._check_spinquant_online(dict(chain))

    def pass_options(self) -> tuple[tuple[str, PassOptions], ...]:
        """Each pass with its options object (``qcompile.passes.options``), validated."""
        out = []
        for n, params in self.passes:
            if n not in OPTIONS:
                raise RecipeError(f"recipe {self.name}: unknown pass {n!r}; known: {sorted(OPTIONS)}")
            out.append((n, OPTIONS[n].from_dict(params)))
        return tuple(out)

    def _check_spinquant_online(self, chain: dict) -> None:
        """spinquant trains with R3/R4 in its forward; the online_hadamard that adds them must agree."""
        trained, applied = chain["spinquant"], chain.get("online_hadamard")
        for r in ("r3", "r4"):
            t = getattr(trained, r)
            a = applied is not None and getattr(applied, r)
            if t != a:
                raise RecipeError(
                    f"recipe {self.name}: spinquant trains with {r} {'on' if t else 'off'} but "
                    f"{'online_hadamard applies it' if a else 'no online_hadamard applies it'}; "
                    f"set spinquant's {r}: {str(a).lower()} or online_hadamard's {r}: {str(t).lower()}")

    @property
    def quantizes(self) -> bool:
        return any((self.weights, self.activations, self.kv))

    def options(self, pass_name: str) -> dict | None:
        return next((dict(p) for n, p in self.passes if n == pass_name), None)

    def with_bits(self, w: int | None = None, a: int | None = None, kv: int | None = None,
                  group: int | None = None, symmetric: bool | None = None, vocab: int | None = None,
                  lm_head: bool | None = None) -> "Recipe":
        """The recipe with bit widths from the command line (16 or more turns that part off; ``vocab``: the
        embedding table and lm_head, ``weights.vocab_bits``; ``lm_head``: ``weights.include_lm_head``)."""
        changes = {}
        if w is not None and w >= 16:
            changes["weights"] = None
        elif w is not None or group is not None or (symmetric is not None and self.weights):
            base = self.weights or WeightQuant()
            changes["weights"] = dataclasses.replace(
                base, bits=w if w is not None else base.bits,
                group_size=group if group is not None else base.group_size,
                symmetric=symmetric if symmetric is not None else base.symmetric)
        flags = {}  # weights-section settings that only make sense on a recipe that quantizes weights
        if vocab is not None:
            flags["vocab_bits"] = (None if vocab >= 16 else vocab, vocab < 16, "vocabulary tables are")
        if lm_head is not None:
            flags["include_lm_head"] = (lm_head, lm_head, "the lm_head is")
        for key, (value, needs_weights, what) in flags.items():
            weights = changes.get("weights", self.weights)
            if weights is None and needs_weights:
                raise RecipeError(f"{what} quantized with the weights: this recipe quantizes none")
            if weights is not None:
                changes["weights"] = dataclasses.replace(weights, **{key: value})
        if a is not None:
            changes["activations"] = None if a >= 16 else dataclasses.replace(self.activations or ActQuant(), bits=a)
        if kv is not None:
            changes["kv"] = None if kv >= 16 else dataclasses.replace(self.kv or KVQuant(), bits=kv)
        return dataclasses.replace(self, **changes)

    def with_calibration(self, samples: int | None = None, seq: int | None = None) -> "Recipe":
        c = self.calibration
        return dataclasses.replace(self, calibration=dataclasses.replace(
            c, samples=samples or c.samples, seq=seq or c.seq))

    def without_quantization(self) -> "Recipe":
        return dataclasses.replace(self, weights=None, activations=None, kv=None)

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description,
             "passes": [{n: dict(p)} for n, p in self.passes]}
        for key in ("weights", "activations", "kv", "calibration"):
            v = getattr(self, key)
            if v is not None:
                d[key] = dataclasses.asdict(v)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"{where} must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
        passes = []
        for item in d.get("passes") or []:
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                raise RecipeError(f"{where}: each pass is `name: {{options}}`, got {item!r}")
            (n, params), = item.items()
            passes.append((n, dict(params) if isinstance(params, dict) else params or {}))
        sections = {
            "weights": WeightQuant,
            "activations": ActQuant,
            "kv": KVQuant,
            "calibration": Calibration,
        }
        kwargs = {k: _from_dict(c, d[k], f"{where}.{k}") for k, c in sections.items() if d.get(k) is not None}
        return cls(name=d.get("name", where), description=d.get("description", ""), passes=tuple(passes), **kwargs)


def quantized_linears(mm, recipe: Recipe) -> list[str]:
    """Linear nodes of a ModelMap whose weights (and inputs) the recipe quantizes: all but the lm_head unless
    asked."""
    include_head = recipe.weights is not None and recipe.weights.include_lm_head
    return [n for n in mm.linears if n != mm.lm_head or include_head]


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _load_one(spec: str) -> Recipe:
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        source = path
    elif (RECIPE_DIR / f"{spec}.yaml").is_file():
        source = RECIPE_DIR / f"{spec}.yaml"
    else:
        raise RecipeError(f"unknown recipe {spec!r}; known: {', '.join(available())} (or a .yaml file)")
    try:
        data = yaml.safe_load(source.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    return Recipe.from_dict(data, where=str(source.name))


def load_recipe(spec: str) -> Recipe:
    """A recipe by name, file, or a ``+``-composition of them."""
    parts = [_load_one(s) for s in spec.split("+")]
    recipe = parts[0]
    for nxt in parts[1:]:
        migrates = any(n in MIGRATIONS for n, _ in recipe.passes)
        recipe = Recipe(
            name=f"{recipe.name}+{nxt.name}",
            description="; ".join(filter(None, (recipe.description, nxt.description))),
            passes=recipe.passes + tuple(p for p in nxt.passes
                                         if p not in recipe.passes and not (migrates and p[0] in MIGRATIONS)),
            weights=nxt.weights or recipe.weights,
            activations=nxt.activations or recipe.activations,
            kv=nxt.kv or recipe.kv,
            calibration=nxt.calibration if nxt.calibration != Calibration() else recipe.calibration,
        )
    return recipe
