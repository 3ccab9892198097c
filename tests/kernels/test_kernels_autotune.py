"""The autotuner's choice cache: file location, round trip, tolerance of a bad file, no tuning
where nothing can be measured."""

import json

import torch

from qcompile.kernels import autotune
from qcompile.kernels.autotune import Candidate


def test_cache_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "configs.json"
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(path))
    store = autotune._Store()
    assert store.get("k") is None
    store.put("gpu|triton-x|w4a16_decode|1,4096,4096", "gemv_n16")
    data = json.loads(path.read_text())
    assert data == {"version": autotune.CACHE_VERSION, "entries": {"gpu|triton-x|w4a16_decode|1,4096,4096": "gemv_n16"}}
    assert autotune._Store().get("gpu|triton-x|w4a16_decode|1,4096,4096") == "gemv_n16"


def test_bad_cache_file_is_ignored(tmp_path, monkeypatch):
    path = tmp_path / "configs.json"
    path.write_text("{not json")
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(path))
    store = autotune._Store()
    assert store.get("anything") is None
    store.put("a", "b")
    assert json.loads(path.read_text())["entries"] == {"a": "b"}


def test_no_tuning_under_the_interpreter_or_when_disabled(monkeypatch):
    cands = [Candidate("first", {}), Candidate("second", {})]
    ran = []
    pick = lambda: autotune.pick("fam", (1,), cands, ran.append, torch.device("cpu"))  # noqa: E731
    assert autotune.tuning_enabled() is False  # this session runs Triton interpreted
    assert pick().name == "first" and ran == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "0")
    assert pick().name == "first" and ran == []
