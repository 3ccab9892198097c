"""Launch a Triton kernel with little Python per call.

``kernel[grid](*args, **meta)`` re-derives on every call what a compiled kernel is specialized on,
formats the launch options into a string key and re-checks the kernel's globals: tens of µs of
Python on the lent H200's host, more than a decode GEMV runs on the GPU. ``launch`` keys its own
cache on what Triton specializes on (per pointer: dtype and 16-byte alignment; per scalar: its
value, a superset of Triton's facts; the constexprs and launch options), in one pass over the
arguments, and calls the compiled kernel's launcher directly. The first call of each key goes through
the JIT (which compiles, launches and returns the kernel to cache), and so does every call under the
interpreter. Launch hooks (profilers) are passed on as the JIT passes them, an empty chain as none.

Kernels launched here take their runtime arguments first and their constexprs last (no defaults),
so the launcher's argument list is ``args`` followed by the constexpr values in signature order.
"""

from __future__ import annotations

from typing import Any

import torch
from triton import knobs
from triton.runtime import driver

_compiled: dict[tuple, tuple[Any, tuple]] = {}


def _spec(a: Any) -> Any:
    """What the compiled kernel may depend on: a tensor's dtype and 16-byte alignment; a scalar's
    value itself (a superset of Triton's facts about it, cheaper to key on than to derive)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, (a.data_ptr() & 15) == 0
    return a


def _hook(h):
    """A launch hook, or None for an empty ``HookChain`` (Triton ≥ 3.5 installs one by default;
    calling it and building its launch metadata costs µs per launch and does nothing)."""
    return None if h is None or getattr(h, "calls", True) == [] else h


def launch(fn, grid: tuple[int, ...], args: tuple, consts: dict[str, Any], num_warps: int,
           num_stages: int | None = None) -> None:
    """``fn[grid](*args, **consts, num_warps=…, num_stages=…)``, from the second call of a
    specialization on without the JIT's per-call binding."""
    key = (fn, tuple(consts.items()), num_warps, num_stages, *map(_spec, args))
    hit = _compiled.get(key)
    if hit is None:
        opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        kernel = fn[grid](*args, **consts, **opts)
        if hasattr(kernel, "packed_metadata"):  # a compiled kernel (the interpreter returns none)
            _compiled[key] = (kernel, tuple(consts[name] for name in fn.arg_names[len(args):]))
        return
    kernel, tail = hit
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    enter, leave = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
    meta = None if enter is None else kernel.launch_metadata(grid3, stream, *args, *tail)
    kernel.run(*grid3, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *args, *tail)
