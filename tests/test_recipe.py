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
