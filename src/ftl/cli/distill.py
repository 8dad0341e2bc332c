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
@option(C, "model", "--model", multiple=True, default=(), show_default=False,
        help="Model / deployment name, or a local model folder. Repeat it with --base-url/--endpoint to fan out.")
@option(C, "base_url", "--base-url", multiple=True, default=(), show_default=False,
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1. Key: $OPENAI_API_KEY. Repeat to fan out.")
@option(C, "endpoint", "--endpoint", multiple=True, default=(), show_default=False,
        help="Azure OpenAI endpoint. Key: $AZURE_OPENAI_API_KEY, else Entra ID. Repeat to fan out.")
@option(C, "deployments", "--deployments", type=click.Path(path_type=Path), default=None, show_default=False,
        help="A YAML list of deployments to fan out over, each with base_url or endpoint, model, and optionally "
             "name, api_key_env, rpm, tpm, concurrency, price_input, price_output.")
@option(C, "api_key_env", "--api-key-env")
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
@option(C, "quota_window", "--quota-window", type=float)
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
    options.update(fan_out(options.pop("base_url"), options.pop("endpoint"), options.pop("model"),
                           options["deployments"]))
    config = build(C, **options)
    with tracked_stage("distill", manifest_path(config.output), tracking) as run, \
            task_progress("distilling", total=None) as (progress, task):
        def on_progress(result):
            rejected, pending = sum(result.rejected.values()), sum(result.pending.values())
            progress.update(task, completed=result.settled, total=result.to_ask,
                            info=f"{result.answered} ok, {rejected} rejected, {pending} pending, "
                                 f"{result.completion_tokens} tokens, {sum(result.retries.values())} retries")
        result = run_distill(config, on_progress=on_progress,
                             on_warning=lambda message: console.print(f"[yellow]warning:[/] {message}"))
        run.skipped = not result.answered and not sum(result.rejected.values()) and not result.pending
    report_run(run)
    emit(result, as_json, show_distill)


def fan_out(base_urls: tuple, endpoints: tuple, models: tuple, deployments) -> dict:
    """One --base-url/--endpoint and --model is one teacher; several make a fan-out, paired in order
    (one URL with several models, or several URLs with one model, pair up too)."""
    if deployments and (base_urls or endpoints or models):
        raise click.UsageError("--deployments names the teachers (URL and model each): drop --base-url, --endpoint "
                               "and --model, or drop --deployments")
    urls = [("base_url", u) for u in base_urls] + [("endpoint", e) for e in endpoints]
    if len(urls) <= 1 and len(models) <= 1:
        return {"base_url": base_urls[0] if base_urls else None, "endpoint": endpoints[0] if endpoints else None,
                "model": models[0] if models else None}
    if base_urls and endpoints:  # click cannot tell their order apart, so they could pair with the wrong --model
        raise click.UsageError("a fan-out of both --base-url and --endpoint teachers needs --deployments (a YAML "
                               "list), so each URL is paired with its own model")
    if len(urls) == 1:
        urls = urls * len(models)
    if len(models) == 1:
        models = models * len(urls)
    if len(urls) != len(models):
        raise click.UsageError(f"{len(urls)} --base-url/--endpoint and {len(models)} --model: give one --model per "
                               "URL (or one for all)")
    return {"base_url": None, "endpoint": None, "model": None,
            "deployments": [{kind: url, "model": model} for (kind, url), model in zip(urls, models)]}


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
    if result.requests:
        show_rates(result)
    cost = f", estimated cost {result.cost:.4f}" if result.cost is not None else ""
    console.print(f"[green]✓[/] {result.output} (rejects: {result.rejects}){cost}")
    if result.pending:
        console.print("[yellow]note:[/] some seeds failed past their retries and are still pending; run the same "
                      "command again to ask for them")


def show_rates(result) -> None:
    """Requests, 429s, effective rate, and per deployment where the time went and the rate it settled at."""
    table = Table("deployment", "requests", "429s", "answered", "tokens (in/out)", "cost", "wait for budget s",
                  "wait for teacher s", "settled at", title=f"requests {result.requests} · 429s {result.rate_limited} "
                  f"({result.rate_limited_share:.1%}) · effective {result.effective_rpm:.0f} RPM, "
                  f"{result.effective_tpm:.0f} TPM")
    for name, d in result.deployments.items():
        settled = d["settled"]
        rate = " / ".join(f"{settled[k]} {k.upper()}" for k in ("rpm", "tpm") if settled[k]) or "unpaced"
        cost = f"{d['estimated_cost']:.4f}" if d["estimated_cost"] is not None else "-"
        table.add_row(name + (" [red](set aside)[/]" if d["set_aside"] else ""), str(d["requests"]),
                      str(d["rate_limited"]), str(d["answered"]), f"{d['prompt_tokens']}/{d['completion_tokens']}",
                      cost, f"{d['wait_budget_s']:.1f}", f"{d['wait_teacher_s']:.1f}", rate)
    console.print(table)
    for name, d in result.deployments.items():
        settled = d["settled"]
        if settled["source"] and settled["source"] != "--rpm/--tpm":
            rates = ", ".join(f"{settled[k]} {k.upper()}" for k in ("rpm", "tpm") if settled[k])
            flags = " ".join(f"--{k} {settled[k]}" for k in ("rpm", "tpm") if settled[k])
            console.print(f"{name} settled at {rates} (from {settled['source']}); pass {flags} next time to start there")
        elif not settled["source"] and d["rate_limited"] and result.ask_seconds:
            rpm = round(d["requests"] * 60 / result.ask_seconds)
            console.print(f"{name} sent no rate-limit headers; after {d['rate_limited']} 429s it settled at "
                          f"{settled['concurrency']} requests in flight, about {rpm} RPM; pass --rpm {rpm} next time")
