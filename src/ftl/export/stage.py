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
from ftl.errors import ConfigError, DataError, ExportError
from ftl.export.builder import BuildOptions, check_architecture, check_options, verify
from ftl.export.config import ExportConfig
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
    precision: str = "int4"
    skipped: bool = False
    config_only: bool = False
    search_defaults: dict | None = None
    trials: dict | None = None
    trade: dict | None = None  # the exact grid's decode cost and perplexity gain (ftl.export.trade)


@dataclass
class _Plan:
    model_dir: Path
    base: dict
    adapter: Path | None
    fmt: PromptFormat
    fingerprint: str
    qscale: Path | None = None
    validation: list[dict] | None = None
    grid: str = "builder"  # resolved: "exact" or "builder"


def plan(config: ExportConfig) -> _Plan:
    if config.keep_adapter_separate and not config.adapter:
        raise ConfigError("--keep-adapter-separate needs an adapter", None, "pass --adapter, or drop the flag")
    qscale = qscale_of(config.adapter) if config.adapter else None
    if qscale and config.precision != "int4":
        raise ConfigError("a qscale fine-tune is an int4 model by construction: it has no fp32 export",
                          str(config.adapter), "drop --precision fp32, or export a LoRA fine-tune")
    if config.max_ppl_increase is not None and config.precision != "int4":
        raise ConfigError("--max-ppl-increase chooses among int4 settings", "--precision fp32",
                          "drop --max-ppl-increase for an fp32 export")
    if config.grid == "exact" and config.precision != "int4":
        raise ConfigError("--grid exact is an int4 grid", "--grid exact --precision fp32", "drop one of them")
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
    check_architecture(model_dir)
    check_options(build_options(config))
    unfit = block_misfits(model_dir, config.block_size) if config.precision == "int4" else None
    if unfit:
        raise ConfigError(f"--block-size {config.block_size} does not divide the model's {unfit}", str(model_dir),
                          "use a block size that divides it (32 fits every model ftl has met)")
    base = model_identity(model_dir)
    if adapter or qscale:
        check_adapter_base(adapter or qscale.parent, base)
    if trained and trained.get("prompt_format"):
        fmt = PromptFormat(**trained["prompt_format"])
    else:
        fmt = prompt_format_for(model_dir)
    validation = validation_rows(config.validation_data, config.validation_limit) if config.validation_data else None
    grid = resolve_grid(config, model_dir, qscale)
    if config.max_decode_cost is not None and not config.measure_trade:
        raise ConfigError("--max-decode-cost acts on the decode cost measured at export", "--no-measure-trade",
                          "drop --no-measure-trade, or --max-decode-cost")
    fingerprint = manifest.sha256_json({
        "validation": manifest.sha256_file(config.validation_data) if config.validation_data else None,
        "base": base["sha256"], "adapter": manifest.sha256_dir(adapter) if adapter else None,
        "qscale": manifest.sha256_file(qscale) if qscale else None, "grid": grid,
        # precision joined the settings later: int4 (the default) is left out, so older exports keep their fingerprint
        # measure_trade changes no file; max_decode_cost joined later (unset, it keeps older fingerprints)
        "params": config.model_dump(mode="json", exclude={"force", "output", "adapter", "model", "measure_trade"}
                                    | ({"precision"} if config.precision == "int4" else set())
                                    | ({"max_decode_cost"} if config.max_decode_cost is None else set())),
        "format": fmt.model_dump()})
    return _Plan(model_dir, base, adapter, fmt, fingerprint, qscale, validation, grid)


def resolve_grid(config: ExportConfig, model_dir: Path, qscale: Path | None) -> str:
    """The grid asked for; by default "exact" where there is a grid to keep (a qscale fine-tune, or a
    base whose weights lie on a Q4_1 grid, as a GGUF import's do), else og's builder."""
    if config.grid is not None:
        return config.grid
    if not config.exact_grid:
        return "builder"
    if qscale:
        return "exact"
    from ftl.export.exact import has_grid

    return "exact" if has_grid(model_dir) else "builder"


def validation_rows(path: Path, limit: int) -> list[dict]:
    """Held-out {"question", "reference"} rows from Q/A or chat JSONL (checked like training data)."""
    from ftl.data import load_examples

    rows = [{"question": e.messages[-2]["content"], "reference": e.messages[-1]["content"]}
            for e in load_examples(Path(path))[:limit]]
    if not rows:
        raise DataError("no held-out rows", str(path), "give a Q/A JSONL file with at least one row")
    return rows


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
    return BuildOptions(precision=config.precision, algo_config=algo, block_size=config.block_size,
                        is_symmetric=config.symmetric or config.keep_adapter_separate,
                        accuracy_level=config.accuracy_level,
                        op_types_to_quantize=tuple(config.op_types))


# Peak RSS of an export, measured (docs/models.md). og's builder reads the model (memory-mapped, as
# stored), and ftl has it quantise one weight at a time (ftl.export.builder): what it holds at once is
# the model as stored, what it has written so far (int4 codes and scales, the int8 head: under 1 byte
# a parameter), and the weight being quantised in fp32, twice (og's cast and the contiguous copy the
# quantiser reads). The overhead is the libraries, Olive, the merge's and the tokenizer's.
EXPORT_WRITTEN_BYTES_PER_PARAMETER = 1
EXPORT_OVERHEAD_GIB = 1.5


def export_memory_gib(parameters: int, stored_bytes: int, largest: int) -> float:
    return (stored_bytes + parameters * EXPORT_WRITTEN_BYTES_PER_PARAMETER + 2 * 4 * largest) / 2**30 + \
        EXPORT_OVERHEAD_GIB


def _check_memory(model_dir: Path) -> None:
    """Refuse, before anything loads, a model whose export would not fit this machine (or its cgroup)."""
    from ftl.system import memory_gib
    from ftl.tensorfile import weight_files, weight_summary

    files = weight_files(model_dir)
    if files is None:
        return
    parameters, stored, largest = weight_summary(files)
    need, (have, where) = export_memory_gib(parameters, stored, largest), memory_gib()
    if need > have:
        raise ConfigError(f"{parameters / 1e9:.1f}B parameters need about {need:.0f} GiB to export (estimated from "
                          f"measured runs, docs/models.md), and this machine's {where} has {have:.0f} GiB",
                          str(model_dir), "export on a machine with more memory (the int4 folder it writes runs "
                          "here), or write the Olive workflow with --save-config and run it there")


def export_onnx(config: ExportConfig, *, save_config: Path | None = None, on_line=None) -> ExportResult:
    started = time.perf_counter()
    out = Path(config.output)
    p = plan(config)
    asked_exact = config.grid == "exact"
    config = config.model_copy(update={"grid": p.grid})
    warnings = [SLOW_ADAPTER_WARNING] if config.keep_adapter_separate else []
    if config.keep_adapter_separate and config.int4_algo != "default" and config.precision == "int4":
        warnings.append(f"int4 algorithm {config.int4_algo} does not support a separate adapter; using 'default' (onnxruntime's default quantiser)")
    if save_config:
        olive.save_config(build_olive_config(config, p, out), save_config)
        # The builder is ftl's own Olive pass: Olive finds it through this package config.
        olive.package_config(out, Path(save_config).with_suffix(".package_config.json"))
        return ExportResult(out, 0.0, 0.0, warnings=warnings, config_only=True)
    if manifest.is_complete(out, p.fingerprint) and not config.force:
        record = manifest.read(out)
        return ExportResult(out, record["metrics"]["size_mb"], record["timings"]["seconds"],
                            _adapter_file(out), warnings, skipped=True, precision=config.precision,
                            search_defaults=record["outputs"].get("search_defaults"),
                            trials=record["outputs"].get("trials"), trade=record["outputs"].get("exact_trade"))
    if config.max_ppl_increase is not None:
        from ftl.export.choose import export_within

        return export_within(config, p, export_onnx, on_line=on_line)
    _check_memory(p.model_dir)
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
    from ftl.export.exact import GRID_RECORD  # here, not at the top: ftl.export.exact imports torch

    grid = json.loads((out / GRID_RECORD).read_text()) if (out / GRID_RECORD).is_file() else None
    if config.exact_grid and grid is None:
        raise ExportError("the exact int4 grid was not written", str(out / "olive.log"), "read the log")
    if grid and grid.get("left_to_builder"):
        left = grid["left_to_builder"]
        warnings.append(f"{len(left)} decoder matrices have a GGUF type ftl cannot hold exactly ({left[0]}"
                        f"{', …' if len(left) > 1 else ''}): og's {grid['builder_algo']} int4 quantised them; the "
                        "others keep the model's grid (manifest: outputs.int4_grid.left_to_builder)")
    if grid and grid.get("eight_bit_matrices"):
        warnings.append(f"{grid['eight_bit_matrices']} of {grid['matrices']} decoder MatMuls hold GGUF grids of 5–8 "
                        f"bits ({', '.join(k for k in grid['grid_types'] if k[1] != '4')}) exactly as 8-bit "
                        f"MatMulNBits: +{grid['eight_bit_extra_mb']:.0f} MB against 4 bits; at accuracy level 4 (the "
                        "CPU default) they pre-pack like 4-bit ones (bench/models.py measures the decode)")
    if grid and grid.get("lora_delta_rounded_away") is not None:
        warnings.append(f"int4 rounds away {grid['lora_delta_rounded_away']:.0%} of the LoRA's weight changes (each "
                        f"below half a quantisation step; {grid['lora_codes_changed']:.2%} of the codes moved): "
                        "fine-tune with --method qscale for an int4 model that keeps what it learned")

    trade = None
    if grid and config.measure_trade:
        from ftl.export.trade import has_offsets, measure

        if has_offsets(out):
            trade = measure(out, p.validation)
            cost = 1 - trade["decode_vs_integer_zero_points"]
            if config.max_decode_cost is not None and cost > config.max_decode_cost:
                if p.qscale is None and not asked_exact:
                    return _builder_instead(config, p, trade, on_line)
                kept = ("a qscale fine-tune is its grid, so it is kept (og's quantiser would round away what it "
                        "learned)") if p.qscale else "--grid exact asked for it, so it is kept"
                warnings.append(f"the exact grid decodes {cost:.0%} slower than without its offsets, over "
                                f"--max-decode-cost {config.max_decode_cost:.0%}; {kept}")
    search_defaults = None
    if p.validation:
        from ftl.export.search import tune

        search_defaults = tune(out, p.validation)
    seconds = time.perf_counter() - started
    size_mb = folder_size_mb(out)
    record.update(status="complete", timings={"seconds": round(seconds, 1)}, metrics={"size_mb": size_mb},
                  warnings=warnings)
    record["outputs"] = {"adapter_file": _adapter_file(out).name if _adapter_file(out) else None,
                         "layout": layout.as_dict(), "built_with_onnxruntime_genai": _og_version(),
                         "int4_grid": grid, "search_defaults": search_defaults, "exact_trade": trade}
    manifest.write(out, record)
    return ExportResult(out, size_mb, seconds, _adapter_file(out), warnings, search_defaults=search_defaults,
                        precision=config.precision, trade=trade)


def _builder_instead(config: ExportConfig, p: _Plan, trade: dict, on_line) -> ExportResult:
    """--max-decode-cost exceeded by a model's own grid: export with og's quantiser, and say why. The
    manifest keeps the command's own settings and fingerprint, so running it again skips."""
    cost = 1 - trade["decode_vs_integer_zero_points"]
    result = export_onnx(config.model_copy(update={"grid": "builder", "force": True, "max_decode_cost": None}),
                         on_line=on_line)
    why = (f"the exact grid decoded {cost:.0%} slower than without its offsets, over --max-decode-cost "
           f"{config.max_decode_cost:.0%}: exported with og's quantiser instead (--grid builder)")
    record = manifest.read(result.output)
    record.update(fingerprint=p.fingerprint, params={**config.model_dump(mode="json", exclude={"force"}),
                                                     "grid": "builder"})
    record["warnings"] = record.get("warnings", []) + [why]
    record["outputs"]["exact_trade"] = {**trade, "rejected": why}
    manifest.write(result.output, record)
    result.warnings.append(why)
    result.trade = record["outputs"]["exact_trade"]
    return result


def block_misfits(model_dir: Path, block: int) -> str | None:
    """The first input width of the model's MatMuls that ``block`` does not divide, named, or None."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    widths = {"hidden size": text.hidden_size, "intermediate size": getattr(text, "intermediate_size", None),
              "attention width (heads × head_dim)": heads * head_dim if heads and head_dim else None}
    for name, width in widths.items():
        if width and width % block:
            return f"{name} {width}"
    return None


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
