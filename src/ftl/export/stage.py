"""The export recipe: resolve base + adapter → Olive (MergeAdapterWeights → ModelBuilder int4) → check.

Merge before export: a separate adapter makes the int4 MatMuls non-constant, so onnxruntime cannot
pre-pack them and decode is about 7x slower (29 vs 210 tok/s on SmolLM2-135M here). The separate
layout is still offered (``keep_adapter_separate``) for multi-LoRA serving, with a warning.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ftl import manifest, olive
from ftl.chat import PromptFormat, prompt_format_for
from ftl.errors import ConfigError
from ftl.finetune.stage import adapter_dir_of, check_adapter_base
from ftl.models import model_identity, resolve_model

OLIVE_OUT = "olive-output"
GENAI_FILES = ["genai_config.json", "model.onnx", "tokenizer.json"]
_OLIVE_EXTRAS = ["footprint.json", "output_footprint.json", "run_history.txt"]
SLOW_ADAPTER_WARNING = ("the adapter stays a separate runtime input: int4 MatMuls cannot be pre-packed and decode "
                        "is about 7x slower than a merged export; use it for multi-LoRA serving only")


class ExportConfig(BaseModel):
    adapter: Path | None = Field(None, description="A finetune output folder or a peft adapter folder")
    model: str | None = Field(None, description="Base model; default: the one the adapter was trained on")
    output: Path
    precision: str = "int4"
    block_size: int = Field(32, description="int4 quantization block size (16/32/64/128/256)")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gather"],
                                description="Ops quantized to int4; Gather covers the (tied) embedding")
    # k_quant by default: on SmolLM2-135M (weights already Q4_1 from the GGUF) plain RTN int4 cost +22%
    # perplexity vs fp32, k_quant (int8 lm_head) +7.5%, at 210 vs 108 MB and the same decode speed
    # (bench/decode.py). "default" (RTN, shared int4 embedding) is the small option.
    int4_algo: Literal["default", "rtn", "k_quant", "k_quant_mixed", "k_quant_last"] = "k_quant"
    accuracy_level: int | None = Field(None, description="MatMulNBits accuracy level; None lets ORT choose")
    keep_adapter_separate: bool = False
    force: bool = False


@dataclass
class ExportResult:
    output: Path
    size_mb: float
    seconds: float
    adapter_file: Path | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: bool = False
    config_only: bool = False


@dataclass
class _Plan:
    model_dir: Path
    base: dict
    adapter: Path | None
    fmt: PromptFormat
    fingerprint: str


def plan(config: ExportConfig) -> _Plan:
    adapter = adapter_dir_of(config.adapter) if config.adapter else None
    trained = (manifest.read(adapter) or manifest.read(adapter.parent)) if adapter else None
    model_ref = config.model or _trained_base(trained, config)
    model_dir = resolve_model(model_ref)
    base = model_identity(model_dir)
    if adapter:
        check_adapter_base(adapter, base)
    if trained and trained.get("prompt_format"):
        fmt = PromptFormat(**trained["prompt_format"])
    else:
        fmt = prompt_format_for(model_dir)
    if config.keep_adapter_separate and not adapter:
        raise ConfigError("--keep-adapter-separate needs an adapter", None, "pass --adapter, or drop the flag")
    if config.block_size not in (16, 32, 64, 128, 256):
        raise ConfigError(f"block size {config.block_size} is not supported", None, "use 16, 32, 64, 128 or 256")
    fingerprint = manifest.sha256_json({
        "base": base["sha256"], "adapter": manifest.sha256_dir(adapter) if adapter else None,
        "params": config.model_dump(mode="json", exclude={"force", "output", "adapter", "model"}),
        "format": fmt.model_dump()})
    return _Plan(model_dir, base, adapter, fmt, fingerprint)


def build_olive_config(config: ExportConfig, p: _Plan, out: Path) -> dict:
    workflow = olive.workflow("export_int4.json", work_dir=out, output_dir=out / OLIVE_OUT)
    workflow["input_model"]["model_path"] = str(p.model_dir.resolve())
    passes = workflow["passes"]
    builder = passes["builder"]
    builder.update(precision=config.precision, int4_block_size=config.block_size,
                   int4_op_types_to_quantize=config.op_types, int4_algo_config=config.int4_algo)
    if config.accuracy_level is not None:
        builder["int4_accuracy_level"] = config.accuracy_level
    if p.adapter is None:
        del workflow["input_model"]["adapter_path"]
        del passes["merge"]
    else:
        workflow["input_model"]["adapter_path"] = str(p.adapter.resolve())
        if config.keep_adapter_separate:
            # ModelBuilder's k_quant tries to quantize the rank-r LoRA MatMuls too and fails on their
            # shapes; RTN leaves them alone, and ExtractAdapters then turns them into inputs.
            builder["int4_algo_config"] = "default"
            del passes["merge"]
            passes["extract"] = {"type": "ExtractAdapters", "make_inputs": True, "save_format": "onnx_adapter"}
    return workflow


def export_onnx(config: ExportConfig, *, save_config: Path | None = None, on_line=None) -> ExportResult:
    started = time.perf_counter()
    out = Path(config.output)
    p = plan(config)
    warnings = [SLOW_ADAPTER_WARNING] if config.keep_adapter_separate else []
    if config.keep_adapter_separate and config.int4_algo != "default":
        warnings.append(f"int4 algorithm {config.int4_algo} does not support a separate adapter; using 'default' (RTN)")
    if save_config:
        olive.save_config(build_olive_config(config, p, out), save_config)
        return ExportResult(out, 0.0, 0.0, warnings=warnings, config_only=True)
    if manifest.is_complete(out, p.fingerprint) and not config.force:
        record = manifest.read(out)
        return ExportResult(out, record["metrics"]["size_mb"], record["timings"]["seconds"],
                            _adapter_file(out), warnings, skipped=True)
    manifest.prepare_output(out, force=config.force, stage="export")
    record = manifest.new("export", inputs={
        "base_model": p.base,
        "adapter": {"path": str(p.adapter.resolve()), "sha256": manifest.sha256_dir(p.adapter)} if p.adapter else None,
    }, params=config.model_dump(mode="json", exclude={"force"}), fingerprint=p.fingerprint)
    record["prompt_format"] = p.fmt.model_dump()
    manifest.write(out, record)

    log = olive.run(build_olive_config(config, p, out), out, on_line=on_line)
    produced = out / OLIVE_OUT
    olive.require_files(produced, GENAI_FILES, log)
    if config.keep_adapter_separate and not list(produced.glob("*.onnx_adapter")):
        olive.require_files(produced, ["adapter_weights.onnx_adapter"], log)
    for item in produced.iterdir():
        if item.name not in _OLIVE_EXTRAS:
            shutil.move(str(item), out / item.name)
    shutil.rmtree(produced, ignore_errors=True)
    olive.clean_cache(out)

    seconds = time.perf_counter() - started
    size_mb = _size_mb(out)
    record.update(status="complete", timings={"seconds": round(seconds, 1)}, metrics={"size_mb": size_mb},
                  warnings=warnings)
    record["outputs"] = {"adapter_file": _adapter_file(out).name if _adapter_file(out) else None}
    manifest.write(out, record)
    return ExportResult(out, size_mb, seconds, _adapter_file(out), warnings)


def _trained_base(trained: dict | None, config: ExportConfig) -> str:
    if trained and trained.get("inputs", {}).get("base_model", {}).get("path"):
        return trained["inputs"]["base_model"]["path"]
    if config.adapter:
        raise ConfigError("cannot tell which base model the adapter belongs to", str(config.adapter),
                          "pass --model with the base model it was trained on")
    raise ConfigError("nothing to export", None, "pass --adapter (a finetune output) and/or --model")


def _adapter_file(out: Path) -> Path | None:
    found = sorted(out.glob("*.onnx_adapter"))
    return found[0] if found else None


def _size_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()
                     and f.suffix in (".onnx", ".data", ".onnx_adapter", ".json", ".jinja")) / 1e6, 1)
