"""``ftl azure check``, ``ftl register`` and ``ftl deploy``."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.azure.deploy import DEFAULT_INSTANCE
from ftl.cli.base import workspace_options
from ftl.progress import console


@click.group()
def azure() -> None:
    """Azure ML: check the workspace and credential ftl would use (needs the [azure] extra)."""


@azure.command("check")
@workspace_options
def check_command(subscription: str | None, resource_group: str | None, workspace: str | None) -> None:
    """Report the workspace settings, the credential, the workspace and its computes, a line each."""
    from ftl.azure.workspace import check, resolve_workspace

    for what, result in check(resolve_workspace(subscription, resource_group, workspace)):
        console.print(f"[green]✓[/] {what}: {result}", highlight=False)


@click.command("register")
@click.argument("export", type=click.Path(exists=True, file_okay=False, path_type=Path))
@workspace_options
def register_command(export: Path, subscription, resource_group, workspace) -> None:
    """Register an ftl export folder as an Azure ML model asset (named by its content hash)."""
    from ftl.azure import deploy
    from ftl.azure.workspace import ml_client, resolve_workspace

    ref = resolve_workspace(subscription, resource_group, workspace)
    prepared = deploy.prepare(export, "ftl-register", workspace=ref)
    model_id = deploy.register(ml_client(ref), prepared)
    console.print(f"[green]✓[/] model {prepared.model_name}:1 → {model_id}", highlight=False)


@click.command("deploy")
@click.argument("export", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(["azureml"]), default="azureml", show_default=True,
              help="Where to serve it: an Azure ML managed online endpoint.")
@click.option("--endpoint", required=True, help="The endpoint name (3-32 letters, digits, dashes).")
@click.option("--deployment", default="blue", show_default=True, help="The deployment name; it gets all traffic.")
@click.option("--instance-type", default=DEFAULT_INSTANCE, show_default=True, help="A CPU VM size.")
@click.option("--instance-count", type=int, default=1, show_default=True)
@click.option("--threads", type=int, help="onnxruntime-genai threads per instance (default: the VM's cores).")
@click.option("--dry-run", is_flag=True, help="Write endpoint.yml, deployment.yml, model.yml, score/, "
                                              "sample-request.json and az.sh into <export>.deploy/; create nothing.")
@workspace_options
def deploy_command(export: Path, target: str, endpoint: str, deployment: str, instance_type: str, instance_count: int,
                   threads: int | None, dry_run: bool, subscription, resource_group, workspace) -> None:
    """Serve an ftl int4 export from an Azure ML managed online endpoint on CPU (key auth)."""
    from ftl.azure import deploy
    from ftl.azure.workspace import ml_client, resolve_workspace

    ref = resolve_workspace(subscription, resource_group, workspace, required=not dry_run)
    prepared = deploy.prepare(export, endpoint, deployment=deployment, instance_type=instance_type,
                              instance_count=instance_count, threads=threads, workspace=ref)
    if dry_run:
        console.print(f"[green]✓[/] written, nothing created: {prepared.folder} (run it with bash "
                      f"{prepared.folder / 'az.sh'})", highlight=False)
        return
    done = deploy.deploy(ml_client(ref), prepared)
    console.print(f"[green]✓[/] {done['endpoint']}/{done['deployment']} serves {prepared.model_name}: "
                  f"{done['scoring_uri']} (keys: az ml online-endpoint get-credentials -n {done['endpoint']})",
                  highlight=False)
