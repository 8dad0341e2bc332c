"""``ftl export-onnx``: merge the adapter and build an int4 onnxruntime-genai folder through Olive."""

from ftl.export.config import ExportConfig
from ftl.export.stage import ExportResult, build_olive_config, export_onnx

__all__ = ["ExportConfig", "ExportResult", "build_olive_config", "export_onnx"]
