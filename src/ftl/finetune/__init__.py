"""``ftl finetune``: LoRA / QLoRA through Olive's LoRA pass, every row used, loss recorded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftl.finetune.config import FinetuneConfig
from ftl.lazy import lazy_exports

if TYPE_CHECKING:
    from ftl.finetune.stage import FinetuneResult, build_olive_config, finetune

__all__ = ["build_olive_config", "finetune", "FinetuneConfig", "FinetuneResult"]
__getattr__ = lazy_exports(__name__, {
    "FinetuneResult": "ftl.finetune.stage",
    "build_olive_config": "ftl.finetune.stage",
    "finetune": "ftl.finetune.stage",
})
