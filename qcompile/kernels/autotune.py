"""Pick the fastest of a few kernel variants per shape, once, and remember the choice in a file.

A *candidate* is a named way to run an op (one Triton kernel with fixed meta-parameters, or a
different strategy such as dequantize-then-cuBLAS); candidates are compared end to end, so the cost
of any extra launch (split-K zeroing and casting) is part of what is measured. The winner for a
``(kernel family, shape key)`` on a given GPU is stored by name in a JSON file:
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

CACHE_VERSION = 1


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
) -> Candidate:
    """``pick`` behind an in-process memo keyed by the cheap tuple ``(family, key, device)``, so that
    a call after the first costs one dict lookup (the op layer's per-call budget is microseconds)."""
    hit = _chosen.get((family, key, device))
    if hit is not None:
        return hit
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    cand = pick(family, key, make_candidates(), run, device)
    if not capturing:  # a choice made blind during capture is not remembered
        _chosen[(family, key, device)] = cand
    return cand


def pick(
    family: str,
    key: tuple,
    candidates: list[Candidate],
    run: Callable[[Candidate], Any],
    device: torch.device,
) -> Candidate:
    """The candidate to use for ``key``: cached, else measured with ``run`` (median of repeats)."""
    if len(candidates) == 1 or not tuning_enabled() or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    full = _full_key(family, key, device)
    by_name = {c.name: c for c in candidates}
    name = _memo.get(full) or _store.get(full)
    if name in by_name:
        _memo[full] = name
        return by_name[name]
    from triton.testing import do_bench

    best, best_t = candidates[0], float("inf")
    for cand in candidates:
        try:
            t = do_bench(lambda: run(cand), warmup=5, rep=25, return_mode="median")
        except Exception:  # noqa: BLE001 - a variant that fails to compile (e.g. out of shared memory) loses
            continue
        if t < best_t:
            best, best_t = cand, t
    _memo[full] = best.name
    _store.put(full, best.name)
    return best

