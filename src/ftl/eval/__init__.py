"""``ftl eval``: ONNX vs PyTorch (vs base) on perplexity, quantization damage, ROUGE and latency."""

from ftl.eval.stage import EvalConfig, EvalResult, evaluate

__all__ = ["EvalConfig", "EvalResult", "evaluate"]
