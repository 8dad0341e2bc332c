"""``ftl generate`` / ``ftl chat``: streamed answers from an exported folder via onnxruntime-genai."""

from ftl.generate.engine import Generation, OnnxChatModel

__all__ = ["Generation", "OnnxChatModel"]
