"""``ftl runs list | compare | sync``: ftl's runs as MLflow holds them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from rich.table import Table

from ftl.cli.base import open_tracker
from ftl.progress import console

_uri = click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                           "sqlite:///runs/mlflow.db).")
_experiment = click.option("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else ftl).")


@click.group()
def runs() -> None:
    """List, compare and sync ftl's MLflow runs."""


@runs.command("list")
@_uri
@_experiment
@click.option("--limit", type=int, default=50, show_default=True, help="Newest runs shown.")
def list_command(tracking_uri: str | None, experiment: str | None, limit: int) -> None:
    """The runs of an experiment, newest first, with their key metrics."""
    from ftl.runs import key_metrics, list_runs

    tracker = open_tracker({"tracking_uri": tracking_uri, "experiment": experiment}, create=False)
    views = list_runs(tracker, limit=limit)
    shown = [k for k in key_metrics(views) if k in _HEADLINE or k.startswith(("eval.exported.", "exported."))][:6]
    table = Table("run", "name", "stage", "status", "started", *shown, title=f"experiment {tracker.experiment}")
    for v in views:
        started = dt.datetime.fromtimestamp(v.start / 1000).strftime("%Y-%m-%d %H:%M") if v.start else "—"
        table.add_row(v.run_id[:8], v.name, v.stage, v.status, started, *(_fmt(v.metrics.get(k)) for k in shown))
    console.print(table)


_HEADLINE = ("final_loss", "best_eval_loss", "size_mb", "finetune.final_loss", "export.size_mb")


@runs.command("compare")
@click.argument("run_ids", nargs=-1)
@_uri
@_experiment
@click.option("--output", type=click.Path(path_type=Path), default=Path("runs/comparison.html"), show_default=True,
              help="The HTML report (loss curves overlaid, metrics side by side).")
@click.option("--force", is_flag=True, help="Replace --output even if it is not an ftl comparison report.")
def compare_command(run_ids: tuple[str, ...], tracking_uri: str | None, experiment: str | None, output: Path,
                    force: bool) -> None:
    """Compare RUN_IDS (ids, unique prefixes or run names), or every top-level run of --experiment."""
    from ftl.runs import differing_params, experiment_runs, key_metrics, resolve, with_curves, write_html

    if not run_ids and not experiment:
        raise click.UsageError("give run ids, or --experiment NAME")
    tracker = open_tracker({"tracking_uri": tracking_uri, "experiment": experiment}, create=False)
    views = resolve(tracker, list(run_ids)) if run_ids else experiment_runs(tracker)
    if len(views) < 2:
        raise click.UsageError(f"{len(views)} run found to compare; need at least two")
    with_curves(tracker, views)
    table = Table("", *(f"{v.name}\n{v.run_id[:8]}" for v in views), title="parameters that differ")
    for key in differing_params(views):
        table.add_row(key, *(v.params.get(key, "—") for v in views))
    console.print(table)
    table = Table("", *(f"{v.name}\n{v.run_id[:8]}" for v in views), title="metrics")
    for key in key_metrics(views):
        table.add_row(key, *(_fmt(v.metrics.get(key)) for v in views))
    console.print(table)
    path = write_html(output, views, title=f"ftl runs compare — {tracker.experiment}", force=force)
    console.print(f"[green]✓[/] report → {path}")


@runs.command("sync")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_uri
@_experiment
@click.option("--log-model", is_flag=True, help="Log the weights too.")
def sync_command(folders: tuple[Path, ...], tracking_uri: str | None, experiment: str | None, log_model: bool) -> None:
    """Log finished run folders (stage outputs or pipeline work folders) from their manifests.
    Already-logged results are skipped, so running it twice creates no duplicates."""
    from ftl.runs import sync
    from ftl.tracking import redact

    tracker = open_tracker({"tracking_uri": tracking_uri, "experiment": experiment})
    done = sync(tracker, list(folders), log_model=log_model)
    for item in done:
        what = "logged" if item.created else "already there"
        console.print(f"{item.path}: {what} (run {item.run_id})", highlight=False)
    console.print(f"[green]✓[/] {sum(d.created for d in done)} new run(s), {sum(not d.created for d in done)} "
                  f"already there, at {redact(tracker.uri)}")


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
