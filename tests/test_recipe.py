import pytest

from qcompile.errors import RecipeError
from qcompile.recipe import Recipe, available, load_recipe


def test_every_shipped_recipe_loads_and_round_trips():
    import yaml

    for name in available():
        r = load_recipe(name)
        assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_composition_takes_passes_from_the_first_and_weights_from_the_last():
    r = load_recipe("quarot+gptq")
    assert [n for n, _ in r.passes] == ["fold_norms", "rotate", "online_hadamard"]
    assert r.weights.method == "gptq" and r.activations.bits == 4 and r.kv.bits == 4


def test_an_earlier_migration_stands_in_for_a_later_recipes():
    r = load_recipe("osplus+duquant+gptq")
    assert [n for n, _ in r.passes] == ["fold_norms", "shift_scale", "duquant"]
    assert r.options("duquant")["placement"] == "duquant" and r.weights.method == "gptq"
    both = {"passes": [{"fold_norms": {}}, {"smooth": {}}, {"shift_scale": {}}]}
    with pytest.raises(RecipeError, match="smooth then shift_scale cannot compose"):
        Recipe.from_dict(both)  # a single recipe naming two migrations is still refused


@pytest.mark.parametrize(
    "data, message",
    [
        ({"passes": [{"rotat": {}}]}, "unknown pass 'rotat'"),
        ({"passes": [{"fold_norms": {}}, {"rotate": {"knd": "hadamard"}}]}, "no option 'knd'"),
        ({"passes": [{"fold_norms": {}}, {"rotate": {"seed": "zero"}}]}, "seed must be int"),
        ({"passes": [{"rotate": {}}]}, "needs fold_norms"),
        ({"passes": [{"fold_norms": {}}, {"online_hadamard": {}}, {"rotate": {}}]}, "order"),
        ({"weights": {"method": "awq"}}, "weights.method 'awq'"),
        ({"weights": {"bits": 4, "grup_size": 64}}, r"unknown key\(s\) \['grup_size'\]"),
        ({"weights": {"bits": 11}}, "bits"),
        ({"weights": {"vocab_bits": 6}}, "vocab_bits must be 4, 8"),
        ({"activations": {"bits": 4, "clip_ratio": 1.5}}, "clip"),
        ({"calibration": {"samples": 0}}, "samples"),
        ({"wieghts": {}}, "wieghts"),
    ],
)
def test_bad_recipes_are_refused_with_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_unknown_recipe_name_lists_the_known_ones():
    with pytest.raises(RecipeError, match="quarot"):
        load_recipe("nope")


def test_bits_from_the_command_line():
    r = load_recipe("quarot").with_bits(w=4, a=16, kv=16, group=64)
    assert r.weights.group_size == 64 and r.activations is None and r.kv is None
    assert load_recipe("rtn").with_bits(w=16).weights is None
    both = load_recipe("quarot").with_bits(vocab=8, lm_head=True).weights
    assert both.vocab_bits == 8 and both.include_lm_head  # the embedding by RTN, the lm_head by the method
    with pytest.raises(RecipeError, match="lm_head is quantized with the weights"):
        load_recipe("rotate").with_bits(lm_head=True)


# --- pass options and the ordering rules (qcompile.passes.options) ---------------------------------------------

import inspect  # noqa: E402

from qcompile.errors import UnsafeRewriteError  # noqa: E402
from qcompile.passes import options as po  # noqa: E402


@pytest.mark.parametrize("params, message", [
    ({"progress": False}, r"pass duquant has no option 'progress' \(progress is given when the recipe runs"),
    ({"placement": "nope"}, "pass duquant: placement 'nope'"),
    ({"block": 1}, "pass duquant: block ≥ 2"),
    ({"block": 128.0}, "pass duquant option block must be int"),
    ({"permute": 1}, "pass duquant option permute must be bool"),
    ({"version": 2}, "version 1 here"),
])
def test_bad_pass_options_are_refused_at_validation_naming_pass_and_key(params, message):
    data = {"passes": [{"fold_norms": {}}, {"duquant": params}]}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_every_shipped_pass_mapping_is_its_options_dataclass():
    for name in available():
        r = load_recipe(name)
        for (n, params), (m, opts) in zip(r.passes, r.pass_options()):
            assert n == m and isinstance(opts, po.OPTIONS[n]) and opts.name == n
            assert {k: getattr(opts, k) for k in params} == params  # nothing the recipe wrote is lost
            assert po.OPTIONS[n].from_dict(opts.to_dict()) == opts


def test_options_are_frozen_versioned_and_take_keyword_overrides():
    o = po.RotateOptions(kind="orthogonal", seed=3)
    with pytest.raises(Exception):
        o.seed = 4
    assert po.RotateOptions.version == 1 and po.RotateOptions.from_dict({"version": 1}) == po.RotateOptions()
    assert po.RotateOptions.of(o, {"r2": False}) == po.RotateOptions(kind="orthogonal", seed=3, r2=False)
    with pytest.raises(RecipeError, match="pass rotate takes RotateOptions"):
        po.RotateOptions.of(po.DuQuantOptions(), {})


def test_registry_and_options_list_the_same_passes_in_the_same_order():
    from qcompile.passes.registry import PASSES

    assert tuple(PASSES) == po.ORDER
    for name, spec in PASSES.items():
        assert spec.options is po.OPTIONS[name]
        # a pass's run takes calibration and progress exactly when the registry says the pipeline gives them
        params = inspect.signature(spec.run).parameters
        assert ("calibration" in params, "progress" in params) == (spec.calibration, spec.progress), name
        assert list(params)[:2] == ["program", "options"], name


def _chain(*names, **opts):
    return [(n, po.OPTIONS[n].from_dict(opts.get(n))) for n in names]


def test_recipe_and_run_refuse_the_same_chains():
    """Every ordered pair of passes (after fold_norms): the recipe refuses it exactly when the run-time check
    refuses the later pass on the earlier's history, and the recipe's reason is the run's."""
    variants = {"rotate": [{}, {"r1": False}], "duquant": [{}, {"placement": "fused"}]}
    checked = 0
    for first in po.ORDER:
        for later in po.ORDER:
            for fo in variants.get(first, [{}]):
                for lo in variants.get(later, [{}]):
                    names = ["fold_norms", first, later] if "fold_norms" not in (first, later) else [first, later]
                    chain = _chain(*names, **{first: fo, later: lo})
                    if first == later:
                        continue  # a recipe names a pass once; the run refuses a repeat only where a rule says
                    recipe_why = po.chain_refusal(chain)
                    run_why = None
                    for i, (_, o) in enumerate(chain):
                        try:
                            po.check_can_run([n for n, _ in chain[:i]], o)
                        except UnsafeRewriteError as e:
                            run_why = str(e)
                            break
                    assert (recipe_why is None) == (run_why is None), (names, fo, lo, recipe_why, run_why)
                    checked += 1
    assert checked > 60


def test_chains_the_rules_allow_and_refuse():
    assert po.chain_refusal(_chain("fold_norms", "smooth", "duquant")) is None  # duquant's official chain
    assert "cannot compose" in po.chain_refusal(_chain("fold_norms", "smooth", "duquant",
                                                       duquant={"placement": "fused"}))
    assert po.chain_refusal(_chain("fold_norms", "smooth", "rotate", rotate={"r1": False})) is None
    assert "needs fold_norms" in po.chain_refusal(_chain("duquant", duquant={"placement": "fused"}))
    assert po.chain_refusal(_chain("duquant")) is None
    assert "order" in po.chain_refusal(_chain("fold_norms", "online_hadamard", "rotate"))
    with pytest.raises(UnsafeRewriteError, match="fold_norms after smooth: .*undo"):
        po.check_can_run(["fold_norms", "smooth"], po.FoldNormsOptions())
    with pytest.raises(UnsafeRewriteError, match="rotate after online_hadamard: passes run in the order"):
        po.check_can_run(["fold_norms", "online_hadamard"], po.RotateOptions())
    po.check_can_run(["fold_norms", "quantize"], po.RotateOptions())  # steps that are not passes are ignored
