"""Typed settings for ``ftl generate`` and ``ftl chat``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ftl.config import StrictModel


class SamplingConfig(StrictModel):
    max_new_tokens: int = Field(256, gt=0, description="Most tokens to generate per answer")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling, when temperature > 0")
    repetition_penalty: float | None = Field(None, gt=0, description="Default: the folder's (genai_config.json "
                                                                     "search, measured at export)")
    no_repeat_ngram_size: int | None = Field(None, ge=0, description="Never repeat an n-gram of this many tokens "
                                                                     "(default: the folder's)")


class GenerateConfig(SamplingConfig):
    model_dir: Path = Field(description="An ftl export-onnx output folder")
    system_prompt: str | None = Field(None, description="Override the system prompt the model was trained with")
    adapter: Path | None = Field(None, description="A separately exported .onnx_adapter file")
    threads: int | None = Field(None, gt=0, description="Intra-op threads (default: the cores available)")

    def sampling(self) -> dict:
        return SamplingConfig.model_validate(self.model_dump(include=set(SamplingConfig.model_fields))).model_dump()
