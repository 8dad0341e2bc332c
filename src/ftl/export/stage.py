"""The export recipe: resolve base + adapter → Olive (MergeAdapterWeights → ftl's genai builder
pass, int4) → check the files and the graph → manifest.

Merge before export: a separate adapter makes the int4 MatMuls non-constant, so onnxruntime cannot
pre-pack them and decode is several times slower (bench/decode.py measures it). The separate
layout is still offered (``keep_adapter_separate``) for multi-LoRA serving, with a warning.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftl import manifest, olive
from ftl.chat import PromptFormat, prompt_format_for
from ftl.errors import ConfigError
from ftl.export.builder import BuildOptions, check_options, verify
from ftl.export.config import ExportConfig
from ftl.lineage import adapter_dir_of, check_adapter_base, require_base, training_record
from ftl.models import model_identity, resolve_model
from ftl.system import folder_size_mb

OLIVE_OUT = "olive-output"
GENAI_FILES = ["genai_config.json", "model.onnx", "tokenizer.json"]
_OLIVE_EXTRAS = ["footprint.json", "output_footprint.json", "run_history.txt"]
SLOW_ADAPTER_WARNING = ("the adapter stays a separate runtime input: int4 MatMuls cannot be pre-packed and decode "
                        "is several times slower than a merged export; use it for multi-LoRA serving only")


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
    if config.keep_adapter_separate and not config.adapter:
        raise ConfigError("--keep-adapter-separate needs an adapter", None, "pass --adapter, or drop the flag")
    adapter = adapter_dir_of(config.adapter) if config.adapter else None
    trained = training_record(adapter) if adapter else None
    if adapter:
        model_ref = require_base(adapter, config.model)
    elif config.model:
        model_ref = config.model
    else:
        raise ConfigError("nothing to export", None, "pass --adapter (a finetune output) and/or --model")
    model_dir = resolve_model(model_ref)
    check_options(build_options(config))
    base = model_identity(model_dir)
    if adapter:
        check_adapter_base(adapter, base)
    if trained and trained.get("prompt_format"):
        fmt = PromptFormat(**trained["prompt_format"])
    else:
        fmt = prompt_format_for(model_dir)
    fingerprint = manifest.sha256_json({
        "base": base["sha256"], "adapter": manifest.sha256_dir(adapter) if adapter else None,
        "params": config.model_dump(mode="json", exclude={"force", "output", "adapter", "model"}),
        "format": fmt.model_dump()})
    return _Plan(model_dir, base, adapter, fmt, fingerprint)


def build_olive_config(config: ExportConfig, p: _Plan, out: Path) -> dict:
    return olive_workflow(config, out, model_dir=p.model_dir, adapter=p.adapter)


def olive_workflow(config: ExportConfig, out: Path, *, model_dir: Path, adapter: Path | None) -> dict:
    """The Olive export workflow; a dry run builds it before the adapter exists."""
    workflow = olive.workflow("export_int4.json", work_dir=out, output_dir=out / OLIVE_OUT)
    workflow["input_model"]["model_path"] = str(Path(model_dir).resolve())
    passes = workflow["passes"]
    builder = passes["builder"]
    builder.update(build_options(config).pass_config())
    if adapter is None:
        del workflow["input_model"]["adapter_path"]
        del passes["merge"]
    else:
        workflow["input_model"]["adapter_path"] = str(Path(adapter).resolve())
        if config.keep_adapter_separate:
            # k_quant tries to quantize the rank-r LoRA MatMuls too and fails on their shapes;
            # "default" leaves them alone (build_options picks it), and ExtractAdapters turns them into inputs.
            del passes["merge"]
            passes["extract"] = {"type": "ExtractAdapters", "make_inputs": True, "save_format": "onnx_adapter"}
    return workflow


def build_options(config: ExportConfig) -> BuildOptions:
    """The builder options these settings ask for (what the built graph is checked against)."""
    algo = "default" if config.keep_adapter_separate else config.int4_algo
    return BuildOptions(precision="int4", algo_config=algo, block_size=config.block_size,
                        is_symmetric=config.symmetric or config.keep_adapter_separate,
                        accuracy_level=config.accuracy_level,
                        op_types_to_quantize=tuple(config.op_types))


def export_onnx(config: ExportConfig, *, save_config: Path | None = None, on_line=None) -> ExportResult:
    started = time.perf_counter()
    out = Path(config.output)
    p = plan(config)
    warnings = [SLOW_ADAPTER_WARNING] if config.keep_adapter_separate else []
    if config.keep_adapter_separate and config.int4_algo != "default":
        warnings.append(f"int4 algorithm {config.int4_algo} does not support a separate adapter; using 'default' (onnxruntime's default quantiser)")
    if save_config:
        olive.save_config(build_olive_config(config, p, out), save_config)
        # The builder is ftl's own Olive pass: Olive finds it through this package config.
        olive.package_config(out, Path(save_config).with_suffix(".package_config.json"))
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
    layout = verify(out, build_options(config), tied_expected=_ties_embeddings(p.model_dir))

    seconds = time.perf_counter() - started
    size_mb = folder_size_mb(out)
    record.update(status="complete", timings={"seconds": round(seconds, 1)}, metrics={"size_mb": size_mb},
                  warnings=warnings)
    record["outputs"] = {"adapter_file": _adapter_file(out).name if _adapter_file(out) else None,
                         "layout": layout.as_dict(), "built_with_onnxruntime_genai": _og_version()}
    manifest.write(out, record)
    return ExportResult(out, size_mb, seconds, _adapter_file(out), warnings)


def _ties_embeddings(model_dir: Path) -> bool:
    """Whether the builder will tie the embedding to the head: it reads AutoConfig, so do the same
    (a missing key means the config class's default, which is True for some families)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return bool(getattr(getattr(config, "text_config", None) or config, "tie_word_embeddings", False))


def _og_version() -> str:
    from importlib import metadata

    return metadata.version("onnxruntime-genai")


def _adapter_file(out: Path) -> Path | None:
    found = sorted(out.glob("*.onnx_adapter"))
    return found[0] if found else None
