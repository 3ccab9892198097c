"""Activation statistics before/after a recipe (``qcompile.analysis.stats``), its plots and ``inspect --stats``."""

import json
from pathlib import Path

import pytest
import torch

from qcompile.analysis import stats
from qcompile.cli import main
from qcompile.models import tiny
from qcompile.program import Program
from qcompile.recipe import Recipe, load_recipe

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--calib-samples", "2", "--calib-seq", "32", "--no-progress"]


@pytest.mark.parametrize("draw, expected, tol", [
    (lambda g, n: torch.randn(n, generator=g), 3.0, 0.05),
    (lambda g, n: torch.rand(n, generator=g), 1.8, 0.02),
    (lambda g, n: torch.distributions.Laplace(0.0, 1.0).sample((n,)), 6.0, 0.3),
])
def test_kurtosis_of_known_distributions(draw, expected, tol):
    torch.manual_seed(0)
    x = draw(torch.Generator().manual_seed(0), 400_000)
    assert stats.kurtosis(x) == pytest.approx(expected, abs=tol)


def test_moments_accumulated_over_batches_equal_the_whole_and_are_centred():
    x = torch.randn(6, 50, 8, generator=torch.Generator().manual_seed(0)) * 3 + 100  # far from 0: centring matters
    acc = stats.Moments()
    for batch in x.split(2):
        acc.update(batch)
    assert acc.count == x.numel() and acc.tokens == 300
    assert acc.kurtosis == pytest.approx(stats.kurtosis(x), rel=1e-6)
    assert acc.kurtosis == pytest.approx(3.0, abs=0.3)
    assert torch.equal(acc.absmax, x.reshape(-1, 8).abs().amax(0))


@pytest.fixture(scope="module")
def programs():
    """Two tiny architectures only (capturing all of ``tiny_programs`` costs more than these tests)."""
    return {arch: Program.capture(tiny(arch)) for arch in ("llama", "phi3")}


def test_fp_recipe_leaves_every_site_unchanged(programs):
    program = programs["phi3"]  # fused qkv and gate_up: one input per role still
    c = stats.compare(program, Recipe(name="fp"), samples=2, seq=16, progress=False)
    assert [b.site.key for b in c.before] == [f"{i}:{r}" for i in range(2) for r in stats.ROLES]
    for b, a in c.rows():
        assert (b.max, b.kurtosis) == (a.max, a.kurtosis) and torch.equal(b.channel_max, a.channel_max)


@pytest.fixture(scope="module")
def outlier_program():
    """tiny llama with one massive residual channel (embedding column 3) and one down-input channel (up row 7)."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] *= 60
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[7] *= 60
    return Program.capture(model)


def test_rotate_flattens_injected_outlier_channels(outlier_program):
    c = stats.compare(outlier_program, load_recipe("quarot"), samples=2, seq=32, progress=False)
    rows = {b.site.key: (b, a) for b, a in c.rows()}
    b, _ = rows["0:qkv"]
    assert int(b.channel_max.argmax()) == 3  # the outlier reached the input we measure
    for key in ("0:qkv", "0:up", "1:qkv", "0:down", "1:down"):
        b, a = rows[key]
        assert a.max < 0.5 * b.max and a.kurtosis < 0.5 * b.kurtosis, key
    # the down input is only changed by R4, an online op: lower values prove we measure after it
    assert c.programs[1].node(rows["0:down"][1].site.node).args[0].target is torch.ops.qcompile.hadamard.default


def test_before_does_not_depend_on_the_recipe_and_calibrating_passes_run(programs):
    program = programs["llama"]
    fp = stats.compare(program, Recipe(name="fp"), samples=2, seq=16, progress=False)
    sq = stats.compare(program, load_recipe("smoothquant").with_calibration(2, 16), samples=2, seq=16,
                       progress=False)
    assert [b.max for b in fp.before] == [b.max for b in sq.before]
    assert any("smooth" in line for line in sq.passes)
    assert [b.max for b in sq.before] != [a.max for a in sq.after]


def test_plots_are_png_files_listed_in_the_table(tmp_path, capsys):
    assert main(["inspect", "tiny:llama", "--recipe", "rotate", "--stats", "--plot", str(tmp_path), *SMALL]) == 0
    out = capsys.readouterr().out
    listed = [line.split("plot: ", 1)[1] for line in out.splitlines() if line.startswith("plot: ")]
    assert len(listed) in (5, 7) and sorted(map(Path, listed)) == sorted(tmp_path.glob("*.png"))
    names = {Path(p).name for p in listed}
    assert {"tiny-llama-rotate-layers.png", "tiny-llama-rotate-channels-L0-down.png",
            "tiny-llama-rotate-surface-L0-down.png"} <= names
    for p in listed:
        head = Path(p).read_bytes()
        assert head.startswith(PNG) and 10_000 < len(head) < 300_000, p


def test_plot_site_option_picks_the_sites(tmp_path, capsys):
    assert main(["inspect", "tiny:qwen3", "--plot", str(tmp_path), "--plot-site", "1:o", *SMALL]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "tiny-qwen3-fp-channels-L1-o.png", "tiny-qwen3-fp-layers.png", "tiny-qwen3-fp-surface-L1-o.png"]


def test_json_structure(capsys):
    assert main(["inspect", "tiny:mistral", "--recipe", "rotate", "--stats", "--json", *SMALL]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["model"] == "tiny:mistral" and d["recipe"] == "rotate" and d["plots"] == []
    assert d["windows"] == {"samples": 2, "seq": 32, "seed": 1, "data": "random ids"}
    assert [(s["layer"], s["role"]) for s in d["sites"]] == [(i, r) for i in range(2) for r in stats.ROLES]
    keys = {"node_before", "node_after", "max_before", "max_after", "kurtosis_before", "kurtosis_after"}
    assert all(keys <= set(s) for s in d["sites"])
    assert set(d["summary"]) == {*stats.ROLES, "all"}
    assert d["summary"]["all"]["max_before"] == max(s["max_before"] for s in d["sites"])
    assert any(line.startswith("rotate:") for line in d["passes"])


def test_bad_recipe_name_is_a_recipe_error(capsys):
    assert main(["inspect", "tiny:llama", "--recipe", "quarrot", "--stats", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'quarrot'" in err and "quarot" in err


def test_bad_plot_site_is_refused_before_measuring(tmp_path, capsys):
    assert main(["inspect", "tiny:llama", "--plot", str(tmp_path), "--plot-site", "5:qkv", *SMALL]) == 2
    assert "no site 5:qkv" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.real
def test_quarot_lowers_the_largest_kurtosis_on_the_real_model(smollm2, capsys):
    assert main(["inspect", "smollm2-135m", "--recipe", "quarot", "--stats", "--json", "--calib-samples", "1",
                 "--calib-seq", "128", "--no-progress"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["summary"]["all"]["kurtosis_after"] < d["summary"]["all"]["kurtosis_before"]
    assert d["summary"]["down"]["max_after"] < d["summary"]["down"]["max_before"]
