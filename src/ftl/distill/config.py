"""Typed settings for ``ftl distill``. API keys are never fields: they come from the environment.

Every field has its default and a description here, so the CLI takes both from one place.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ftl.distill.teachers.base import CLIENT_ERROR_CODES

# Permanent outcomes, the only ones written to <output>.rejects.jsonl (transient failures stay pending).
REJECT_REASONS = ("empty", "refusal", "truncated", *CLIENT_ERROR_CODES)
_CLIENT_ERROR = re.compile(r"client_error_\d{3}")


class Deployment(BaseModel):
    """One teacher deployment of a fan-out: its own endpoint, key variable and quota."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Shown in the summary and the manifest; default model@host")
    teacher: str | None = Field(None, description="openai or azure; default: --teacher")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL (…/v1)")
    endpoint: str | None = Field(None, description="Azure OpenAI endpoint")
    model: str = Field(min_length=1, description="Model or deployment name")
    api_key_env: str | None = Field(None, description="Environment variable holding this deployment's key")
    api_version: str | None = Field(None, description="Azure OpenAI API version; default: --api-version")
    rpm: int | None = Field(None, gt=0, description="This deployment's requests-per-minute quota")
    tpm: int | None = Field(None, gt=0, description="This deployment's tokens-per-minute quota")
    concurrency: int | None = Field(None, ge=1, description="Requests in flight here; default: --concurrency")
    price_input: float | None = Field(None, ge=0, description="Price per 1M prompt tokens here")
    price_output: float | None = Field(None, ge=0, description="Price per 1M completion tokens here")


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
    rpm: int | None = Field(None, gt=0, description="Requests-per-minute quota, spread evenly over --quota-window; "
                                                    "default: read from the endpoint's rate-limit headers")
    tpm: int | None = Field(None, gt=0, description="Tokens-per-minute quota (prompt + max_tokens), spread the same "
                                                    "way; default: read from the headers")
    quota_window: float = Field(10.0, gt=0, description="Seconds over which the endpoint enforces its quota "
                                                        "(Azure OpenAI: 10, i.e. RPM/6 per 10 s)")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (default "
                                                      "OPENAI_API_KEY, or AZURE_OPENAI_API_KEY for azure)")
    deployments: list[Deployment] | None = Field(None, description="Several teacher deployments to fan out over: "
                                                 "a YAML file, or a list of {base_url|endpoint, model, ...}")
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

    @field_validator("deployments", mode="before")
    @classmethod
    def _deployments_file(cls, value):
        """A path is a YAML file: a list of deployments, or {deployments: [...]}."""
        if not isinstance(value, (str, Path)):
            return value
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"no deployments file at {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ValueError(f"{path}{f':{mark.line + 1}' if mark else ''} is not valid YAML") from None
        if isinstance(data, dict) and "deployments" in data:
            data = data["deployments"]
        if not isinstance(data, list) or not data:
            raise ValueError(f"{path} must hold a list of deployments (each with base_url or endpoint, and model)")
        return data

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
