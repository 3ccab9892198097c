"""qcompile: a quantizing compiler for causal language models."""

from qcompile.errors import QCompileError

__version__ = "0.1.0"
__all__ = ["QCompileError", "__version__"]
