"""Typed settings for ``ftl eval``; validated, with the test set and the model specs, before
anything is written."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ftl.config import StrictModel


class EvalConfig(StrictModel):
    models: list[str] = Field(min_length=1, description="onnx:PATH (export folder) or torch:PATH (HF folder, "
                                                        "finetune folder or adapter), compared side by side")
    data: str = Field(description="Q/A JSONL with reference answers, or a datasets folder/name")
    output: Path = Field(description="Folder for every output file")
    question_field: str = Field("Question", description="Field with the question")
    answer_field: str = Field("Answer", description="Field with the reference answer")
    limit: int | None = Field(None, gt=0, description="First N samples only")
    max_new_tokens: int = Field(128, gt=0, description="Tokens generated per answer")
    numeric: bool | None = Field(None, description="GSM8K-style '#### n' check; default: on when references have it")
    warmup: int = Field(1, ge=0, description="Untimed generations per model before timing")
    latency_samples: int = Field(4, ge=1, description="The first N samples are answered one at a time and timed "
                                                      "(TTFT, latency, decode tok/s); the rest in batches, untimed")
    batch_size: int = Field(8, ge=1, description="Samples scored (perplexity) and answered together per batch")
    memory: bool = Field(True, description="Measure peak RSS of each model in a child process")
    compare: Path | None = Field(None, description="An earlier metrics_summary.json to compare with")
    force: bool = Field(False, description="Replace a finished report (the old one stays until the new one is "
                                           "complete)")
