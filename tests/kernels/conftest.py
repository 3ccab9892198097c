"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter (see interpreter.py):
``TRITON_INTERPRET=1`` must be set before any kernel module is imported, which this conftest does."""

from .interpreter import interpret_library, patch_bfloat16

interpret_library()
patch_bfloat16()
