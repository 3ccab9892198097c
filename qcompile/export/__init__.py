"""Export of lowered programs: ONNX folders for onnxruntime and onnxruntime-genai (``onnx.py``) and the
onnxruntime session that scores and decodes them (``runtime.py``)."""

from qcompile.export.onnx import export_onnx, is_onnx_folder

__all__ = ["export_onnx", "is_onnx_folder"]
