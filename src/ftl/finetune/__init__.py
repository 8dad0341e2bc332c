"""``ftl finetune``: LoRA / QLoRA through Olive's LoRA pass, every row used, loss recorded."""

from ftl.finetune.config import FinetuneConfig
from ftl.finetune.stage import FinetuneResult, build_olive_config, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "build_olive_config", "finetune"]
