"""ONNX export: ``exporter`` writes and checks a graph (``mmfuse export``); ``runtime`` runs one
(``mmfuse predict --backend onnx``). onnx and onnxruntime are the optional extra ``mmfuse[export]``, imported only
when used."""

from mmfuse.inference.export.exporter import export_readme, export_run, image_preprocess, parity_gate
from mmfuse.inference.export.runtime import OnnxPredictor, find_export, read_export, require_onnx

__all__ = [
    "OnnxPredictor",
    "export_readme",
    "export_run",
    "find_export",
    "image_preprocess",
    "parity_gate",
    "read_export",
    "require_onnx",
]
