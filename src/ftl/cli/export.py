"""``ftl export-onnx``."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.cli.base import (build, comma_list, emit, json_option, option, pop_tracking, report_run, tracked_stage,
                          tracking_options)
from ftl.export.config import ExportConfig as C
from ftl.progress import console, task_progress


@click.command("export-onnx")
@option(C, "adapter", "--adapter", type=click.Path(path_type=Path))
@option(C, "model", "--model")
@option(C, "output", "--output", type=click.Path(path_type=Path))
@option(C, "precision", "--precision", type=click.Choice(["int4", "fp32"]))
@option(C, "block_size", "--block-size", type=click.Choice(["16", "32", "64", "128", "256"]))
@option(C, "op_types", "--op-types", help="Ops quantized to int4, comma-separated.")
@option(C, "int4_algo", "--int4-algo", type=click.Choice(["default", "rtn", "k_quant", "k_quant_mixed",
                                                          "k_quant_last"]))
@option(C, "symmetric", "--symmetric/--asymmetric")
@option(C, "accuracy_level", "--accuracy-level", type=click.IntRange(1, 4))
@option(C, "grid", "--grid", type=click.Choice(["exact", "builder"]))
@option(C, "grid_form", "--grid-form", type=click.Choice(["offset", "float-zp"]))
@option(C, "validation_data", "--validation-data", type=click.Path(path_type=Path))
@option(C, "validation_limit", "--validation-limit", type=int)
@option(C, "max_ppl_increase", "--max-ppl-increase", type=str)
@option(C, "max_decode_cost", "--max-decode-cost", type=str)
@option(C, "measure_trade", "--measure-trade/--no-measure-trade")
@option(C, "keep_adapter_separate", "--keep-adapter-separate", is_flag=True)
@click.option("--save-config", type=click.Path(path_type=Path), help="Write the Olive workflow and stop.")
@option(C, "force", "--force", is_flag=True)
@tracking_options
@json_option
def export_onnx(save_config: Path | None, as_json: bool, **options) -> None:
    """Build an int4 onnxruntime-genai folder for CPU through Olive: a qscale fine-tune's grid written
    exactly, or a LoRA merged into the base and quantised."""
    from ftl.export import export_onnx as run_export

    tracking = pop_tracking(options)
    options["op_types"] = comma_list(options["op_types"])
    options["block_size"] = int(options["block_size"])
    config = build(C, **options)
    if save_config:
        result = run_export(config, save_config=save_config)
    else:
        with tracked_stage("export", config.output / "manifest.json", tracking) as run, \
                task_progress("exporting int4 ONNX (Olive)"):
            result = run_export(config)
            run.skipped = result.skipped
        report_run(run)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    emit(result, as_json, show_export)


def show_export(result) -> None:
    if result.config_only:
        console.print("[green]✓[/] Olive workflow written; nothing was exported. Run it with `olive run --config "
                      "WF.json --package-config WF.package_config.json` (ftl's builder pass is registered there)")
        return
    note = " (unchanged, skipped)" if result.skipped else ""
    if result.trials:
        from rich.table import Table

        trials = result.trials
        table = Table("candidate", "MB", "answer ppl", "× source", "", title=f"--max-ppl-increase "
                      f"{trials['max_ppl_increase']:.1%}: {trials['rows']} held-out rows, source ppl "
                      f"{trials['reference_ppl']:.3f}")
        for trial in trials["trials"]:
            if "error" in trial:
                table.add_row(trial["name"], "—", "—", "—", f"not built: {trial['error'][:60]}")
                continue
            table.add_row(trial["name"], f"{trial['size_mb']:.1f}", f"{trial['ppl']:.3f}", f"{trial['ratio']:.3f}",
                          "kept" if trial["kept"] else ("within" if trial["within"] else "over"))
        console.print(table)
    if result.search_defaults:
        from rich.table import Table

        tuned = result.search_defaults
        table = Table("search", "ROUGE-L", "repeated 4-grams", "looping", "",
                      title=f"search defaults, {tuned['rows']} held-out questions")
        for trial in tuned["trials"]:
            table.add_row(trial["name"], f"{trial['rouge_l']:.3f}", f"{trial['repeated_ngrams']:.1f}",
                          f"{trial['looping']:.2f}", "← genai_config.json" if trial["chosen"] else "")
        console.print(table)
    if result.trade and "rejected" not in result.trade:
        from ftl.export.trade import line

        console.print(line(result.trade))
    console.print(f"[green]✓[/] {result.precision} model → {result.output} ({result.size_mb} MB, {result.seconds:.0f}s{note})")


@click.command("export-gguf")
@click.option("--adapter", type=click.Path(path_type=Path),
              help="A qscale finetune output folder: its trained grid is written. Without it, the model as imported.")
@click.option("--model", help="The imported GGUF model (default: the one the fine-tune was trained on).")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for model.gguf and its manifest.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@json_option
def export_gguf(adapter: Path | None, model: str | None, output: Path, force: bool, as_json: bool) -> None:
    """Write a qscale fine-tune as a GGUF for llama.cpp, Ollama and LM Studio: the file its base was
    imported from, with the trained Q4_1 blocks in place of the base's, checked bit for bit."""
    from ftl.export.gguf_export import export_gguf as run

    with task_progress("writing GGUF"):
        result = run(adapter, model, output, force=force)
    emit(result, as_json, show_gguf)


def show_gguf(result) -> None:
    note = " (unchanged, skipped)" if result.skipped else ""
    console.print(f"[green]✓[/] GGUF → {result.file} ({result.size_mb} MB, {result.trained} trained matrices written "
                  f"exactly, {result.copied} tensors as in the source, chat template: {result.chat_template}, "
                  f"{result.seconds:.0f}s{note})")
