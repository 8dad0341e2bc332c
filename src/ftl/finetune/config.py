"""Typed settings for ``ftl finetune``; validated before any weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator


class FinetuneConfig(BaseModel):
    model: str = Field(description="Base model: a folder, or a name under models/ (e.g. smollm2-135m)")
    data: Path | list[Path] = Field(description="Training data: JSONL with Question/Answer fields or chat "
                                                "messages; several files are concatenated in order")
    output: Path = Field(description="Folder for the adapter, manifest and logs")
    question_field: str = "Question"
    answer_field: str = "Answer"
    messages_field: str = "messages"
    system_prompt: str | None = None
    text_template: str | None = Field(None, description="str.format template instead of the chat template")
    method: Literal["lora", "qlora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set")
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    max_seq_len: int = Field(1024, gt=8, description="A row longer than this is an error, never truncated")
    logging_steps: int | None = Field(None, gt=0, description="Default: about 100 loss points per run")
    save_steps: int = Field(10, gt=0, description="Checkpoint interval, for resume after an interruption")
    seed: int = 42
    force: bool = False

    @property
    def data_files(self) -> list[Path]:
        return list(self.data) if isinstance(self.data, list) else [self.data]

    @model_validator(mode="after")
    def _fields_differ(self):
        if self.question_field == self.answer_field:
            raise ValueError("question_field and answer_field must differ")
        return self
