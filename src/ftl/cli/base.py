"""What every command shares: options that read their default and help from the config model,
one place that builds a config from options (naming the flag in any error), and one place that
prints a result (``emit``), as a table for people or as JSON for scripts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import click
from pydantic import BaseModel, ValidationError

from ftl.config import settings_error


def option(model: type[BaseModel], field: str, *decls: str, **kwargs) -> Callable:
    """A click option whose default and help come from ``model.field``: each default has one home."""
    info = model.model_fields[field]
    kwargs.setdefault("help", info.description)
    if info.is_required():
        kwargs.setdefault("required", True)
    elif not kwargs.get("is_flag"):
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(map(str, default))
        kwargs.setdefault("default", default)
        kwargs.setdefault("show_default", default is not None)
    return click.option(*decls, field, **kwargs)


def comma_list(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def build(config_class: type[BaseModel], /, **values):
    """The config for these option values; a bad value is one line naming the flag, not the field."""
    try:
        return config_class(**values)
    except ValidationError as exc:
        ctx = click.get_current_context()
        flags = {p.name: max(p.opts, key=len) for p in ctx.command.params if isinstance(p, click.Option)}

        def key_name(loc: tuple) -> str:
            """The flag, then where inside its value: ``--deployments entry 2 rpm``."""
            if not loc:
                return ""
            inner = [f"entry {part + 1}" if isinstance(part, int) else str(part) for part in loc[1:]]
            return " ".join([flags.get(str(loc[0]), str(loc[0])), *inner])

        raise settings_error(exc, source=f"ftl {ctx.command_path.split(' ', 1)[-1]}", model=config_class,
                             key_name=key_name, fix="fix those options and run again") from None


def plain(value: Any) -> Any:
    """A result as JSON-ready data: dataclasses and models to dicts, paths to strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, BaseModel):
        return plain(value.model_dump())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def emit(result: Any, as_json: bool, show: Callable[[Any], None]) -> None:
    """Print ``result``: one JSON document on stdout with ``--json``, else ``show(result)`` for people."""
    if as_json:
        click.echo(json.dumps(plain(result)))
    else:
        show(result)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


_TRACKING = ("tracking_uri", "experiment", "no_track", "log_model")


def tracking_options(func: Callable) -> Callable:
    """--tracking-uri, --experiment, --no-track and --log-model: every stage is an MLflow run."""
    for decorator in reversed([
        click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store "
                                            "beside the runs: runs/mlflow.db, or <workdir>/mlflow.db for ftl run)."),
        click.option("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else ftl; the "
                                          "pipeline's name for ftl run)."),
        click.option("--no-track", is_flag=True, help="Log nothing to MLflow; the manifest is written as always."),
        click.option("--log-model", is_flag=True, help="Log the weights to MLflow too (not by default: they are "
                                                       "large, and the folder holds them)."),
    ]):
        func = decorator(func)
    return func


def pop_tracking(options: dict) -> dict:
    return {key: options.pop(key) for key in _TRACKING}


def open_tracker(tracking: dict, default_dir: Path = Path("runs"), experiment: str | None = None, *,
                 create: bool = True):
    """The tracker these options ask for; an unknown URI scheme is an error before anything runs.
    ``create=False`` for commands that only read runs."""
    from ftl import tracking as t

    if tracking.get("no_track"):
        return t.Tracker.open(None, enabled=False)
    uri = t.resolve_uri(tracking.get("tracking_uri"), default_dir)
    return t.Tracker.open(uri, tracking.get("experiment") or experiment, create=create)


def tracked_stage(stage: str, manifest_path: Path, tracking: dict):
    """Run a lone stage inside its MLflow run (see :meth:`ftl.tracking.Tracker.stage`)."""
    tracker = open_tracker(tracking)
    return tracker.stage(stage, manifest_path, log_model=bool(tracking.get("log_model")))


def report_run(run) -> None:
    from ftl.progress import console
    from ftl.tracking import redact

    if run.run_id and run.tracker.on:
        console.print(f"MLflow: run {run.run_id} in experiment {run.tracker.experiment!r} at "
                      f"{redact(run.tracker.uri)}", highlight=False, soft_wrap=True)


def workspace_options(func: Callable) -> Callable:
    """--subscription, --resource-group and --workspace: which Azure ML workspace (ftl.azure.workspace)."""
    for decorator in reversed([
        click.option("--subscription", help="Subscription id (else $AZURE_SUBSCRIPTION_ID, else .azureml/config.json)."),
        click.option("--resource-group", help="Resource group (else $AZURE_RESOURCE_GROUP, else the config file)."),
        click.option("--workspace", help="Workspace name (else $AZUREML_WORKSPACE_NAME, else the config file)."),
    ]):
        func = decorator(func)
    return func
