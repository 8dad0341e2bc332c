"""``ftl generate`` / ``ftl chat``: streamed answers from an exported folder via onnxruntime-genai."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftl.lazy import lazy_exports

if TYPE_CHECKING:
    from ftl.generate.engine import Generation, OnnxChatModel, kv_window, load_og_model

__all__ = ["Generation", "kv_window", "load_og_model", "OnnxChatModel"]
__getattr__ = lazy_exports(__name__, {
    "Generation": "ftl.generate.engine",
    "OnnxChatModel": "ftl.generate.engine",
    "kv_window": "ftl.generate.engine",
    "load_og_model": "ftl.generate.engine",
})
