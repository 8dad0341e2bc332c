"""``ftl models``: materialise base models as local HF safetensors folders under ``models/``."""

from ftl.models.store import (
    BUILTIN,
    ImportResult,
    default_models_dir,
    import_model,
    list_models,
    model_identity,
    resolve_model,
)

__all__ = ["BUILTIN", "ImportResult", "default_models_dir", "import_model", "list_models", "model_identity",
           "resolve_model"]
