"""Launch a Triton kernel with little Python per call.

``kernel[grid](*args, **meta)`` re-derives on every call what a compiled kernel is specialized on,
formats the launch options into a string key and re-checks the kernel's globals: tens of µs of
Python on the lent H200's host, more than a decode GEMV runs on the GPU. ``launch`` keys its own
cache on what Triton specializes on (per pointer: dtype and 16-byte alignment; per scalar: its
value, a superset of Triton's facts; the constexprs and launch options), in one pass over the
arguments, and calls the compiled kernel's launcher directly, with tensors as their addresses. The first call of each key goes through
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
_current: list = []  # [get_current_stream, get_current_device], bound on the first launch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host: ``triton.cdiv`` is a constexpr function since Triton 3.5, and a host
    call of one costs µs of argument unwrapping."""
    return -(-a // b)


def _hook(h):
    """A launch hook, or None for an empty ``HookChain`` (Triton ≥ 3.5 installs one by default;
    calling it and building its launch metadata costs µs per launch and does nothing)."""
    return None if h is None or getattr(h, "calls", True) == [] else h


def launch(fn, grid: tuple[int, ...], args: tuple, consts: dict[str, Any], num_warps: int,
           num_stages: int | None = None) -> None:
    """``fn[grid](*args, **consts, num_warps=…, num_stages=…)``, from the second call of a
    specialization on without the JIT's per-call binding. The key holds, per tensor, its dtype, device
    kind and whether it is 16-byte aligned, and every scalar's value (a superset of Triton's facts about it,
    cheaper to key on than to derive)."""
    values, spec = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            p = a.data_ptr()
            values.append(p)
            spec.append((a.dtype, a.is_cuda, not p & 15))
        else:
            values.append(a)
            spec.append(a)
    key = (fn, *consts.items(), num_warps, num_stages, *spec)
    hit = _compiled.get(key)
    if hit is None:
        opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        kernel = fn[grid](*args, **consts, **opts)
        if hasattr(kernel, "packed_metadata"):  # a compiled kernel (the interpreter returns none)
            _compiled[key] = (kernel, tuple(consts[name] for name in fn.arg_names[len(args):]))
        return
    kernel, tail = hit
    if not _current:
        _current[:] = [driver.active.get_current_stream, driver.active.get_current_device]
    stream = _current[0](_current[1]())
    grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    runtime = knobs.runtime
    enter, leave = _hook(runtime.launch_enter_hook), _hook(runtime.launch_exit_hook)
    meta = None if enter is None else kernel.launch_metadata(grid3, stream, *args, *tail)
    # tensors go in as their addresses: the launcher then skips its per-pointer data_ptr() call and driver
    # query (cuPointerGetAttribute), which only re-derives the same address for a CUDA tensor (the key holds
    # is_cuda, so a CPU tensor misses the cache and gets the JIT's error)
    kernel.run(*grid3, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *values, *tail)
