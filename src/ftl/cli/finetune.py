"""``ftl finetune``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ftl.azure.jobs import DEFAULT_IMAGE
from ftl.cli.base import (build, comma_list, emit, json_option, option, pop_tracking, report_run, tracked_stage,
                          tracking_options, workspace_options)
from ftl.finetune import distributed
from ftl.finetune.config import FinetuneConfig as C
from ftl.progress import console, run_with_progress


@click.command()
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Settings from a JSON or YAML file (an Azure ML job runs with the finetune.json it ships); "
                   "flags given and KEY=VALUE arguments (values JSON or YAML, e.g. packing=false) override it.")
@option(C, "model", "--model", required=False)
@option(C, "data", "--data", multiple=True, type=click.Path(path_type=Path), required=False,
        help="Q/A JSONL or chat messages JSONL; repeat to train on several files.")
@option(C, "output", "--output", type=click.Path(path_type=Path), required=False)
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
@option(C, "packing", "--packing/--no-packing")
@option(C, "precision", "--precision", type=click.Choice(["fp32", "bf16"]))
@option(C, "seed", "--seed", type=int)
@click.option("--save-config", type=click.Path(path_type=Path), help="Write the Olive workflow and stop.")
@option(C, "force", "--force", is_flag=True)
@click.option("--target", type=click.Choice(["local", "azureml"]), default="local", show_default=True,
              help="Where to train: this machine, or an Azure ML job (needs the [azure] extra).")
@click.option("--compute", help="azureml: the compute cluster to run on.")
@click.option("--instance-count", type=int, default=1, show_default=True, help="azureml: nodes.")
@click.option("--gpus-per-node", type=int, default=1, show_default=True,
              help="azureml: processes per node (PyTorch distribution when nodes × GPUs > 1).")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="azureml: the base image of the environment.")
@click.option("--dry-run", is_flag=True, help="azureml: write job.yml, the environment, az.sh beside --output "
                                              "(<output>.azureml/) and submit nothing.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="azureml: poll until the job ends and download its output into --output; or print its name.")
@click.option("--queue-timeout", type=float, default=240, show_default=True, help="azureml: minutes queued before giving up waiting.")
@click.option("--run-timeout", type=float, default=2880, show_default=True, help="azureml: minutes running before giving up waiting.")
@workspace_options
@tracking_options
@json_option
def finetune(overrides: tuple[str, ...], config_file: Path | None, save_config: Path | None, as_json: bool,
             **options) -> None:
    """Fine-tuning through Olive: a LoRA adapter, or (--method qscale) the int4 grid's own scales.
    Every row is used; the loss goes to the manifest. --target azureml runs it as an Azure ML job.

    Settings come from --config FILE, then the flags given, then KEY=VALUE arguments (the config's
    own keys, e.g. r=8 target_modules=[q_proj,v_proj]), each overriding the one before."""
    from ftl.finetune import finetune as run_finetune

    azure = {key: options.pop(key) for key in _AZURE}
    tracking = pop_tracking(options)
    config = _config(config_file, options, overrides)
    if azure["target"] == "azureml":
        emit(_on_azure(config, tracking, azure), as_json, _show_azure)
        return
    if save_config:
        result = run_finetune(config, save_config=save_config)
    elif not distributed.current().main:
        # A worker of a torchrun/Azure ML distributed run: rank 0 owns the run, its MLflow run and its output.
        result = run_finetune(config)
    else:
        with tracked_stage("finetune", config.output / "manifest.json", tracking) as run:
            result = run_with_progress("fine-tuning", lambda cb: run_finetune(config, on_progress=cb))
            run.skipped = result.skipped
        report_run(run)
    emit(result, as_json, show_finetune)


def show_finetune(result) -> None:
    if result.rank:
        console.print(f"[green]✓[/] rank {result.rank}: {result.steps} steps trained; rank 0 writes the adapter and "
                      "manifest", highlight=False)
        return
    if result.config_only:
        console.print(f"[green]✓[/] Olive workflow written ({result.rows} rows, {result.tokens} tokens, "
                      f"{result.steps} steps); nothing was trained")
        return
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    table = Table("rows", "tokens", "answer tokens", "steps", "first loss", "final loss", "train tok/s", "time",
                  title="finetune")
    first = f"{result.loss_curve[0]['loss']:.4f}" if result.loss_curve else "—"
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "—"
    note = " (unchanged, skipped)" if result.skipped else " (resumed)" if result.resumed else ""
    rate = f"{result.train_tokens_per_s:.0f}" if result.train_tokens_per_s else "—"
    table.add_row(str(result.rows), str(result.tokens), str(result.answer_tokens), str(result.steps), first, final,
                  rate, f"{result.seconds:.0f}s{note}")
    console.print(table)
    what = "int4 grid scales" if result.adapter.name.endswith(".safetensors") else "adapter"
    console.print(f"[green]✓[/] {what} → {result.adapter}")


_AZURE = ("target", "compute", "instance_count", "gpus_per_node", "image", "dry_run", "wait", "queue_timeout",
          "run_timeout", "subscription", "resource_group", "workspace")


def _config(config_file: Path | None, options: dict, overrides: tuple[str, ...]) -> C:
    """The file's settings, then the flags given on the command line (a flag left at its default
    does not override the file), then KEY=VALUE; a bad value names its flag, or its key."""
    from pydantic import ValidationError

    from ftl.config import settings_error
    from ftl.finetune.config import parse_overrides, read_settings

    ctx = click.get_current_context()
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE}
    for key, convert in (("data", list), ("val_data", lambda v: list(v) or None), ("target_modules", comma_list)):
        if key in given:
            given[key] = convert(given[key])
    values = {**(read_settings(config_file) if config_file else {}), **given, **parse_overrides(overrides)}
    if not config_file and not overrides:
        return build(C, **values)  # flags alone: every error names its flag
    try:
        return C(**values)
    except ValidationError as exc:
        flags = {p.name: max(p.opts, key=len) for p in ctx.command.params if isinstance(p, click.Option)}
        raise settings_error(exc, source=str(config_file or "ftl finetune"), model=C, key_name=lambda loc: " ".join(
            [flags[str(loc[0])] if str(loc[0]) in given else str(loc[0]), *map(str, loc[1:])]) if loc else "",
            fix="fix those settings and run again") from None


def _on_azure(config, tracking: dict, azure: dict):
    """Submit the fine-tune as an Azure ML command job (or, with --dry-run, write it)."""
    from ftl import manifest
    from ftl.azure import jobs, workspace
    from ftl.errors import ConfigError
    from ftl.finetune.stage import plan

    if not azure["compute"]:
        raise ConfigError("--target azureml needs a compute cluster", "--compute", "pass --compute NAME "
                          "(`ftl azure check` lists them)")
    if azure["instance_count"] < 1 or azure["gpus_per_node"] < 1:
        raise ConfigError("--instance-count and --gpus-per-node must be at least 1", "--instance-count / "
                          "--gpus-per-node", "pass positive numbers (1 and 1 for a single GPU)")
    if azure["instance_count"] * azure["gpus_per_node"] > 1 and config.method == "qscale":
        raise ConfigError("--method qscale trains in one process", "--instance-count / --gpus-per-node",
                          "use --method lora or qlora for a distributed job, or one GPU")
    fingerprint = plan(config).fingerprint  # the rows, template and model are checked before any upload
    manifest.check_output(config.output, force=config.force, stage="finetune")
    ref = workspace.resolve_workspace(azure["subscription"], azure["resource_group"], azure["workspace"],
                                      required=not azure["dry_run"])
    prepared = jobs.prepare(config, compute=azure["compute"], instance_count=azure["instance_count"],
                            gpus_per_node=azure["gpus_per_node"], image=azure["image"],
                            experiment=tracking.get("experiment") or "ftl", workspace=ref)
    if azure["dry_run"]:
        return {"dry_run": True, "folder": str(prepared.folder), "job": str(prepared.job_yml),
                "az_sh": str(prepared.folder / "az.sh"), "command": prepared.command}
    ml = workspace.ml_client(ref)
    limits = jobs.WaitLimits(queue_s=azure["queue_timeout"] * 60, run_s=azure["run_timeout"] * 60)
    result = jobs.submit(ml, prepared, wait=azure["wait"], limits=limits, compute=azure["compute"],
                         download_to=config.output if azure["wait"] else None, fingerprint=fingerprint,
                         say=lambda line: console.print(line, highlight=False))
    return {"dry_run": False, "job": result.name, "status": result.status, "studio_url": result.studio_url,
            "output": str(result.downloaded) if result.downloaded else None}


def _show_azure(result: dict) -> None:
    if result["dry_run"]:
        console.print(f"[green]✓[/] Azure ML job written, nothing submitted: {result['job']}\n"
                      f"  run it with: bash {result['az_sh']}", highlight=False)
    elif result["output"]:
        console.print(f"[green]✓[/] job {result['job']} {result['status']}; output → {result['output']}",
                      highlight=False)
    else:
        console.print(f"[green]✓[/] submitted job {result['job']} ({result['status']})"
                      + (f": {result['studio_url']}" if result["studio_url"] else ""), highlight=False)

