"""``ftl export-onnx``: merge the adapter and build an int4 onnxruntime-genai folder through Olive."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftl.export.config import ExportConfig
from ftl.lazy import lazy_exports

if TYPE_CHECKING:
    from ftl.export.stage import ExportResult, build_olive_config, export_onnx

__all__ = ["build_olive_config", "export_onnx", "ExportConfig", "ExportResult"]
__getattr__ = lazy_exports(__name__, {
    "ExportResult": "ftl.export.stage",
    "build_olive_config": "ftl.export.stage",
    "export_onnx": "ftl.export.stage",
})
