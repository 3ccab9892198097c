"""The command-line contract: inspect, plan and eval (the JSON keys later work relies on)."""

import json
import pytest

from qcompile.cli import main


def test_inspect_json_on_a_tiny_model(capsys):
    assert main(["inspect", "tiny:qwen3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["summary"]["qk_norm"] is True and data["summary"]["layers"] == 2


def test_plan_names_every_decision(capsys):
    assert main(["plan", "tiny:phi3", "--recipe", "quarot+gptq", "--group", "40"]) == 0
    out = capsys.readouterr().out
    for needle in ("R1 Hadamard 64", "R2 Hadamard 16", "R3", "R4 Hadamard 96 = 12·8", "last group partial",
                   "A4 per-token", "KV4"):
        assert needle in out


def test_bad_recipe_key_exits_2_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nweights: {bits: 4, grup_size: 64}\n")
    assert main(["plan", "tiny:llama", "--recipe", str(bad)]) == 2
    assert "grup_size" in capsys.readouterr().err


@pytest.mark.real
def test_eval_json_contract_on_the_real_model(smollm2, capsys):
    # in-process: the session's model is reused (qcompile.models.load caches it)
    assert main(["eval", "smollm2-135m", "--recipe", "rotate", "--fp", "--windows", "1", "--seq", "128",
                 "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("model", "recipe", "wbits", "abits", "kvbits", "windows", "seq", "ppl", "seconds"):
        assert key in result
    assert result["windows"] == 1 and result["seq"] == 128 and result["wbits"] == 16
    assert 1 < result["ppl"] < 1000


def test_quantize_then_export_with_an_accuracy_level(tmp_path, capsys):
    """The export command end to end from a saved directory, its options reaching the exporter."""
    import onnx

    saved, out = tmp_path / "q", tmp_path / "onnx"
    assert main(["quantize", "tiny:llama", "--recipe", "rtn", "--group", "32", "--out", str(saved),
                 "--no-progress"]) in (0, None)
    assert main(["export", str(saved), "--onnx", str(out), "--accuracy-level", "4"]) in (0, None)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    levels = {a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
