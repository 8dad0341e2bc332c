"""``ftl jobs status | logs | download | cancel JOB``: ftl's Azure ML jobs."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.cli.base import emit, json_option, workspace_options
from ftl.progress import console


def _client(subscription, resource_group, workspace):
    from ftl.azure.workspace import ml_client, resolve_workspace

    return ml_client(resolve_workspace(subscription, resource_group, workspace))


@click.group()
def jobs() -> None:
    """Follow ftl's Azure ML jobs (the name ftl finetune --target azureml printed)."""


@jobs.command("status")
@click.argument("job")
@workspace_options
@json_option
def status_command(job: str, as_json: bool, **ws) -> None:
    """The job's status, compute and studio link."""
    from ftl.azure import jobs as azure_jobs

    emit(azure_jobs.status(_client(**ws), job), as_json, _show)


@jobs.command("logs")
@click.argument("job")
@click.option("--lines", type=int, default=200, show_default=True, help="The last N lines of the job's log.")
@workspace_options
def logs_command(job: str, lines: int, **ws) -> None:
    """The end of the job's log (std_log.txt)."""
    from ftl.azure import jobs as azure_jobs

    for line in azure_jobs.logs(_client(**ws), job, lines):
        click.echo(line)


@jobs.command("download")
@click.argument("job")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="The local finetune folder.")
@click.option("--force", is_flag=True, help="Replace a finished result in --output.")
@workspace_options
def download_command(job: str, output: Path, force: bool, **ws) -> None:
    """A completed job's finetune folder, so ftl export-onnx --adapter carries on here."""
    from ftl.azure import jobs as azure_jobs

    path = azure_jobs.download(_client(**ws), job, output, force=force)
    console.print(f"[green]✓[/] {job} → {path}", highlight=False)


@jobs.command("cancel")
@click.argument("job")
@workspace_options
@json_option
def cancel_command(job: str, as_json: bool, **ws) -> None:
    """Cancel the job."""
    from ftl.azure import jobs as azure_jobs

    emit(azure_jobs.cancel(_client(**ws), job), as_json, _show)


def _show(found: dict) -> None:
    console.print(f"{found['name']}: [bold]{found['status']}[/] on {found['compute'] or '?'}"
                  + (f" — {found['studio_url']}" if found["studio_url"] else ""), highlight=False)
