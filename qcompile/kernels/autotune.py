"""Pick the fastest of a few kernel variants per shape, once, and remember the choice in a file.

A *candidate* is a named way to run an op (one Triton kernel with fixed meta-parameters, or a
different strategy such as dequantize-then-cuBLAS); candidates are compared end to end, so the cost
of any extra launch (split-K zeroing and casting) is part of what is measured, and as a decode step runs
them (``step_time``): replayed from a CUDA graph, each call right after a small elementwise kernel (the one
that makes the op's input in a step), cycling through copies of the op's weights that together fill four times
the L2 cache (a step reads each layer's weights once). On the H200 two other ways picked the word GEMV at the 7B
step's N-long shapes, where the tensor-core GEMV is 1–2 µs faster in the step (``benchmarks/results/
kernels-h200.md``): timed as launched after a long L2-clearing kernel (``do_bench``), and as a graph replay of
one weight after a read of twice the L2 cache. Candidates are timed as launched only when none can be captured.
The winner for a ``(kernel family, shape key)`` on a given GPU is stored by name in a JSON file:
``$QCOMPILE_KERNEL_CACHE`` or ``~/.cache/qcompile/kernel-configs.json``.

No tuning happens where it cannot be measured: on the Triton interpreter, while a CUDA graph is
being captured (tune by running the op once before capturing), or with ``QCOMPILE_AUTOTUNE=0``; the
first candidate in the list (the heuristic default) is used then, and nothing is stored.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_VERSION = 2  # 2: winners timed as a CUDA graph replays them (step_time); 1: as launched


@dataclass(frozen=True)
class Candidate:
    """One way to run an op: ``name`` is stable (it is what the cache stores), ``meta`` holds its
    compile-time parameters (including ``num_warps`` / ``num_stages`` for Triton kernels)."""

    name: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def cache_path() -> Path:
    env = os.environ.get("QCOMPILE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qcompile" / "kernel-configs.json"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuning_enabled() -> bool:
    return os.environ.get("QCOMPILE_AUTOTUNE", "1") != "0" and not _interpreting()


class _Store:
    """The JSON file of winners, loaded lazily, rewritten atomically after each new entry."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._entries: dict[str, str] = {}

    def _load(self) -> None:
        path = cache_path()
        if path == self._path:
            return
        self._path, self._entries = path, {}
        try:
            data = json.loads(path.read_text())
            if data.get("version") == CACHE_VERSION:
                self._entries = dict(data.get("entries", {}))
        except (OSError, ValueError):
            pass  # no file yet, or an unreadable one: start empty and overwrite it

    def get(self, key: str) -> str | None:
        self._load()
        return self._entries.get(key)

    def put(self, key: str, name: str) -> None:
        self._load()
        self._entries[key] = name
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                json.dump({"version": CACHE_VERSION, "entries": self._entries}, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
        except OSError:
            pass  # a read-only home still runs, it just tunes again next process


_store = _Store()
_memo: dict[str, str] = {}
_chosen: dict[tuple, Candidate] = {}  # (family, key, device) -> winner: the per-call fast path


def _full_key(family: str, key: tuple, device: torch.device) -> str:
    import triton  # only reached on the CUDA path

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{gpu}|triton-{triton.__version__}|{family}|{','.join(map(str, key))}"


def chosen(family: str, key: tuple, device: torch.device) -> Candidate | None:
    """The remembered winner for ``(family, key, device)``, or None: the per-call fast path, with no
    closures to build for ``choose``."""
    return _chosen.get((family, key, device))


def choose(
    family: str,
    key: tuple,
    make_candidates: Callable[[], list[Candidate]],
    run: Callable[[Candidate], Any],
    device: torch.device,
    spread: Callable[[], list[Callable[[Candidate], Any]]] | None = None,
) -> Candidate:
    """``pick`` behind an in-process memo keyed by the cheap tuple ``(family, key, device)``, so that
    a call after the first costs one dict lookup (the op layer's per-call budget is microseconds)."""
    hit = _chosen.get((family, key, device))
    if hit is not None:
        return hit
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    cand = pick(family, key, make_candidates(), run, device, spread)
    if not capturing:  # a choice made blind during capture is not remembered
        _chosen[(family, key, device)] = cand
    return cand


def pick(
    family: str,
    key: tuple,
    candidates: list[Candidate],
    run: Callable[[Candidate], Any],
    device: torch.device,
    spread: Callable[[], list[Callable[[Candidate], Any]]] | None = None,
) -> Candidate:
    """The candidate to use for ``key``: cached, else the fastest by ``step_time``. ``spread``, if given, makes
    runs like ``run`` that each read their own copy of the op's large operands (``copies``): timed in turn, they
    read them from memory, as a decode step reads each layer's weights; without it each call follows a read of
    twice the L2 cache."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if len(candidates) == 1 or not tuning_enabled() or capturing:
        return candidates[0]
    full = _full_key(family, key, device)
    by_name = {c.name: c for c in candidates}
    name = _memo.get(full) or _store.get(full)
    if name in by_name:
        _memo[full] = name
        return by_name[name]
    runs = spread() if spread is not None else [run]
    times = _timed(candidates, runs, device, step_time)
    del runs  # the copies
    if not times:  # nothing could be captured in a graph: time them as launched
        times = _timed(candidates, [run], device, _launched_time)
    best = min(times, key=times.get) if times else candidates[0]
    _memo[full] = best.name
    _store.put(full, best.name)
    return best


def _timed(candidates: list[Candidate], runs: list[Callable[[Candidate], Any]], device: torch.device,
           measure: Callable[..., float]) -> dict[Candidate, float]:
    """Each candidate's time by ``measure`` over ``runs``; one that fails (to compile, to fit in shared memory, to
    be captured) is left out."""
    times = {}
    for cand in candidates:
        try:
            times[cand] = measure([lambda r=r, c=cand: r(c) for r in runs], device)
        except Exception:  # noqa: BLE001 - a variant that fails loses
            pass
    return times


def _launched_time(calls: list[Callable[[], Any]], device: torch.device) -> float:
    from triton.testing import do_bench

    return do_bench(calls[0], warmup=5, rep=25, return_mode="median") * 1e3


def copies(tensors: tuple, device: torch.device) -> list[tuple]:
    """``tensors`` (None stays None) and clones of them, as many as make four times the L2 cache together."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    n = max(2, -(-4 * torch.cuda.get_device_properties(device).L2_cache_size // max(nbytes, 1)))
    return [tensors] + [tuple(None if t is None else t.clone() for t in tensors) for _ in range(n - 1)]


def step_time(calls: list[Callable[[], Any]], device: torch.device, per_graph: int = 64, replays: int = 15) -> float:
    """µs of a call as a decode step's CUDA graph runs it: a graph of about ``per_graph`` calls, cycling through
    ``calls``, each right after an elementwise kernel writing a small tensor (in a step, the kernel making the
    op's input), replayed in turn with the same graph without the calls; the median difference per call. One
    call alone (no copies to cycle through) follows a read of twice the L2 cache too, which leaves it holding
    other, clean lines. Each call runs once first, outside the graph (compiling its kernels, making any cached
    layout)."""
    for call in calls:
        call()
    small = torch.ones(4096, device=device, dtype=torch.bfloat16)
    made = torch.empty_like(small)
    flush = total = None
    if len(calls) == 1:
        flush = torch.ones(2 * torch.cuda.get_device_properties(device).L2_cache_size // 4, device=device)
        total = torch.empty((), device=device)

    def before():
        if flush is not None:
            torch.sum(flush, out=total)
        torch.mul(small, 1.0001, out=made)
    seq = calls * max(1, per_graph // len(calls))

    def with_calls():
        for call in seq:
            before()
            call()

    def alone():
        for _ in seq:
            before()
    graphs = [_capture(with_calls, device), _capture(alone, device)]
    diffs = []
    for _ in range(replays):
        t = [_replay_us(g) for g in graphs]
        diffs.append((t[0] - t[1]) / len(seq))
    return sorted(diffs)[len(diffs) // 2]


def _capture(body: Callable[[], Any], device: torch.device) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
        body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    return graph


def _replay_us(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3
