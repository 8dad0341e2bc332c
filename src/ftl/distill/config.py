"""Typed settings for ``ftl distill``. API keys are never fields: they come from the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class DistillConfig(BaseModel):
    seeds: str = Field(description="JSONL, CSV or text file of seeds, or a datasets folder / Hub name")
    output: Path = Field(description="Q/A JSONL; rejects go to <output>.rejects.jsonl beside it")
    teacher: str = Field("local", description="A registered teacher: openai, azure, local")
    model: str | None = Field(None, description="Model / deployment name, or a local model folder")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL (…/v1)")
    endpoint: str | None = Field(None, description="Azure OpenAI endpoint (https://<name>.openai.azure.com)")
    api_version: str = "2024-10-21"
    question_field: str | None = Field(None, description="Default: Question, question, instruction or prompt")
    context_field: str | None = None
    reference_field: str | None = None
    dataset_split: str | None = Field(None, description="datasets split, when seeds is a dataset")
    system_prompt: str | None = None
    prompt_template: str = Field("{question}", description="Placeholders: {question}, {context}")
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0)
    n: int = Field(1, ge=1, description="Answers asked per seed; the best one is kept")
    concurrency: int = Field(8, ge=1)
    rpm: int | None = Field(None, gt=0, description="Requests-per-minute budget")
    tpm: int | None = Field(None, gt=0, description="Tokens-per-minute budget")
    max_retries: int = Field(5, ge=0)
    timeout: float = Field(60.0, gt=0, description="Seconds before a request counts as hung")
    backoff: float = Field(1.0, gt=0, description="First back-off in seconds; doubles, with jitter")
    limit: int | None = Field(None, gt=0)
    dedup_threshold: float = Field(0.9, gt=0, le=1, description="Word-shingle Jaccard above which seeds are near-duplicates")
    val_fraction: float | None = Field(None, gt=0, lt=1, description="Write <output>.train/.val.jsonl too")
    price_input: float | None = Field(None, ge=0, description="Price per 1M prompt tokens, for the cost estimate")
    price_output: float | None = Field(None, ge=0, description="Price per 1M completion tokens")
    retry_rejects: bool = False
