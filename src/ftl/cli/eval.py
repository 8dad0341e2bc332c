"""``ftl eval``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ftl.cli.base import build, emit, json_option, option, pop_tracking, report_run, tracked_stage, tracking_options
from ftl.eval.config import EvalConfig as C
from ftl.progress import console, task_progress

# A terminal-width subset of the report's columns; report.md/html have every column.
_TERMINAL_COLUMNS = [0, 1, 3, 6, 7, 10, 12, 13, 14]


@click.command("eval")
@option(C, "models", "--model", multiple=True, required=True,
        help="onnx:PATH (export folder) or torch:PATH (HF folder, finetune folder or adapter); repeat.")
@option(C, "data", "--data")
@option(C, "output", "--output", type=click.Path(path_type=Path))
@option(C, "question_field", "--question-field")
@option(C, "answer_field", "--answer-field")
@option(C, "limit", "--limit", type=int)
@option(C, "max_new_tokens", "--max-new-tokens", type=int)
@option(C, "numeric", "--numeric/--no-numeric", default=None)
@option(C, "latency_samples", "--latency-samples", type=int)
@option(C, "batch_size", "--batch-size", type=int)
@click.option("--no-memory", is_flag=True, help="Skip the peak-RSS probe (one child process per model).")
@option(C, "compare", "--compare", type=click.Path(path_type=Path))
@option(C, "force", "--force", is_flag=True)
@tracking_options
@json_option
def eval_command(no_memory: bool, as_json: bool, **options) -> None:
    """Compare models on perplexity, quantization damage (KL, top-1), ROUGE and latency."""
    from ftl.eval import evaluate

    tracking = pop_tracking(options)
    options["models"] = list(options["models"])
    config = build(C, memory=not no_memory, **options)
    with tracked_stage("eval", config.output / "manifest.json", tracking) as run, \
            task_progress("evaluating", total=None) as (progress, task):
        result = evaluate(config, on_progress=lambda i, n: progress.update(task, completed=i, total=n))
    report_run(run)
    emit(result.summary if as_json else result, as_json, show_eval)


def show_eval(result) -> None:
    from ftl.eval.report import table_rows, unbatched_note

    header, rows = table_rows(result.summary)
    table = Table(*[header[i] for i in _TERMINAL_COLUMNS], title=f"eval — {result.summary['samples']} samples")
    for row in rows:
        table.add_row(*[row[i] for i in _TERMINAL_COLUMNS])
    console.print(table)
    if note := unbatched_note(result.summary):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    for change in result.comparison:
        console.print(f"  {change['model']} {change['metric']}: {change['before']:.4f} → {change['now']:.4f} "
                      f"({change['change']:+.4f})")
    console.print(f"[green]✓[/] {result.output}/report.html, report.md, metrics_summary.json, detailed_results.json")
