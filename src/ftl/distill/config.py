"""Typed settings for ``ftl distill``. API keys are never fields: they come from the environment.

Every field has its default and a description here, so the CLI takes both from one place.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ftl.distill.teachers.base import CLIENT_ERROR_CODES

# Permanent outcomes, the only ones written to <output>.rejects.jsonl (transient failures stay pending).
REJECT_REASONS = ("empty", "refusal", "truncated", *CLIENT_ERROR_CODES)
_CLIENT_ERROR = re.compile(r"client_error_\d{3}")


class DistillConfig(BaseModel):
    # A misspelt setting must fail, not silently fall back to a default and spend the teacher's quota.
    model_config = ConfigDict(extra="forbid")

    seeds: str = Field(min_length=1, description="Seed questions: a .jsonl, .json, .csv, .tsv, .parquet or .txt file, "
                                   "a datasets folder, or a Hub dataset name")
    output: Path = Field(description="Q/A JSONL; rejects go to <output>.rejects.jsonl beside it")
    teacher: str = Field("local", description="A registered teacher: openai, azure, local")
    model: str | None = Field(None, description="Model / deployment name, or a local model folder")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL (…/v1)")
    endpoint: str | None = Field(None, description="Azure OpenAI endpoint (https://<name>.openai.azure.com)")
    api_version: str = Field("2024-10-21", description="Azure OpenAI API version")
    question_field: str | None = Field(None, description="Default: Question, question, instruction or prompt")
    context_field: str | None = Field(None, description="Seed column with context to add to the prompt")
    reference_field: str | None = Field(None, description="Seed column with a reference answer, kept as 'reference'")
    dataset_split: str | None = Field(None, description="datasets split, when seeds is a dataset (default: train)")
    system_prompt: str | None = Field(None, description="System message sent before each question")
    prompt_template: str = Field("{question}", description="Placeholders: {question}, {context}")
    max_tokens: int = Field(512, gt=0, description="Most tokens per answer; a longer one is rejected as truncated")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 asks for the most likely answer")
    n: int = Field(1, ge=1, description="Answers asked per seed; the best one is kept")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once")
    rpm: int | None = Field(None, gt=0, description="Requests-per-minute budget")
    tpm: int | None = Field(None, gt=0, description="Tokens-per-minute budget")
    max_retries: int = Field(5, ge=0, description="Retries of a transient failure (429, 5xx, timeout, dropped "
                                                   "connection, malformed body); past them the seed stays pending")
    timeout: float = Field(60.0, gt=0, description="Seconds before a request counts as hung")
    backoff: float = Field(1.0, gt=0, description="First back-off in seconds; doubles, with jitter")
    limit: int | None = Field(None, gt=0, description="Only the first N seeds")
    dedup_threshold: float = Field(0.9, gt=0, le=1, description="Word-shingle Jaccard above which seeds are near-duplicates")
    val_fraction: float | None = Field(None, gt=0, lt=1, description="Write <output>.train/.val.jsonl too")
    price_input: float | None = Field(None, ge=0, description="Price per 1M prompt tokens, for the cost estimate")
    price_output: float | None = Field(None, ge=0, description="Price per 1M completion tokens")
    retry_rejects: list[str] | None = Field(None, description="Reject reasons to ask again for (e.g. truncated, "
                                                              "refusal), or all; other rejects are not paid for again")

    @field_validator("retry_rejects")
    @classmethod
    def _known_reasons(cls, reasons: list[str] | None) -> list[str] | None:
        """A misspelt reason would retry nothing and say nothing, so it is refused by name."""
        for reason in reasons or []:
            if reason != "all" and reason not in REJECT_REASONS and not _CLIENT_ERROR.fullmatch(reason):
                # A ValueError, so pydantic reports it with every other problem, under the key or flag.
                raise ValueError(f"unknown reject reason {reason!r}; choose from: all, "
                                 f"{', '.join(REJECT_REASONS)}, client_error_<status>")
        return reasons or None
