"""``ftl eval``: ONNX vs PyTorch (vs base) on perplexity, quantization damage, ROUGE and latency."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftl.lazy import lazy_exports

if TYPE_CHECKING:
    from ftl.eval.stage import EvalConfig, EvalResult, evaluate

__all__ = ["EvalConfig", "EvalResult", "evaluate"]
__getattr__ = lazy_exports(__name__, {
    "EvalConfig": "ftl.eval.stage",
    "EvalResult": "ftl.eval.stage",
    "evaluate": "ftl.eval.stage",
})
