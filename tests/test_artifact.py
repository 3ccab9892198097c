"""Lowering to INT4 ops and saving/loading: same logits, and every bad directory refused by name."""

import json

import pytest
import torch

from qcompile import artifact
from qcompile.errors import ArtifactError
from qcompile.passes.lower import lower
from qcompile.passes.quantize import quantize
from qcompile.pipeline import run_passes
from qcompile.recipe import load_recipe


@pytest.mark.parametrize("arch", ["llama", "opt", "phi3"])
@pytest.mark.parametrize("setting", [dict(w=4, a=16, kv=16, group=32), dict(w=4, a=8, kv=16),
                                     dict(w=4, a=4, kv=4, group=40, symmetric=False)])
def test_lowered_program_matches_fake_quant(arch, setting, tiny_programs, tiny_ids):
    _, p = tiny_programs[arch]
    r = load_recipe("quarot").with_bits(**setting)
    fake = quantize(run_passes(p, r), r, progress=False)
    low = lower(fake)
    ops = {str(n.target) for n in low.module.graph.nodes}
    a = setting["a"]
    assert ("qcompile.linear_w4a16.default" if a == 16 else f"qcompile.linear_w4a{a}.default") in ops
    assert "aten.linear.default" in ops  # the lm_head stays in float
    ref = fake.logits(tiny_ids)
    assert ((low.logits(tiny_ids) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert not any(k in low.module.state_dict() for k in fake.quantized)  # float copies dropped


def test_lowered_experts_save_and_load(tiny_programs, tiny_ids, tmp_path):
    """Routed experts lower to grouped INT4 ops that torch.export traces (their fake implementation) and a
    loaded artifact runs with the same logits."""
    _, p = tiny_programs["mixtral"]
    r = load_recipe("rtn")
    low = lower(quantize(p, r, progress=False))
    assert not low.reports[-1].skipped and low.reports[-1].counts["W4A16 grouped experts"] == 4
    loaded = artifact.load(artifact.save(low, tmp_path / "moe", r, "tiny:mixtral"))
    assert torch.equal(loaded.logits(tiny_ids), low.logits(tiny_ids))


def test_codebooks_are_reported_not_lowered(tiny_programs):
    _, p = tiny_programs["llama"]
    low = lower(quantize(p, load_recipe("leanquant-nu"), torch.randint(0, 256, (2, 16)), progress=False))
    assert low.reports[-1].skipped and all("codebook" in reason for _, reason in low.reports[-1].skipped)


@pytest.fixture(scope="module")
def saved(tiny_programs, tmp_path_factory):
    _, p = tiny_programs["qwen2"]
    r = load_recipe("quarot")
    low = lower(quantize(run_passes(p, r), r, progress=False))
    out = artifact.save(low, tmp_path_factory.mktemp("art") / "model", r, "tiny:qwen2")
    return low, out


def test_save_load_round_trip(saved, tiny_ids):
    low, out = saved
    loaded = artifact.load(out)
    assert torch.equal(loaded.logits(tiny_ids), low.logits(tiny_ids))
    assert loaded.recipe.name == "quarot" and loaded.manifest["model"] == "tiny:qwen2"


def test_existing_directory_is_not_overwritten(saved):
    low, out = saved
    with pytest.raises(ArtifactError, match="already exists"):
        artifact.save(low, out, load_recipe("quarot"), "tiny:qwen2")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "t")
    data = bytearray((d / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        artifact.load(d)


def test_truncated_file_is_refused(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "t")
    blob = (d / "model.pt2").read_bytes()
    (d / "model.pt2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match="model.pt2 has .* bytes.*truncated"):
        artifact.load(d)


def test_version_mismatch_is_refused(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "t")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        artifact.load(d)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json"):
        artifact.load(tmp_path)


@pytest.mark.real
def test_lowered_smollm2_matches_fake_quant(smollm2_program, smollm2_ids):
    import dataclasses

    r = load_recipe("rtn").with_bits(group=128, symmetric=False)
    r = dataclasses.replace(r, weights=dataclasses.replace(r.weights, clip_search=False))  # the grid is not the point
    fake = quantize(smollm2_program, r, progress=False)
    low = lower(fake)
    assert low.reports[-1].counts["W4A16"] == 210 and not low.reports[-1].skipped
    ref = fake.logits(smollm2_ids)
    assert ((low.logits(smollm2_ids) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
