"""``ftl distill``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ftl.cli.base import (build, comma_list, emit, json_option, option, pop_tracking, report_run, tracked_stage,
                          tracking_options)
from ftl.distill.config import DistillConfig as C
from ftl.progress import console, task_progress


@click.command()
@option(C, "seeds", "--seeds")
@option(C, "output", "--output", type=click.Path(path_type=Path))
@option(C, "teacher", "--teacher", help="openai (any OpenAI-compatible endpoint), azure, or local.")
@option(C, "model", "--model")
@option(C, "base_url", "--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1. "
                                          "Key: $OPENAI_API_KEY.")
@option(C, "endpoint", "--endpoint", help="Azure OpenAI endpoint. Key: $AZURE_OPENAI_API_KEY, else Entra ID.")
@option(C, "api_version", "--api-version")
@option(C, "question_field", "--question-field")
@option(C, "context_field", "--context-field")
@option(C, "reference_field", "--reference-field")
@option(C, "dataset_split", "--dataset-split")
@option(C, "system_prompt", "--system-prompt")
@option(C, "prompt_template", "--prompt-template")
@option(C, "max_tokens", "--max-tokens", type=int)
@option(C, "temperature", "--temperature", type=float)
@option(C, "n", "--n", type=int)
@option(C, "concurrency", "--concurrency", type=int)
@option(C, "rpm", "--rpm", type=int)
@option(C, "tpm", "--tpm", type=int)
@option(C, "max_retries", "--max-retries", type=int)
@option(C, "timeout", "--timeout", type=float)
@option(C, "limit", "--limit", type=int)
@option(C, "val_fraction", "--split", type=float)
@option(C, "price_input", "--price-input", type=float)
@option(C, "price_output", "--price-output", type=float)
@option(C, "retry_rejects", "--retry-rejects", metavar="REASONS",
        help="Ask again for the rejected seeds with these reasons, e.g. truncated,refusal (or all).")
@tracking_options
@json_option
def distill(as_json: bool, **options) -> None:
    """A teacher answers seed questions into Q/A JSONL that ftl finetune takes as it is."""
    from ftl.distill import distill as run_distill

    from ftl.distill.stage import manifest_path

    tracking = pop_tracking(options)
    options["retry_rejects"] = comma_list(options["retry_rejects"])
    config = build(C, **options)
    with tracked_stage("distill", manifest_path(config.output), tracking) as run, \
            task_progress("distilling", total=None) as (progress, task):
        def on_progress(result):
            rejected, pending = sum(result.rejected.values()), sum(result.pending.values())
            progress.update(task, completed=result.settled, total=result.to_ask,
                            info=f"{result.answered} ok, {rejected} rejected, {pending} pending, "
                                 f"{result.completion_tokens} tokens, {sum(result.retries.values())} retries")
        result = run_distill(config, on_progress=on_progress)
        run.skipped = not result.answered and not sum(result.rejected.values()) and not result.pending
    report_run(run)
    emit(result, as_json, show_distill)


def show_distill(result) -> None:
    table = Table("answered", "already done", "rejected", "pending", "duplicates", "retries", "tokens (in/out)",
                  "time", title="distill")
    rejected = ", ".join(f"{k} {v}" for k, v in result.rejected.items()) or "0"
    pending = ", ".join(f"{k} {v}" for k, v in result.pending.items()) or "0"
    retries = ", ".join(f"{k} {v}" for k, v in result.retries.items()) or "0"
    table.add_row(str(result.answered), str(result.already_done), rejected, pending,
                  f"{result.duplicates_exact} exact, {result.duplicates_near} near", retries,
                  f"{result.prompt_tokens}/{result.completion_tokens}", f"{result.seconds:.1f}s")
    console.print(table)
    cost = f", estimated cost {result.cost:.4f}" if result.cost is not None else ""
    console.print(f"[green]✓[/] {result.output} (rejects: {result.rejects}){cost}")
    if result.pending:
        console.print("[yellow]note:[/] some seeds failed past their retries and are still pending; run the same "
                      "command again to ask for them")
