"""Run Triton kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Kernels decorated after ``TRITON_INTERPRET=1`` is set run interpreted. Triton's own library
functions (``tl.cdiv``, ``tl.sum``, …) were decorated when Triton was first imported, which in a test
session happens early (``transformers`` imports it) and without the variable; ``interpret_library``
lets interpreted kernels call those compiled-mode functions by interpreting them on the spot.

Triton 3.9's interpreter stores bfloat16 as raw uint16 bits and forgets to convert them in two
places: integer↔bfloat16 casts (it converts the *value* to uint16 bits) and ``tl.dot`` of bfloat16
operands (it multiplies the bit patterns). ``patch_bfloat16`` routes both through float32, the
conversion the interpreter already does right; it is applied only if a probe shows the bug, so a
fixed Triton runs unpatched. Nothing outside the interpreter is touched.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton.jit decorates the kernels

import numpy as np  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def interpret_library() -> None:
    if getattr(JITFunction, "_qcompile_interpret_patch", False):
        return
    compiled_call = JITFunction.__call__
    cache: dict = {}

    def __call__(self, *args, **kwargs):
        if os.environ.get("TRITON_INTERPRET") != "1":
            return compiled_call(self, *args, **kwargs)
        fn = cache.get(self.fn) or cache.setdefault(self.fn, interpreter.InterpretedFunction(self.fn))
        return fn(*args, **kwargs)

    JITFunction.__call__ = __call__
    JITFunction._qcompile_interpret_patch = True


def _probe_is_buggy() -> bool:
    b = interpreter.InterpreterBuilder
    h = interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32)
    out = b.cast_impl(b.__new__(b), h, tl.bfloat16)
    back = b.cast_impl(b.__new__(b), out, tl.float32)
    return float(back.data[0]) != 3.0


def patch_bfloat16() -> None:
    cls = interpreter.InterpreterBuilder
    if getattr(cls, "_qcompile_bf16_patch", False) or not _probe_is_buggy():
        return
    cast, dot = cls.cast_impl, cls.create_dot

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        exact = (tl.float32, tl.bfloat16)
        if (d == tl.bfloat16 and s not in exact) or (s == tl.bfloat16 and d not in exact):
            return cast(self, cast(self, src, tl.float32), dst_type)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = cast(self, a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = cast(self, b, tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    cls.cast_impl, cls.create_dot = cast_impl, create_dot
    cls._qcompile_bf16_patch = True
