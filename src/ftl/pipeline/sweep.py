"""``ftl sweep``: one pipeline, a grid of settings, run one variant after another.

The grid comes from ``--set stage.key=v1,v2`` and/or a ``matrix:`` block in the pipeline YAML
(``finetune.r: [8, 16]``). The first combination is the control. A stage that no swept key
touches, with nothing upstream of it swept, has the same inputs in every variant: it writes to
the pipeline's own work folder, so it runs once and the other variants find it finished (the
fingerprint check every stage already makes). Each variant writes the rest under
``<workdir>/sweep/<variant>/``. In MLflow the sweep is a run, each variant a child run, and each
stage that ran a run under its variant. The sweep ends with the comparison, ranked by a metric
(default: the exported model's answer perplexity from the eval stage), in the terminal, in
``<workdir>/sweep/comparison.html`` and in ``sweep_summary.json``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftl.errors import ConfigError, FtlError
from ftl.pipeline.runner import STAGES, Stages, _apply_override, load_pipeline, read_pipeline, run, stage_manifests
from ftl.progress import console
from ftl.tracking import TAG_STAGE, Tracker, scrub, summary_metrics

DEFAULT_RANK = ("eval.exported.perplexity_answer", "finetune.best_eval_loss", "finetune.final_loss")
_HIGHER_IS_BETTER = ("rouge", "top1", "exact_match", "tokens_per_s", "accuracy")


@dataclass
class Variant:
    index: int
    values: dict[str, object]
    name: str
    status: str = "planned"
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def control(self) -> bool:
        return self.index == 0


def parse_sets(items: list[str] | tuple[str, ...]) -> dict[str, list]:
    """``finetune.r=8,16`` → {"finetune.r": [8, 16]}; commas inside [...] or {...} do not split."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value[,value…]", None, "e.g. --set finetune.r=8,16")
        key, text = item.split("=", 1)
        try:
            values = [yaml.safe_load(part) for part in _split(text) if part.strip()]
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: a value does not parse: {getattr(exc, 'problem', exc)}", None,
                              "values are YAML, comma-separated: --set finetune.target_modules=[q_proj,v_proj],[o_proj]") \
                from None
        if not values:
            raise ConfigError(f"--set {key}= gives no values: the grid would be empty", None,
                              f"e.g. --set {key}=8,16")
        grid[key.strip()] = values
    return grid


def _split(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def check_keys(grid: dict[str, list], source: str) -> None:
    """Every key names a stage setting (with a did-you-mean), before anything runs."""
    fields = {name: Stages.model_fields[attr].annotation for attr, name in
              (("import_", "import"), ("distill", "distill"), ("finetune", "finetune"), ("export", "export"),
               ("generate", "generate"), ("eval", "eval"))}
    known = []
    for stage, annotation in fields.items():
        model = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
        known += [f"{stage}.{f}" for f in model.model_fields if f not in getattr(model, "filled", ())] if model else []
    for key, values in grid.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown sweep key {key!r}{hint}", source,
                              "sweep a stage setting as stage.key, e.g. finetune.learning_rate")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep key {key!r} has no values: the grid would be empty", source,
                              "give a list, e.g. finetune.r: [8, 16]")


def plan_variants(grid: dict[str, list]) -> list[Variant]:
    keys = list(grid)
    variants = []
    for index, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        slug = "-".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in values.items())
        variants.append(Variant(index, values, f"v{index}-{re.sub(r'[^A-Za-z0-9_.=+-]', '_', slug)[:80]}"))
    return variants


def _short(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def shared_stages(grid: dict[str, list]) -> list[str]:
    """Stages with the same inputs in every variant: none of their keys, nor any upstream, is swept."""
    touched = {key.split(".", 1)[0] for key in grid}
    shared = []
    for stage in STAGES:
        if stage in touched:
            break
        shared.append(stage)
    return shared


def sweep(path: Path, sets: list[str] | tuple[str, ...] = (), *, overrides: list[str] | tuple[str, ...] = (),
          rank_by: str | None = None, force: bool = False, tracker: Tracker | None = None,
          log_model: bool = False) -> list[Variant]:
    """Run every variant of the grid, then compare them. Returns the variants, ranked."""
    raw = read_pipeline(path)
    for item in overrides:  # before the variants' folders are derived from workdir
        _apply_override(raw, item)
    matrix = raw.pop("matrix", None) or {}
    if not isinstance(matrix, dict):
        raise ConfigError("matrix: must map stage.key to a list of values", str(path), "e.g. finetune.r: [8, 16]")
    grid = {**{str(k): v for k, v in matrix.items()}, **parse_sets(sets)}
    if not grid:
        raise ConfigError("nothing to sweep: no --set and no matrix: block", str(path),
                          "e.g. ftl sweep PIPELINE --set finetune.r=8,16")
    check_keys(grid, str(path))
    variants = plan_variants(grid)
    base = Path(raw["workdir"])
    shared = shared_stages(grid)
    stage_dirs = {stage: base for stage in shared}
    plans = []
    for variant in variants:  # every variant is built and validated before the first one runs
        raw_variant = {**raw, "workdir": str(base / "sweep" / variant.name)}
        items = [f"{k}={json.dumps(v)}" for k, v in variant.values.items()]
        try:
            plans.append(load_pipeline(path, items, raw=raw_variant, stage_dirs=stage_dirs))
        except ConfigError as exc:
            raise ConfigError(f"variant {variant.name}: {exc.what}", exc.where, exc.fix) from None
    tracker = tracker or Tracker.open(None, enabled=False)
    sweep_run = tracker.start(f"sweep {raw['name']}", tags={TAG_STAGE: "sweep", "ftl.pipeline": str(path)})
    tracker.log(sweep_run, params={"grid": json.dumps(grid), "shared_stages": ",".join(shared) or "none",
                                   "variants": len(variants)})
    console.print(f"sweep of {len(variants)} variants; shared stages (run once): {', '.join(shared) or 'none'}")
    status, ended = "FAILED", False
    try:
        for variant, plan in zip(variants, plans):
            console.rule(f"[bold]variant {variant.index + 1}/{len(variants)}: {variant.name}"
                         + (" (control)" if variant.control else ""))
            ids: dict = {}
            finished: list = []
            try:
                run(plan, force=force, tracker=tracker, parent=sweep_run, run_name=variant.name,
                    log_model=log_model, kind="variant", run_ids=ids, finished=finished,
                    extra_tags={"ftl.control": "1" if variant.control else "0", "ftl.sweep": raw["name"]},
                    extra_params={f"sweep.{k}": v for k, v in variant.values.items()})
                variant.status = "ran"
            except FtlError as exc:
                variant.status, variant.error = "failed", exc.one_line()
                console.print(f"[red]variant {variant.name} failed:[/] {exc.one_line()}", highlight=False)
            except BaseException as exc:  # Ctrl-C, or an error ftl did not foresee: the sweep stops here
                variant.status, variant.error = "stopped", f"{type(exc).__name__}: {scrub(str(exc))[:300]}"
                raise
            finally:
                variant.run_id = ids.get("pipeline")
                done = {r.stage for r in finished}  # a failed variant's later folders may hold old results
                variant.metrics = summary_metrics({s: p for s, p in stage_manifests(plan).items() if s in done})
        status = "FINISHED" if all(v.status == "ran" for v in variants) else "FAILED"
        ended = True
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ranked = rank(variants, rank_by)
        out = base / "sweep"
        try:
            _conclude(tracker, sweep_run, ranked, out, grid, shared, rank_by, raw["name"])
        except Exception as exc:  # noqa: BLE001
            if ended:
                raise
            # The error that stopped the sweep is the one to see; this one only costs the summary.
            console.print(f"[yellow]warning:[/] the sweep's summary was not finished: {type(exc).__name__}: "
                          f"{scrub(str(exc).strip())[:200]}", highlight=False)
        finally:  # whatever the summary met, the sweep's run ends with the sweep's own status
            tracker.end(sweep_run, status)
        show(ranked)
    failed = [v for v in variants if v.status == "failed"]
    if failed:
        raise FtlError(f"{len(failed)} of {len(variants)} variants failed: {failed[0].error}", str(out),
                       "the others are in the comparison; fix the cause and run the sweep again (finished "
                       "stages are skipped)")
    return [v for v, _, _ in ranked]


def _conclude(tracker: Tracker, sweep_run: str | None, ranked, out: Path, grid: dict, shared: list[str],
              rank_by: str | None, name: str) -> None:
    """The comparison: sweep_summary.json, comparison.html, and both plus the best value in MLflow."""
    out.mkdir(parents=True, exist_ok=True)
    _write_summary(out / "sweep_summary.json", ranked, grid, shared, rank_by)
    report = _report(tracker, ranked, out / "comparison.html", name)
    tracker.log_files(sweep_run, [p for p in (out / "sweep_summary.json", report) if p and p.is_file()])
    if ranked and ranked[0][1] is not None:
        tracker.log(sweep_run, metrics={"best." + ranked[0][2]: ranked[0][1]}, tags={"ftl.best": ranked[0][0].name})


def azure_sweep(path: Path, sets: list[str] | tuple[str, ...] = (), *, overrides: list[str] | tuple[str, ...] = (),
                compute: str, dry_run: bool = False, max_concurrent: int = 4, workspace=None, ml=None,
                wheel: Path | None = None):
    """The grid as one Azure ML sweep job. Each trial runs the pipeline's fine-tune as the job ships
    it (``ftl finetune --config finetune.json``) with each swept setting as a ``KEY=VALUE`` argument,
    its value ``${{search_space.<key>}}``: the validated value, typed as JSON (a bool or a list as
    its JSON text, see :func:`ftl.finetune.config.sweep_choice`). The objective is eval_loss (with
    validation rows) or the training loss, which ftl logs to each trial's own run."""
    from ftl.azure import jobs
    from ftl.finetune.config import PATHS, settings, sweep_choice

    raw = read_pipeline(path)
    for item in overrides:
        _apply_override(raw, item)
    grid = {**{str(k): v for k, v in (raw.pop("matrix", None) or {}).items()}, **parse_sets(sets)}
    if not grid:
        raise ConfigError("nothing to sweep: no --set and no matrix: block", str(path),
                          "e.g. ftl sweep PIPELINE --set finetune.r=8,16 --target azureml")
    check_keys(grid, str(path))
    others = [k for k in grid if not k.startswith("finetune.")]
    if others:
        raise ConfigError(f"on Azure ML a trial is one ftl finetune, so only finetune.* can be swept, not {others[0]}",
                          str(path), "sweep the other stages locally (ftl sweep without --target)")
    paths = [k for k in grid if k.split(".", 1)[1] in PATHS]
    if paths:  # the job's inputs are uploaded once, as data assets: a trial cannot pick another
        raise ConfigError(f"on Azure ML every trial reads the same uploaded inputs, so {paths[0]} cannot be swept",
                          str(path), "sweep it locally (ftl sweep without --target), or run one sweep per file")
    plan = load_pipeline(path, raw=raw)
    if not (plan.model_dir / "config.json").is_file():
        raise ConfigError("the pipeline's model is not imported yet", str(plan.model_dir),
                          f"run `ftl models import {plan.spec.stages.import_.source} --name {plan.model_dir.name}` "
                          f"(or `ftl run {path}`) first")
    config = plan.finetune.model_copy(update={"output": Path(raw["workdir"]) / "sweep"})
    missing = [f for f in config.data_files if not Path(f).is_file()]
    if missing:
        raise ConfigError("the fine-tune's data is not here yet", str(missing[0]),
                          "run the pipeline's earlier stages first (ftl run … --dry-run shows them)")
    trials = _trial_configs(path, raw, grid)
    # Each choice is the setting as a validated trial has it (1e-4 a float, [q_proj] a list), in the grid's order.
    space = {key.split(".", 1)[1]: [sweep_choice(settings(next(c for v, c in trials if v.values[key] is value))[
        key.split(".", 1)[1]]) for value in values] for key, values in grid.items()}
    spec = jobs.SweepSpec(space, primary_metric="eval_loss" if config.validates else "loss",
                          max_concurrent=max_concurrent)
    prepared = jobs.prepare(config, [f"{name}=${{{{search_space.{name}}}}}" for name in space], compute=compute,
                            experiment=raw["name"], workspace=workspace, wheel=wheel, sweep=spec)
    if dry_run:
        return prepared, None
    return prepared, jobs.submit(ml, prepared, wait=False, compute=compute)


def _trial_configs(path: Path, raw: dict, grid: dict[str, list]) -> list[tuple[Variant, object]]:
    """Every combination's fine-tune config, built and checked before anything is written or sent."""
    trials = []
    for variant in plan_variants(grid):
        items = [f"{k}={json.dumps(v)}" for k, v in variant.values.items()]
        try:
            trials.append((variant, load_pipeline(path, items, raw=raw).finetune))
        except ConfigError as exc:
            raise ConfigError(f"trial {variant.name}: {exc.what}", exc.where, exc.fix) from None
    return trials


def rank(variants: list[Variant], rank_by: str | None) -> list[tuple[Variant, float | None, str]]:
    """(variant, its value, the metric) best first; variants without the metric last."""
    metric, direction = _metric(variants, rank_by)
    higher = direction == "max"

    def key(v: Variant):
        value = v.metrics.get(metric) if v.status == "ran" else None  # a failed variant's files may be old
        return (value is None, -(value or 0) if higher else (value or 0))

    return [(v, v.metrics.get(metric) if v.status == "ran" else None, metric) for v in sorted(variants, key=key)]


def _metric(variants: list[Variant], rank_by: str | None) -> tuple[str, str]:
    if rank_by:
        name, _, direction = rank_by.partition(":")
        if direction not in ("", "min", "max"):
            raise ConfigError(f"--rank-by {rank_by!r}: the direction is min or max", None,
                              "e.g. --rank-by eval.exported.rougeL:max")
        return name, direction or ("max" if any(h in name for h in _HIGHER_IS_BETTER) else "min")
    for name in DEFAULT_RANK:
        if any(name in v.metrics for v in variants):
            return name, "min"
    return DEFAULT_RANK[0], "min"


def check_rank_by(rank_by: str | None) -> None:
    if rank_by:
        _metric([], rank_by)


def show(ranked: list[tuple[Variant, float | None, str]]) -> None:
    from rich.table import Table

    if not ranked:
        return
    metric = ranked[0][2]
    swept = list(ranked[0][0].values)
    extra = [k for k in ("finetune.final_loss", "finetune.best_eval_loss", "export.size_mb",
                         "eval.exported.ppl_ratio", "eval.exported.rougeL") if k != metric and
             any(k in v.metrics for v, _, _ in ranked)]
    table = Table("rank", "variant", *swept, metric, *extra, "status", title="sweep")
    for position, (variant, value, _) in enumerate(ranked, 1):
        table.add_row(str(position), variant.name + (" (control)" if variant.control else ""),
                      *(_short(variant.values[k]) for k in swept), _fmt(value),
                      *(_fmt(variant.metrics.get(k)) for k in extra), variant.status)
    console.print(table)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_summary(path: Path, ranked, grid: dict, shared: list[str], rank_by: str | None) -> None:
    path.write_text(json.dumps({
        "grid": grid, "shared_stages": shared, "rank_by": ranked[0][2] if ranked else rank_by,
        "variants": [{"rank": i, "name": v.name, "control": v.control, "values": v.values, "status": v.status,
                      "error": v.error, "mlflow_run_id": v.run_id, "value": value, "metrics": v.metrics}
                     for i, (v, value, _) in enumerate(ranked, 1)],
    }, indent=2, default=str) + "\n")


def _report(tracker: Tracker, ranked, path: Path, name: str) -> Path | None:
    """The comparison report, from MLflow when it is on (the curves come from the finetune runs),
    else from the manifests."""
    from ftl.runs import RunView, view, with_curves, write_html

    views, tracked = [], []
    for variant, _, _ in ranked:
        found = tracker._get(variant.run_id) if tracker.on and variant.run_id else None
        if found is not None:
            views.append(view(found))
            tracked.append(views[-1])
        else:  # not tracked, or MLflow did not answer: the manifests' own figures
            views.append(RunView(variant.name, variant.name, "variant", variant.status, 0,
                                 {k: _short(v) for k, v in variant.values.items()}, dict(variant.metrics)))
    try:
        with_curves(tracker, tracked)
    except Exception as exc:  # noqa: BLE001 — a transient MLflow error costs the plot, not the sweep
        tracker._fail(exc, "the comparison has no loss curves")
    try:
        return write_html(path, views, title=f"ftl sweep {name}", force=True)
    except OSError as exc:
        console.print(f"[yellow]warning:[/] comparison report not written: {exc}")
        return None
