"""Every family of models.FAMILIES: captured without refusal, exact under every rewrite it accepts (the sites it
refuses are named with their reason), W4 GPTQ and lowering on every linear found; the README's support table
says what these tests prove."""

from pathlib import Path

import pytest
import torch

from conftest import max_rel_error
from qcompile.analysis.support import CALIBRATED, COLUMNS, calibrated_runs, calibration_windows
from qcompile.errors import QCompileError, UnsafeRewriteError
from qcompile.models import FAMILIES, TINY_ARCHS, attention_for, tiny
from qcompile.passes.fold_norms import fold_norms
from qcompile.passes.lower import lower
from qcompile.passes.online_hadamard import online_hadamard
from qcompile.passes.quantize import quantize
from qcompile.passes.rotate import rotate
from qcompile.pipeline import check_layout
from qcompile.program import Program
from qcompile.recipe import load_recipe

TOL = 1e-4
# (family, pass) -> the reason every skipped site of that pass must give; absent: nothing may be skipped
SKIPS = {
    ("gemma2", "rotate"): "eager attention", ("gemma2", "online_hadamard"): "eager attention",
    ("deepseek_v3", "rotate"): "attention not matched: k of", ("deepseek_v3", "online_hadamard"): "attention not matched",
    ("falcon", "rotate"): "ops ['index'] between v and o",
    ("gpt2", "rotate"): "v is not a row range", ("gpt_neox", "rotate"): "v is not a row range",
}
LAYOUT = {"phi": "parallel", "falcon": "parallel", "gpt_neox": "parallel", "cohere": "parallel",
          "gemma3": "post-norms", "olmo2": "post-norms", "gemma2": "eager attention", "qwen2_moe": "shared expert",
          "deepseek_v3": "attention not matched"}
# (family, support-table column, run) -> the reason the pass refuses that run with (tests/passes/* prove the
# calibrated passes on TINY_ARCHS; the other families are proved here)
REFUSED_RUNS = {("gpt2", "DuQuant", "fused"): "v is not a row range",
                ("gpt2", "SpinQuant", "SpinQuant"): "v is not a row range"}
PARALLEL = {"phi", "falcon", "gpt_neox", "cohere"}
POST_NORMS = {"gemma2": 4, "gemma3": 4, "olmo2": 4}


@pytest.fixture(scope="module")
def programs():
    return {}


def _program(programs, arch):
    if arch not in programs:
        model = tiny(arch)
        programs[arch] = (model, Program.capture(model))
    return programs[arch]


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", FAMILIES)
def test_capture_is_exact_and_finds_the_structure(arch, programs, ids):
    model, p = _program(programs, arch)
    with torch.no_grad():
        assert max_rel_error(p.logits(ids), model(input_ids=ids).logits) == 0.0
    mm = p.model_map
    assert mm.stream_matched and len(mm.blocks) == model.config.num_hidden_layers
    assert all(b.parallel == (arch in PARALLEL) for b in mm.blocks)
    assert sum(len(b.post_norms) for b in mm.blocks) == POST_NORMS.get(arch, 0)
    n_params = sum(1 for n, w in model.named_parameters() if w.dim() >= 2 and "embed" not in n and "wte" not in n
                   and "wpe" not in n and "word_embeddings" not in n)
    assert len(mm.linears) >= n_params - (1 if mm.tied else 0) - 2  # every 2-D weight but embeddings is a linear


@pytest.mark.parametrize("chain", ["fold", "fold+rotate", "online", "fold+rotate+online"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_rewrites_are_exact_or_skip_sites_with_their_reason(arch, chain, programs, ids):
    model, p = _program(programs, arch)
    out = p
    if "fold" in chain:
        out = fold_norms(out)
    if "rotate" in chain:
        out = rotate(out)
    if "online" in chain:
        out = online_hadamard(out)
    ref = p.logits(ids)
    assert max_rel_error(out.logits(ids), ref) <= TOL
    for r in out.reports:
        expected = SKIPS.get((arch, r.name))
        assert all(expected and expected in why for _, why in r.skipped), r.skipped
        if expected:
            assert r.skipped
    if "rotate" in chain:
        assert out.reports[-1 if "online" not in chain else -2].counts["R1 reader"] > 0


@pytest.mark.parametrize("arch", FAMILIES)
def test_layout_refusals_name_the_reason(arch, programs):
    _, p = _program(programs, arch)
    if arch in LAYOUT:
        with pytest.raises(UnsafeRewriteError, match=LAYOUT[arch]):
            check_layout(p.model_map, "duquant")
    else:
        check_layout(p.model_map, "duquant")


@pytest.mark.parametrize("arch", FAMILIES)
def test_w4_gptq_and_lowering_on_every_linear(arch, programs, ids):
    _, p = _program(programs, arch)
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    q = quantize(p, load_recipe("gptq"), calib, progress=False)
    mm = p.model_map
    assert {mm.linears[n].weight for n in mm.linears if n != mm.lm_head} <= set(q.quantized)
    assert not q.reports[-1].skipped  # every routed expert of these calibration windows got tokens
    low = lower(q)
    assert max_rel_error(low.logits(ids), q.logits(ids)) < 1e-3
    assert not low.reports[-1].skipped
    assert low.reports[-1].counts.get("W4A16 grouped experts", 0) == sum(1 for lin in mm.linears.values()
                                                                         if lin.experts)


def test_post_norm_rotation_needs_a_hadamard(programs):
    _, p = _program(programs, "gemma3")
    with pytest.raises(UnsafeRewriteError, match="post-norm .*diag"):
        rotate(fold_norms(p), kind="orthogonal")


def test_attention_implementation_follows_transformers():
    assert tiny("gemma2").config._attn_implementation == "eager"
    assert tiny("llama").config._attn_implementation == "sdpa"
    assert attention_for(tiny("gemma3").config) == "sdpa"


@pytest.mark.parametrize("col", CALIBRATED)
@pytest.mark.parametrize("arch", [a for a in FAMILIES if a not in TINY_ARCHS])
def test_calibrated_passes_are_exact_or_refused_with_their_reason(arch, col, programs, ids):
    """smooth and OS+, DuQuant (online and fused), SpinQuant: refused by the plan for the layout, refused by the
    pass at a site it cannot prove, or exact; the runs are the support table's."""
    _, p = _program(programs, arch)
    if arch in LAYOUT:
        for name in CALIBRATED[col]:
            with pytest.raises(UnsafeRewriteError, match=LAYOUT[arch]):
                check_layout(p.model_map, name)
        return
    ref = p.logits(ids)
    for label, run in calibrated_runs(col, p, calibration_windows()).items():
        why = REFUSED_RUNS.get((arch, col, label))
        if why:
            with pytest.raises(QCompileError, match=why):
                run()
        else:
            assert max_rel_error(run().logits(ids), ref) <= TOL, label


def _readme_table() -> dict[str, dict[str, str]]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| architecture")]
    table = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) == len(COLUMNS) + 1 and cells[0] in FAMILIES:
            table[cells[0]] = dict(zip(COLUMNS, cells[1:]))
    return table


def test_readme_support_table_says_what_these_tests_prove():
    """Every family has a row; a column is ✘ exactly where the tests expect a refusal, with that refusal's reason;
    every skipped site gives the reason the tests expect; GPTQ and the lowering cover every linear, experts
    included."""
    table = _readme_table()
    assert set(table) == set(FAMILIES)
    moe = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
    for arch, row in table.items():
        assert row["capture"].startswith("✔") and row["fold"].startswith("✔"), arch
        for col, name in (("rotate", "rotate"), ("online Hadamards", "online_hadamard")):
            expected = SKIPS.get((arch, name))
            assert row[col] == "✔" if not expected else (row[col].startswith("✔ (") and expected in row[col]), (arch, col)
        for col in CALIBRATED:
            cell = row[col]
            if arch in LAYOUT:
                assert cell.startswith("✘") and LAYOUT[arch] in cell, (arch, col, cell)
                continue
            refused = {label: why for (a, c, label), why in REFUSED_RUNS.items() if (a, c) == (arch, col)}
            labels = list(calibrated_runs(col, None, None))
            if not refused:
                assert cell.startswith("✔"), (arch, col, cell)
            elif len(refused) == len(labels):
                assert cell.startswith("✘") and all(why in cell for why in refused.values()), (arch, col, cell)
            else:  # per run: "label ✔; label ✘ reason"
                for label in labels:
                    assert f"{label} {'✘ ' if label in refused else '✔'}" in cell, (arch, col, label, cell)
                assert all(why in cell for why in refused.values()), (arch, col, cell)
        assert row["GPTQ"].startswith("✔") and "RTN" not in row["GPTQ"], arch
        assert row["lower"].startswith("✔") and "fake-quantized" not in row["lower"], arch
        assert ("grouped INT4 expert ops" in row["lower"]) == (arch in moe), arch
        assert ("routed experts each on its own tokens" in row["GPTQ"]) == (arch in moe), arch


def test_refusal_reasons_read_the_same_at_every_site():
    """The support table's reasons drop node numbers and op descriptions, nested shapes included."""
    from qcompile.analysis.support import _clean

    raw = ("attention not matched: k of scaled_dot_product_attention_3 (aten.scaled_dot_product_attention.default, "
           "shape (2, 1, 32, 128)) does not come from exactly one linear: []; more detail")
    assert _clean(raw) == ("attention not matched: k of scaled_dot_product_attention does not come from exactly one "
                           "linear: []")
