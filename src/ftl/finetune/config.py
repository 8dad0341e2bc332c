"""Typed settings for ``ftl finetune``; validated before any weights load.

The settings travel as the config itself, never as command-line flags rebuilt from it: an Azure
ML job ships them as ``finetune.json`` and runs ``ftl finetune --config finetune.json``, with the
paths (the job's inputs and output) as flags and a sweep's values as ``KEY=VALUE`` arguments,
each written so that it reads back as the same JSON value (:func:`override`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from ftl.config import StrictModel
from ftl.errors import ConfigError

CONFIG_FILE = "finetune.json"
# Where a fine-tune reads and writes, not how it trains: a job gives these as its inputs and output.
PATHS = ("model", "data", "val_data", "output", "force")


class FinetuneConfig(StrictModel):
    model: str = Field(description="Base model: a folder, or a name under models/ (e.g. smollm2-135m)")
    data: list[Path] = Field(min_length=1, description="Training data: JSONL with Question/Answer fields or chat "
                                                "messages; several files are concatenated in order")
    output: Path = Field(description="Folder for the adapter, manifest and logs")
    question_field: str = Field("Question", description="Field with the question in Q/A rows")
    answer_field: str = Field("Answer", description="Field with the answer in Q/A rows")
    messages_field: str = Field("messages", description="Field with chat messages in conversation rows")
    system_prompt: str | None = Field(None, description="System message for every conversation that has none; "
                                                        "inference adds the same one")
    text_template: str | None = Field(None, description="A str.format template with {Question} and {Answer} "
                                                        "(ending with {Answer}) instead of the chat template")
    method: Literal["lora", "qlora", "qscale"] = Field(
        "lora", description="lora: an fp32 LoRA adapter; qscale: train the int4 grid's scales and minimums with the "
                            "codes fixed (an int4 model by construction, exported exactly); qlora: 4-bit base with "
                            "bitsandbytes, needs CUDA")
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(None, description="Module names to adapt (default: peft's for the "
                                                               "model type)")
    epochs: float = Field(1.0, gt=0, description="Passes over the data")
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set")
    batch_size: int = Field(4, gt=0, description="Rows per step")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate, cosine schedule (default: "
                                                                "2e-4 for LoRA, 5e-5 for qscale: scales want a small step)")
    max_seq_len: int = Field(1024, gt=8, description="A row longer than this is an error, never truncated")
    logging_steps: int | None = Field(None, gt=0, description="Default: about 100 loss points per run")
    save_steps: int = Field(10, gt=0, description="Checkpoint interval, for resume after an interruption")
    train_on_prompt: bool = Field(False, description="Train on the whole row, prompt included (default: the loss "
                                                     "covers the answers only)")
    val_split: float | None = Field(None, gt=0, lt=1, description="Hold out this share of the rows (chosen by "
                                                                  "--seed) as validation rows for eval_loss")
    val_data: list[Path] | None = Field(None, description="Validation rows from these files instead of a split")
    eval_steps: int | None = Field(None, gt=0, description="eval_loss every N steps (default: --save-steps); "
                                                           "a checkpoint is saved at each, so the best can be kept")
    early_stopping_patience: int | None = Field(None, gt=0, description="Stop after N evaluations without a better "
                                                                        "eval_loss; the best checkpoint is the "
                                                                        "adapter written")
    packing: bool = Field(True, description="Pack each step's rows into one sequence (no padding, no attention "
                                            "across rows) and score only the answer positions: the same loss, "
                                            "about 1.5x the tokens/s on a CPU (bench/finetune.py)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast the forward and backward passes (fp32 master weights); on a CPU only "
                            "with AVX512-BF16 or AMX, else fp32 with a warning. fp32 measured faster on a 2-core "
                            "AVX512-BF16 CPU (bench/finetune.py)")
    seed: int = Field(42, description="Random seed for LoRA init and data order")
    force: bool = Field(False, description="Replace a finished result in the output folder")

    @property
    def lr(self) -> float:
        return self.learning_rate or (5e-5 if self.method == "qscale" else 2e-4)

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        # One file or several: the same settings, so the same fingerprint either way.
        return [value] if isinstance(value, (str, Path)) else value

    @property
    def data_files(self) -> list[Path]:
        return list(self.data)

    @field_validator("val_data", mode="before")
    @classmethod
    def _val_one_or_many(cls, value):
        return [value] if isinstance(value, (str, Path)) else (value or None)

    @property
    def validates(self) -> bool:
        return bool(self.val_split or self.val_data)

    @model_validator(mode="after")
    def _fields_differ(self):
        if self.question_field == self.answer_field:
            raise ValueError("question_field and answer_field must differ")
        if self.val_split and self.val_data:
            raise ValueError("val_split and val_data both set: choose a split of the data or a validation file")
        if self.early_stopping_patience and not self.validates:
            raise ValueError("early_stopping_patience needs validation rows: set val_split or val_data")
        return self


def settings(config: FinetuneConfig) -> dict:
    """The settings as JSON values, without the paths: what a job ships as ``finetune.json``."""
    return config.model_dump(mode="json", exclude=set(PATHS))


def read_settings(path: Path) -> dict:
    """A ``--config`` file (JSON, or YAML) as a mapping; its keys are checked when the config is built."""
    try:
        found = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror}", str(path), "check the path") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config file does not parse: {getattr(exc, 'problem', exc)}", str(path),
                          "write it as JSON or YAML (ftl writes finetune.json for a job)") from None
    if not isinstance(found or {}, dict):
        raise ConfigError("a config file must be a mapping of settings", str(path), 'e.g. {"r": 8, "packing": false}')
    return found or {}


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """``KEY=VALUE`` arguments as settings; each value is JSON, else YAML: ``packing=false``,
    ``target_modules=[q_proj,v_proj]``, ``learning_rate=1e-05`` (JSON first: YAML 1.1 reads that as a string)."""
    found = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r} is not KEY=VALUE", "ftl finetune", "e.g. ftl finetune --config "
                              "finetune.json r=8 packing=false")
        try:
            found[key.strip()] = json.loads(text)
            continue
        except ValueError:
            pass
        try:
            found[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: the value does not parse: {getattr(exc, 'problem', exc)}", item,
                              "values are YAML or JSON, e.g. target_modules='[\"q_proj\", \"v_proj\"]'") from None
    return found


def override(value) -> str:
    """The VALUE text that :func:`parse_overrides` reads back as exactly ``value``: its JSON, with no
    single quote in it (``'`` as ``\\u0027``), so that it passes a shell inside single quotes. An Azure
    ML sweep puts it into the trial's command as it is; given a bool or a list it would write Python's
    ``True`` or ``['q_proj']`` instead."""
    return json.dumps(value, ensure_ascii=False).replace("'", "\\u0027")


def sweep_choice(value):
    """A swept value as an Azure ML search-space choice: a number as itself, anything else as its
    :func:`override` text (see there)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else override(value)
