"""``ftl run``."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.cli.base import open_tracker, pop_tracking, tracking_options


@click.command("run")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--force", is_flag=True, help="Replace the results of stages whose inputs changed.")
@click.option("--dry-run", is_flag=True, help="Check every stage and write each Olive workflow; run nothing.")
@tracking_options
def run_pipeline(pipeline: Path, overrides: tuple[str, ...], force: bool, dry_run: bool, **options) -> None:
    """Run a pipeline YAML (import → distill → finetune → export → generate → eval).

    OVERRIDES are key=value, e.g. finetune.max_steps=5. Every stage is validated before any runs.
    """
    from ftl.pipeline import load_pipeline, run

    tracking = pop_tracking(options)
    plan = load_pipeline(pipeline, overrides)
    tracker = None if dry_run else open_tracker(tracking, plan.work, experiment=plan.spec.name)
    run(plan, force=force, dry_run=dry_run, tracker=tracker, log_model=tracking["log_model"])
