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


def _tuning_on(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QCOMPILE_AUTOTUNE", "1")
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(tmp_path / "configs.json"))
    monkeypatch.setattr(autotune, "_store", autotune._Store())


def test_candidates_are_timed_as_a_decode_step_runs_them(monkeypatch, tmp_path):
    """``pick`` times every candidate with ``step_time`` over the runs ``spread`` makes (one per copy of the
    weights), never as launched while that works; a candidate that fails loses; the winner is stored under the
    cache's version."""
    _tuning_on(monkeypatch, tmp_path)
    times = {"word": 13.1, "tensor_core": 11.2, "broken": 1.0, "slow": 20.0}
    ran = []

    def run(cand, copy=0):
        ran.append((cand.name, copy))
        if cand.name == "broken":
            raise RuntimeError("out of shared memory")

    def fake_step_time(calls, device):
        for call in calls:
            call()
        return times[ran[-1][0]]

    def never(calls, device):
        raise AssertionError("timed as launched although every candidate could be captured")
    monkeypatch.setattr(autotune, "step_time", fake_step_time)
    monkeypatch.setattr(autotune, "_launched_time", never)
    cands = [Candidate(n, {}) for n in times]
    spread = lambda: [lambda c, i=i: run(c, i) for i in range(3)]  # noqa: E731
    assert autotune.pick("fam_step", (1, 4096), cands, run, torch.device("cpu"), spread).name == "tensor_core"
    assert {(n, i) for n, i in ran if n == "tensor_core"} == {("tensor_core", i) for i in range(3)}
    data = json.loads((tmp_path / "configs.json").read_text())
    assert data["version"] == autotune.CACHE_VERSION == 2
    assert list(data["entries"].values()) == ["tensor_core"]
    ran.clear()  # remembered: no second measurement
    assert autotune.pick("fam_step", (1, 4096), cands, run, torch.device("cpu"), spread).name == "tensor_core"
    assert not ran


def test_timed_as_launched_only_when_nothing_can_be_captured(monkeypatch, tmp_path):
    _tuning_on(monkeypatch, tmp_path)
    times = {"a": 3.0, "b": 2.0}

    def uncapturable(calls, device):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(autotune, "step_time", uncapturable)
    monkeypatch.setattr(autotune, "_launched_time", lambda calls, device: times[calls[0]().name])
    cands = [Candidate(n, {}) for n in times]
    assert autotune.pick("fam_launched", (1,), cands, lambda c: c, torch.device("cpu")).name == "b"


def test_picks_of_an_earlier_cache_version_are_not_reused(tmp_path, monkeypatch):
    """Version 1 stored winners timed as launched; they are not taken for version 2's (timed in a step)."""
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"version": 1, "entries": {"k": "gemv_n8_b256_w2_fused"}}))
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(path))
    assert autotune._Store().get("k") is None
