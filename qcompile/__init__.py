"""qcompile: a quantizing compiler for causal language models."""

from qcompile.errors import QCompileError

__version__ = "0.1.0"
__all__ = ["QCompileError", "__version__", "export_onnx"]


def export_onnx(source, out, force: bool = False, int8_path: str = "matmulinteger"):
    """Export a `qcompile quantize` directory (or a lowered Program) to an ONNX folder (``qcompile.export.onnx``)."""
    from qcompile.export.onnx import export_onnx as _export_onnx

    return _export_onnx(source, out, force=force, int8_path=int8_path)
