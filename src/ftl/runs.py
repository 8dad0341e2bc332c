"""``ftl runs``: list, compare and sync ftl runs, read from MLflow (not from ftl's own files).

- :func:`list_runs`: the runs of an experiment, newest first.
- :func:`compare`: runs side by side: the parameters that differ, the key metrics, and the loss
  and eval_loss curves overlaid (a pipeline's curves come from its nested finetune run), as a
  terminal table and an HTML report.
- :func:`sync`: mirror finished run folders from their manifests (see :mod:`ftl.tracking`).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from ftl import manifest
from ftl.errors import ConfigError, OutputExistsError
from ftl.tracking import TAG_PARENT, TAG_STAGE, TAG_UID, Tracker

REPORT_MARK = "<!-- written by ftl runs compare -->"
# Trainer bookkeeping that says nothing about the model.
_NOISE = ("epoch", "total_flos", "grad_norm", "learning_rate", "train_runtime", "eval_runtime")
_NOISE_SUFFIX = ("_per_second", "_runtime")


@dataclass
class RunView:
    run_id: str
    name: str
    stage: str
    status: str
    start: int
    params: dict[str, str]
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _require(tracker: Tracker) -> None:
    if not tracker.on:
        raise ConfigError(tracker.problem or "MLflow is not available", None,
                          "check --tracking-uri / $MLFLOW_TRACKING_URI")


def view(run) -> RunView:
    """An MLflow run as the comparison reads it."""
    return RunView(run.info.run_id, run.info.run_name or run.info.run_id[:8], run.data.tags.get(TAG_STAGE, "?"),
                   run.info.status, run.info.start_time or 0, dict(run.data.params), dict(run.data.metrics))


def list_runs(tracker: Tracker, *, limit: int = 50) -> list[RunView]:
    _require(tracker)
    found = tracker.client.search_runs([tracker.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    return [view(r) for r in found]


def resolve(tracker: Tracker, ids: list[str]) -> list[RunView]:
    """Runs by id (or a unique prefix of one, or a run name) in this experiment."""
    _require(tracker)
    every = tracker.client.search_runs([tracker.experiment_id], max_results=5000)
    views = []
    for wanted in ids:
        hits = [r for r in every if r.info.run_id == wanted] or \
               [r for r in every if r.info.run_id.startswith(wanted)] or \
               [r for r in every if r.info.run_name == wanted]
        if len(hits) != 1:
            what = "no run" if not hits else f"{len(hits)} runs"
            raise ConfigError(f"{what} match {wanted!r} in experiment {tracker.experiment!r}", None,
                              "give a run id from `ftl runs list` (a unique prefix will do)")
        views.append(view(hits[0]))
    return views


def experiment_runs(tracker: Tracker) -> list[RunView]:
    """What ``compare --experiment`` compares: its top-level runs (pipelines, sweep variants, lone stages)."""
    _require(tracker)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    ids = {r.info.run_id for r in runs}
    tops = [r for r in runs if r.data.tags.get(TAG_PARENT) not in ids]
    # A sweep's variants, not the sweep run itself, are what differ.
    variants = [r for r in runs if r.data.tags.get(TAG_STAGE) == "variant"]
    return [view(r) for r in (variants or tops) if r.data.tags.get(TAG_STAGE) != "sweep"]


def with_curves(tracker: Tracker, views: list[RunView]) -> list[RunView]:
    """Each run's loss and eval_loss history; a pipeline's come from its nested finetune run."""
    for item in views:
        source = item.run_id
        if "loss" not in item.metrics:
            children = tracker.client.search_runs(
                [tracker.experiment_id], f"tags.`{TAG_PARENT}` = '{item.run_id}' and tags.`{TAG_STAGE}` = 'finetune'")
            if not children and item.stage in ("pipeline", "variant"):
                children = _finetune_of(tracker, item.run_id)
            source = children[0].info.run_id if children else None
        for name in ("loss", "eval_loss"):
            if source:
                history = tracker.client.get_metric_history(source, name)
                if history:
                    item.curves[name] = sorted((m.step, m.value) for m in history)
    return views


def _finetune_of(tracker: Tracker, run_id: str):
    """A variant whose finetune was shared (skipped) names the run that made it."""
    shared = tracker.client.get_run(run_id).data.tags.get("ftl.reused.finetune")
    return [tracker.client.get_run(shared)] if shared else []


def differing_params(views: list[RunView]) -> list[str]:
    keys = sorted({k for v in views for k in v.params})
    return [k for k in keys if len({v.params.get(k) for v in views}) > 1]


def key_metrics(views: list[RunView]) -> list[str]:
    keys = sorted({k for v in views for k in v.metrics})
    return [k for k in keys if k not in _NOISE and not k.endswith(_NOISE_SUFFIX)]


def write_html(path: Path, views: list[RunView], *, title: str, force: bool = False) -> Path:
    """The comparison as one self-contained HTML file (plots inlined)."""
    path = Path(path)
    if path.exists() and REPORT_MARK not in path.read_text(errors="replace")[:200] and not force:
        raise OutputExistsError("file exists and is not an ftl comparison report", str(path),
                                "choose another --output, or pass --force")
    params, metrics = differing_params(views), key_metrics(views)
    head = "".join(f"<th>{html.escape(v.name)}<br><small>{v.run_id[:8]}</small></th>" for v in views)

    def table(title_: str, keys: list[str], get) -> str:
        rows = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(get(v, k))}</td>" for v in views)
                       + "</tr>" for k in keys)
        return f"<h2>{title_}</h2><table><tr><th></th>{head}</tr>{rows}</table>" if keys else \
            f"<h2>{title_}</h2><p>none differ</p>"

    body = [REPORT_MARK, f"<h1>{html.escape(title)}</h1>",
            table("Parameters that differ", params, lambda v, k: v.params.get(k, "—")),
            table("Metrics", metrics, lambda v, k: _fmt(v.metrics.get(k)))]
    plot = _curves_png(views)
    if plot:
        body.append(f'<h2>Loss curves</h2><img alt="loss and eval_loss per step" src="data:image/png;base64,{plot}">')
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return path


def _curves_png(views: list[RunView]) -> str | None:
    if not any(v.curves for v in views):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, item in enumerate(views):
        colour = f"C{index % 10}"
        for name, style in (("loss", "-"), ("eval_loss", "--")):
            points = item.curves.get(name)
            if points:
                axis.plot([s for s, _ in points], [v for _, v in points], style, color=colour,
                          label=f"{item.name} {name}", marker="o" if name == "eval_loss" else None, markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- sync -------------------------------------------------------------------------------------------

PIPELINE_STAGES = (("distill", "distill/qa.manifest.json"), ("finetune", "finetune/manifest.json"),
                   ("export", "export/manifest.json"), ("generate", "generate/manifest.json"),
                   ("eval", "eval/manifest.json"))


@dataclass
class Synced:
    path: Path
    run_id: str | None
    created: bool


def manifests_in(folder: Path) -> tuple[list[Path], bool]:
    """(manifests to sync, whether the folder is a pipeline's work folder). A stage folder, a
    distilled file or its manifest, or a pipeline work folder."""
    folder = Path(folder)
    if folder.is_file():
        candidate = folder if folder.name.endswith("manifest.json") else \
            folder.with_name(folder.stem + ".manifest.json")
        found = [candidate] if candidate.is_file() else []
    elif (folder / manifest.MANIFEST).is_file():
        found = [folder / manifest.MANIFEST]
    else:
        found = [folder / rel for _, rel in PIPELINE_STAGES if (folder / rel).is_file()]
        if found:
            return found, True
    if not found or not manifest.is_ftl(manifest.read_file(found[0])):
        raise ConfigError("no ftl result here", str(folder),
                          "give a stage's output folder (with manifest.json) or a pipeline's work folder")
    return found, False


def sync(tracker: Tracker, folders: list[Path], *, log_model: bool = False) -> list[Synced]:
    """Mirror finished results into MLflow; a result already there is left as it is (no duplicates)."""
    _require(tracker)
    done: list[Synced] = []
    for folder in folders:
        found, is_pipeline = manifests_in(folder)
        parent = None
        if is_pipeline:
            parent = _pipeline_run(tracker, Path(folder), found)
        for path in found:
            run_id, created = tracker.sync(path, parent=parent, log_model=log_model)
            done.append(Synced(path, run_id, created))
    return done


def _pipeline_run(tracker: Tracker, work: Path, found: list[Path]) -> str | None:
    """The parent run of a synced pipeline folder, found again by a uid made from its stages' uids."""
    from ftl.tracking import pipeline_uid

    if not tracker.on:
        return None
    uid = pipeline_uid(found)
    hits = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_UID}` = '{uid}'", max_results=1)
    if hits:
        return hits[0].info.run_id
    run_id = tracker.start(work.name, tags={TAG_STAGE: "pipeline", TAG_UID: uid, "ftl.folder": str(work.resolve())})
    summary = work / "pipeline_summary.json"
    if summary.is_file():
        tracker.log_files(run_id, [summary])
    from ftl.tracking import summary_metrics

    tracker.log(run_id, metrics=summary_metrics({p.parent.name if p.name == manifest.MANIFEST else "distill": p
                                                 for p in found}))
    tracker.end(run_id)
    return run_id
