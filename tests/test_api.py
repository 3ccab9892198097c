"""The public API in ``qcompile/__init__.py``: each function typed and documented, and one round trip
(quantize a tiny model, save, load) whose saved model computes what the returned Program computes."""

import inspect
import typing

import pytest
import torch

import qcompile
from qcompile.errors import ArtifactError, QCompileError, RecipeError

PUBLIC = ("capture", "quantize", "save", "load", "export_onnx", "evaluate", "generate")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_function_is_exported_typed_and_documented(name):
    fn = getattr(qcompile, name)
    assert name in qcompile.__all__ and fn.__doc__ and len(fn.__doc__.split()) > 8
    sig = inspect.signature(fn)
    untyped = [p for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty
               and p.name not in ("source", "out", "tokenizer")]  # export_onnx's and quantize's any-typed ones
    assert not untyped or name == "export_onnx", untyped


def test_public_annotations_resolve():
    from pathlib import Path

    from qcompile.artifact import LoadedModel
    from qcompile.decoding import Sampling
    from qcompile.program import Program
    from qcompile.recipe import Recipe

    namespace = vars(qcompile) | dict(torch=torch, Path=Path, LoadedModel=LoadedModel, Sampling=Sampling,
                                      Program=Program, Recipe=Recipe)
    for name in ("capture", "quantize", "save", "load", "evaluate", "generate"):
        typing.get_type_hints(getattr(qcompile, name), globalns=namespace)


@pytest.fixture(scope="module")
def tiny():
    from qcompile.models import tiny

    return tiny("llama")


def test_quantize_save_load_round_trip(tiny, tmp_path):
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(0))
    program = qcompile.quantize(tiny, "rtn", out=tmp_path / "m", name="tiny:llama", progress=False)
    assert program.quantized and any("qcompile" in str(n.target) for n in program.module.graph.nodes)
    loaded = qcompile.load(tmp_path / "m")
    assert loaded.recipe.name == "rtn" and loaded.manifest["model"] == "tiny:llama"
    assert torch.equal(loaded.logits(ids), program.logits(ids))
    with pytest.raises(ArtifactError, match="already exists"):
        qcompile.save(program, tmp_path / "m", "rtn", "tiny:llama")


def test_quantize_takes_a_captured_program_and_a_recipe_object(tiny):
    from qcompile.recipe import load_recipe

    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    program = qcompile.capture(tiny)
    a = qcompile.quantize(program, load_recipe("rtn"), progress=False)
    b = qcompile.quantize(program, "rtn", progress=False)
    assert torch.equal(a.logits(ids), b.logits(ids))
    ref = tiny(input_ids=ids).logits
    assert 0 < (a.logits(ids) - ref).abs().max() < 0.5 * ref.abs().max()  # quantized, not broken


def test_refusals_come_before_the_slow_part(tiny, tmp_path):
    with pytest.raises(QCompileError, match="give name="):
        qcompile.quantize(tiny, "rtn", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npasses:\n  - fold_norms: {}\n  - duquant: {progress: false}\n")
    with pytest.raises(RecipeError, match="pass duquant has no option 'progress'"):
        qcompile.quantize(tiny, str(bad))
