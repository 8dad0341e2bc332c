"""The export recipe: resolve base + adapter → Olive (MergeAdapterWeights → ftl's genai builder
pass, int4) → check the files and the graph → manifest.

Merge before export: a separate adapter makes the int4 MatMuls non-constant, so onnxruntime cannot
pre-pack them and decode is several times slower (bench/decode.py measures it). The separate
layout is still offered (``keep_adapter_separate``) for multi-LoRA serving, with a warning.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftl import manifest, olive
from ftl.chat import PromptFormat, prompt_format_for
from ftl.errors import ConfigError, ExportError
from ftl.export.builder import BuildOptions, check_options, verify
from ftl.export.config import ExportConfig
from ftl.export.exact import GRID_RECORD
from ftl.lineage import (adapter_dir_of, base_of_qscale, check_adapter_base, qscale_of, require_base,
                         training_record)
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
    qscale: Path | None = None


def plan(config: ExportConfig) -> _Plan:
    if config.keep_adapter_separate and not config.adapter:
        raise ConfigError("--keep-adapter-separate needs an adapter", None, "pass --adapter, or drop the flag")
    qscale = qscale_of(config.adapter) if config.adapter else None
    _check_grid(config, qscale)
    adapter = adapter_dir_of(config.adapter) if config.adapter and not qscale else None
    trained = training_record(adapter or qscale.parent) if (adapter or qscale) else None
    if qscale:
        model_ref = config.model or base_of_qscale(qscale)
        if not model_ref:
            raise ConfigError("cannot tell which base model the qscale fine-tune belongs to", str(qscale),
                              "pass --model with the base model it was trained on")
    elif adapter:
        model_ref = require_base(adapter, config.model)
    elif config.model:
        model_ref = config.model
    else:
        raise ConfigError("nothing to export", None, "pass --adapter (a finetune output) and/or --model")
    model_dir = resolve_model(model_ref)
    check_options(build_options(config))
    base = model_identity(model_dir)
    if adapter or qscale:
        check_adapter_base(adapter or qscale.parent, base)
    if trained and trained.get("prompt_format"):
        fmt = PromptFormat(**trained["prompt_format"])
    else:
        fmt = prompt_format_for(model_dir)
    fingerprint = manifest.sha256_json({
        "base": base["sha256"], "adapter": manifest.sha256_dir(adapter) if adapter else None,
        "qscale": manifest.sha256_file(qscale) if qscale else None, "exact_grid": config.exact_grid,
        "params": config.model_dump(mode="json", exclude={"force", "output", "adapter", "model"}),
        "format": fmt.model_dump()})
    return _Plan(model_dir, base, adapter, fmt, fingerprint, qscale)


def _check_grid(config: ExportConfig, qscale: Path | None) -> None:
    """The settings can hold the grid asked for (and a qscale fine-tune's grid), or a one-line error."""
    if config.grid == "exact" and config.block_size != 32:
        raise ConfigError(f"the exact int4 grid is in blocks of 32, not --block-size {config.block_size}",
                          "--grid exact", "use --block-size 32, or --grid builder")
    if config.grid == "exact" and config.keep_adapter_separate:
        raise ConfigError("an exact grid needs the adapter merged", "--grid exact --keep-adapter-separate",
                          "drop --keep-adapter-separate, or use --grid builder")
    if qscale and not config.exact_grid:
        why = f"--block-size {config.block_size}" if config.block_size != 32 else \
            "--keep-adapter-separate" if config.keep_adapter_separate else "--grid builder"
        raise ConfigError(f"a qscale fine-tune is an int4 grid in blocks of 32; {why} would re-quantise it and lose "
                          "what it learned", str(qscale), "export it with --grid exact --block-size 32 (the default)")


def build_olive_config(config: ExportConfig, p: _Plan, out: Path) -> dict:
    return olive_workflow(config, out, model_dir=p.model_dir, adapter=p.adapter, qscale=p.qscale)


def olive_workflow(config: ExportConfig, out: Path, *, model_dir: Path, adapter: Path | None,
                   qscale: Path | None = None) -> dict:
    """The Olive export workflow; a dry run builds it before the adapter exists."""
    workflow = olive.workflow("export_int4.json", work_dir=out, output_dir=out / OLIVE_OUT)
    workflow["input_model"]["model_path"] = str(Path(model_dir).resolve())
    passes = workflow["passes"]
    builder = passes["builder"]
    builder.update(build_options(config).pass_config())
    if config.exact_grid:
        builder.update(grid="exact", grid_form=config.grid_form,
                       grid_base=str(Path(model_dir).resolve()) if adapter else None,
                       qscale_path=str(Path(qscale).resolve()) if qscale else None)
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
    trained = {"path": str(p.adapter.resolve()), "sha256": manifest.sha256_dir(p.adapter)} if p.adapter else \
        {"path": str(p.qscale.resolve()), "sha256": manifest.sha256_file(p.qscale)} if p.qscale else None
    record = manifest.new("export", inputs={"base_model": p.base, "adapter": trained}, params=config.model_dump(mode="json", exclude={"force"}), fingerprint=p.fingerprint)
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
    layout = verify(out, build_options(config), tied_expected=_ties_embeddings(p.model_dir),
                    exact_grid=config.exact_grid)
    grid = json.loads((out / GRID_RECORD).read_text()) if (out / GRID_RECORD).is_file() else None
    if config.exact_grid and grid is None:
        raise ExportError("the exact int4 grid was not written", str(out / "olive.log"), "read the log")
    if grid and grid.get("lora_delta_rounded_away") is not None:
        warnings.append(f"int4 rounds away {grid['lora_delta_rounded_away']:.0%} of the LoRA's weight changes (each "
                        f"below half a quantisation step; {grid['lora_codes_changed']:.2%} of the codes moved): "
                        "fine-tune with --method qscale for an int4 model that keeps what it learned")

    seconds = time.perf_counter() - started
    size_mb = folder_size_mb(out)
    record.update(status="complete", timings={"seconds": round(seconds, 1)}, metrics={"size_mb": size_mb},
                  warnings=warnings)
    record["outputs"] = {"adapter_file": _adapter_file(out).name if _adapter_file(out) else None,
                         "layout": layout.as_dict(), "built_with_onnxruntime_genai": _og_version(),
                         "int4_grid": grid}
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
