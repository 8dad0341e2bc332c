"""``ftl sweep``."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.cli.base import open_tracker, pop_tracking, tracking_options, workspace_options


@click.command("sweep")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--set", "sets", multiple=True, metavar="STAGE.KEY=V1,V2",
              help="A swept setting and its values; repeat for a grid. Adds to the YAML's matrix: block.")
@click.option("--rank-by", metavar="METRIC[:min|max]",
              help="Rank the variants by this metric (default: eval.exported.perplexity_answer, lower is better; "
                   "without an eval stage, finetune.best_eval_loss, then finetune.final_loss).")
@click.option("--force", is_flag=True, help="Replace the results of stages whose inputs changed.")
@click.option("--target", type=click.Choice(["local", "azureml"]), default="local", show_default=True,
              help="local: variant after variant here; azureml: one Azure ML sweep job (finetune.* keys only).")
@click.option("--compute", help="azureml: the compute cluster the trials run on.")
@click.option("--max-concurrent", type=int, default=4, show_default=True, help="azureml: trials at once.")
@click.option("--dry-run", is_flag=True, help="azureml: write the sweep job.yml and az.sh; submit nothing.")
@workspace_options
@tracking_options
def sweep_command(pipeline: Path, overrides: tuple[str, ...], sets: tuple[str, ...], rank_by: str | None,
                  force: bool, target: str, compute: str | None, max_concurrent: int, dry_run: bool,
                  subscription: str | None, resource_group: str | None, workspace: str | None, **options) -> None:
    """Run a pipeline over a grid of settings, one variant after another, and compare them.

    The first combination is the control. Stages whose inputs are the same in every variant run
    once. OVERRIDES are key=value for every variant, as for ftl run. Each variant is an MLflow
    child run of the sweep; the comparison goes to <workdir>/sweep/comparison.html.
    """
    from ftl.pipeline.runner import read_pipeline
    from ftl.pipeline.sweep import check_rank_by, parse_sets, sweep

    tracking = pop_tracking(options)
    parse_sets(sets)  # a malformed --set fails before the tracking store is opened
    if target == "azureml":
        _on_azure(pipeline, sets, overrides, compute, max_concurrent, dry_run, subscription, resource_group, workspace)
        return
    check_rank_by(rank_by)
    raw = read_pipeline(pipeline)
    tracker = open_tracker(tracking, Path(raw["workdir"]), experiment=raw["name"])
    sweep(pipeline, sets, overrides=overrides, rank_by=rank_by, force=force, tracker=tracker,
          log_model=tracking["log_model"])


def _on_azure(pipeline, sets, overrides, compute, max_concurrent, dry_run, subscription, resource_group, workspace):
    from ftl.azure.workspace import ml_client, resolve_workspace
    from ftl.errors import ConfigError
    from ftl.pipeline.sweep import azure_sweep
    from ftl.progress import console

    if not compute:
        raise ConfigError("--target azureml needs a compute cluster", "--compute", "pass --compute NAME")
    ref = resolve_workspace(subscription, resource_group, workspace, required=not dry_run)
    prepared, submitted = azure_sweep(pipeline, sets, overrides=overrides, compute=compute,
                                      dry_run=dry_run, max_concurrent=max_concurrent, workspace=ref,
                                      ml=None if dry_run else ml_client(ref))
    if submitted is None:
        console.print(f"[green]✓[/] Azure ML sweep job written, nothing submitted: {prepared.job_yml} (run it with "
                      f"bash {prepared.folder / 'az.sh'})", highlight=False)
    else:
        console.print(f"[green]✓[/] submitted sweep job {submitted.name} ({submitted.status})"
                      + (f": {submitted.studio_url}" if submitted.studio_url else ""), highlight=False)
