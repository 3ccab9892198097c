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

``bind`` goes one step further for the decode hot path (``plans.py``): a compiled specialization with
its grid and constexprs fixed, called with the runtime arguments as plain values (addresses and ints).
Its per-call work is one stream query and the launcher call; where the launcher is Triton 3.6's
(whose Python ``__call__`` only allocates scratch memory, none for these kernels, before calling its
C ``launch``) the C function is called directly.
"""

from __future__ import annotations

import inspect
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


def _spec(args: tuple) -> tuple[list, list]:
    """The launcher's values (tensors as addresses) and the cache key's facts about each argument."""
    values, spec = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            p = a.data_ptr()
            values.append(p)
            spec.append((a.dtype, a.is_cuda, not p & 15))
        else:
            values.append(a)
            spec.append(a)
    return values, spec


def launch(fn, grid: tuple[int, ...], args: tuple, consts: dict[str, Any], num_warps: int,
           num_stages: int | None = None) -> None:
    """``fn[grid](*args, **consts, num_warps=…, num_stages=…)``, from the second call of a
    specialization on without the JIT's per-call binding. The key holds, per tensor, its dtype, device
    kind and whether it is 16-byte aligned, and every scalar's value (a superset of Triton's facts about it,
    cheaper to key on than to derive)."""
    values, spec = _spec(args)
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


def _direct(launcher) -> bool:
    """Whether ``launcher`` is Triton 3.6's ``CudaLauncher`` shape: ``__call__(gridX, gridY, gridZ, stream,
    function, *args)`` allocating scratch (none needed here) and calling ``self.launch(gridX, gridY,
    gridZ, stream, function, cooperative, pdl, global_scratch, profile_scratch, *args)``. Checked on the
    source once per launcher class; any other Triton takes the public call."""
    cls = type(launcher)
    hit = _direct_classes.get(cls)
    if hit is None:
        try:
            src = inspect.getsource(cls.__call__)
        except (OSError, TypeError):
            src = ""
        hit = ("self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,"
               in " ".join(src.split()) and "global_scratch, profile_scratch, *args)" in src
               and list(inspect.signature(cls.__call__).parameters)[:6] == ["self", "gridX", "gridY", "gridZ",
                                                                            "stream", "function"])
        _direct_classes[cls] = hit
    return (hit and getattr(launcher, "global_scratch_size", 1) == 0
            and getattr(launcher, "profile_scratch_size", 1) == 0 and not getattr(launcher, "gsan_enabled", False))


_direct_classes: dict = {}


class Bound:
    """One compiled kernel specialization with its grid and constexprs fixed: ``bound(*values)`` launches
    it on the current stream with the runtime arguments given as values (tensor addresses as ints, in the
    kernel's order). Launch hooks (profilers) installed later are honoured: the call then takes the
    launcher's public path with their metadata."""

    __slots__ = ("kernel", "run", "c_launch", "prefix", "grid", "tail")

    def __init__(self, kernel, grid: tuple[int, ...], tail: tuple):
        self.kernel = kernel
        self.run = kernel.run  # the launcher object (creates the module handles on first access)
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.tail = tail
        direct = _direct(self.run)
        self.c_launch = self.run.launch if direct else None
        self.prefix = ((kernel.function, self.run.launch_cooperative_grid, self.run.launch_pdl, None, None,
                        kernel.packed_metadata, None, None, None) if direct else None)

    def __call__(self, *values) -> None:
        if not _current:
            _current[:] = [driver.active.get_current_stream, driver.active.get_current_device]
        stream = _current[0](_current[1]())
        runtime = knobs.runtime
        enter, leave = _hook(runtime.launch_enter_hook), _hook(runtime.launch_exit_hook)
        g = self.grid
        if enter is None and leave is None:
            if self.c_launch is not None:
                self.c_launch(g[0], g[1], g[2], stream, *self.prefix, *values, *self.tail)
                return
            k = self.kernel
            self.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, None, None, None, *values, *self.tail)
            return
        k = self.kernel
        meta = None if enter is None else k.launch_metadata(g, stream, *values, *self.tail)
        self.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, meta, enter, leave, *values, *self.tail)


def bind(fn, grid: tuple[int, ...], args: tuple, consts: dict[str, Any], num_warps: int,
         num_stages: int | None = None) -> Bound | None:
    """The ``Bound`` launch of the specialization ``launch`` would use for these arguments, or None where
    none is compiled yet (call ``launch`` once first) or none can be (the interpreter)."""
    _, spec = _spec(args)
    hit = _compiled.get((fn, *consts.items(), num_warps, num_stages, *spec))
    return None if hit is None else Bound(hit[0], grid, hit[1])
