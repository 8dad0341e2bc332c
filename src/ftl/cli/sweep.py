"""``ftl sweep``."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.cli.base import open_tracker, pop_tracking, tracking_options


@click.command("sweep")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--set", "sets", multiple=True, metavar="STAGE.KEY=V1,V2",
              help="A swept setting and its values; repeat for a grid. Adds to the YAML's matrix: block.")
@click.option("--rank-by", metavar="METRIC[:min|max]",
              help="Rank the variants by this metric (default: eval.exported.perplexity_answer, lower is better; "
                   "without an eval stage, finetune.best_eval_loss, then finetune.final_loss).")
@click.option("--force", is_flag=True, help="Replace the results of stages whose inputs changed.")
@tracking_options
def sweep_command(pipeline: Path, overrides: tuple[str, ...], sets: tuple[str, ...], rank_by: str | None,
                  force: bool, **options) -> None:
    """Run a pipeline over a grid of settings, one variant after another, and compare them.

    The first combination is the control. Stages whose inputs are the same in every variant run
    once. OVERRIDES are key=value for every variant, as for ftl run. Each variant is an MLflow
    child run of the sweep; the comparison goes to <workdir>/sweep/comparison.html.
    """
    from ftl.pipeline.runner import read_pipeline
    from ftl.pipeline.sweep import check_rank_by, parse_sets, sweep

    tracking = pop_tracking(options)
    parse_sets(sets)  # a malformed --set fails before the tracking store is opened
    check_rank_by(rank_by)
    raw = read_pipeline(pipeline)
    tracker = open_tracker(tracking, Path(raw["workdir"]), experiment=raw["name"])
    sweep(pipeline, sets, overrides=overrides, rank_by=rank_by, force=force, tracker=tracker,
          log_model=tracking["log_model"])
