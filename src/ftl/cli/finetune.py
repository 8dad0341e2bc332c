"""``ftl finetune``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ftl.cli.base import (build, comma_list, emit, json_option, option, pop_tracking, report_run, tracked_stage,
                          tracking_options)
from ftl.finetune.config import FinetuneConfig as C
from ftl.progress import console, run_with_progress


@click.command()
@option(C, "model", "--model")
@option(C, "data", "--data", multiple=True, type=click.Path(path_type=Path),
        help="Q/A JSONL or chat messages JSONL; repeat to train on several files.")
@option(C, "output", "--output", type=click.Path(path_type=Path))
@option(C, "question_field", "--question-field")
@option(C, "answer_field", "--answer-field")
@option(C, "messages_field", "--messages-field")
@option(C, "system_prompt", "--system-prompt")
@option(C, "text_template", "--text-template", help="e.g. '### Q: {Question}\\n### A: {Answer}' instead of "
                                                    "the chat template; only those two placeholders.")
@option(C, "method", "--method", type=click.Choice(["lora", "qscale", "qlora"]))
@option(C, "r", "--lora-r", type=int)
@option(C, "alpha", "--lora-alpha", type=float)
@option(C, "dropout", "--lora-dropout", type=float)
@option(C, "target_modules", "--target-modules", help="Comma-separated module names (default: peft's for the "
                                                      "model type).")
@option(C, "epochs", "--epochs", type=float)
@option(C, "max_steps", "--max-steps", type=int)
@option(C, "batch_size", "--batch-size", type=int)
@option(C, "grad_accum", "--grad-accum", type=int)
@option(C, "learning_rate", "--learning-rate", type=float)
@option(C, "max_seq_len", "--max-seq-len", type=int)
@option(C, "logging_steps", "--logging-steps", type=int)
@option(C, "save_steps", "--save-steps", type=int)
@option(C, "train_on_prompt", "--train-on-prompt", is_flag=True)
@option(C, "val_split", "--val-split", type=float)
@option(C, "val_data", "--val-data", multiple=True, type=click.Path(path_type=Path),
        help="Validation rows from this file instead of a split; repeat for several.")
@option(C, "eval_steps", "--eval-steps", type=int)
@option(C, "early_stopping_patience", "--early-stopping-patience", type=int)
@option(C, "seed", "--seed", type=int)
@click.option("--save-config", type=click.Path(path_type=Path), help="Write the Olive workflow and stop.")
@option(C, "force", "--force", is_flag=True)
@tracking_options
@json_option
def finetune(save_config: Path | None, as_json: bool, **options) -> None:
    """Fine-tuning through Olive: a LoRA adapter, or (--method qscale) the int4 grid's own scales.
    Every row is used; the loss goes to the manifest."""
    from ftl.finetune import finetune as run_finetune

    tracking = pop_tracking(options)
    options["data"] = list(options["data"])
    options["val_data"] = list(options["val_data"]) or None
    options["target_modules"] = comma_list(options["target_modules"])
    config = build(C, **options)
    if save_config:
        result = run_finetune(config, save_config=save_config)
    else:
        with tracked_stage("finetune", config.output / "manifest.json", tracking) as run:
            result = run_with_progress("fine-tuning", lambda cb: run_finetune(config, on_progress=cb))
            run.skipped = result.skipped
        report_run(run)
    emit(result, as_json, show_finetune)


def show_finetune(result) -> None:
    if result.config_only:
        console.print(f"[green]✓[/] Olive workflow written ({result.rows} rows, {result.tokens} tokens, "
                      f"{result.steps} steps); nothing was trained")
        return
    table = Table("rows", "tokens", "answer tokens", "steps", "first loss", "final loss", "time", title="finetune")
    first = f"{result.loss_curve[0]['loss']:.4f}" if result.loss_curve else "—"
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "—"
    note = " (unchanged, skipped)" if result.skipped else " (resumed)" if result.resumed else ""
    table.add_row(str(result.rows), str(result.tokens), str(result.answer_tokens), str(result.steps), first, final,
                  f"{result.seconds:.0f}s{note}")
    console.print(table)
    what = "int4 grid scales" if result.adapter.name.endswith(".safetensors") else "adapter"
    console.print(f"[green]✓[/] {what} → {result.adapter}")
