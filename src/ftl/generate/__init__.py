"""``ftl generate`` / ``ftl chat``: streamed answers from an exported folder via onnxruntime-genai."""

from ftl.generate.engine import Generation, OnnxChatModel, kv_window, load_og_model

__all__ = ["Generation", "OnnxChatModel", "kv_window", "load_og_model"]
