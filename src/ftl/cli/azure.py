"""``ftl azure check``."""

from __future__ import annotations

import click

from ftl.progress import console


@click.group()
def azure() -> None:
    """Azure ML: check the workspace and credential ftl would use (needs the [azure] extra)."""


@azure.command("check")
@click.option("--subscription", help="Subscription id (else $AZURE_SUBSCRIPTION_ID, else .azureml/config.json).")
@click.option("--resource-group", help="Resource group (else $AZURE_RESOURCE_GROUP, else the config file).")
@click.option("--workspace", help="Workspace name (else $AZUREML_WORKSPACE_NAME, else the config file).")
def check_command(subscription: str | None, resource_group: str | None, workspace: str | None) -> None:
    """Report the workspace settings, the credential, the workspace and its computes, a line each."""
    from ftl.azure.workspace import check, resolve_workspace

    for what, result in check(resolve_workspace(subscription, resource_group, workspace)):
        console.print(f"[green]✓[/] {what}: {result}", highlight=False)
