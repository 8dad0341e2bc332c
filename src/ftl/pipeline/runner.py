"""A pipeline is a YAML file naming a work folder and the settings of each stage.

Stages chain by path: import writes ``models/<name>``, finetune reads it and writes
``<workdir>/finetune``, export reads that and writes ``<workdir>/export``, generate answers the
sample questions from it. Each stage skips itself when its manifest says it finished with the
same inputs (the fingerprint), and an interrupted finetune resumes from its last checkpoint.
Relative paths in the YAML are relative to the current directory.
"""

from __future__ import annotations

import copy
import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, create_model

from ftl import manifest
from ftl.config import StrictModel, settings_error
from ftl.distill.config import DistillConfig
from ftl.errors import ConfigError, DataError, FtlError, OutputExistsError
from ftl.eval.config import EvalConfig
from ftl.export.config import ExportConfig
from ftl.finetune.config import FinetuneConfig
from ftl.lineage import ADAPTER, QSCALE
from ftl.progress import console, run_with_progress, task_progress
from ftl.tracking import TAG_STAGE, TAG_UID, Tracker, flat_params, pipeline_uid, redact, summary_metrics
from rich.table import Table

STAGES = ("import", "distill", "finetune", "export", "generate", "eval")
# The models an eval stage compares by default, by stage name.
EVAL_MODELS = ["export", "finetune", "base"]


class DistillPending(FtlError):
    """Some seeds failed past their retries; the pipeline stops before training on part of the data."""


class ImportStage(StrictModel):
    source: str = Field("smollm2-135m", description="A built-in name, a .gguf file, an HF folder or a Hub id")
    name: str | None = Field(None, description="Folder name under the models dir (default: from the source)")


class GenerateStage(StrictModel):
    questions: list[str] | Path = Field(description="A list, or a text/JSONL file of questions")
    question_field: str = Field("Question", description="Field with the question in a JSONL file")
    max_new_tokens: int = Field(128, gt=0, description="Tokens generated per answer")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")


class AzureTarget(StrictModel):
    """Where a ``target: azureml`` finetune stage runs (the flags of ``ftl finetune --target azureml``)."""

    compute: str = Field(description="The compute cluster (ftl azure check lists them)")
    instance_count: int = Field(1, ge=1, description="Nodes")
    gpus_per_node: int = Field(1, ge=1, description="Processes per node (torchrun, DDP) when nodes × GPUs > 1")
    image: str | None = Field(None, description="The environment's base image (default: ftl's ACPT PyTorch GPU image)")
    experiment: str | None = Field(None, description="The Azure ML experiment (default: the pipeline's name)")
    queue_timeout: float = Field(240, gt=0, description="Minutes queued before giving up waiting")
    run_timeout: float = Field(2880, gt=0, description="Minutes running before giving up waiting")
    subscription: str | None = Field(None, description="Else $AZURE_SUBSCRIPTION_ID, else .azureml/config.json")
    resource_group: str | None = Field(None, description="Else $AZURE_RESOURCE_GROUP, else the config file")
    workspace: str | None = Field(None, description="Else $AZUREML_WORKSPACE_NAME, else the config file")


def _stage_model(config: type[StrictModel], filled: tuple[str, ...], **overrides) -> type[StrictModel]:
    """A stage block: the stage's own config (its fields, defaults and validators), except the
    paths the pipeline fills in by chaining, which the block may not set (see :func:`_build`)."""
    fields = {name: (config.model_fields[name].annotation | None, None) for name in filled}
    model = create_model(f"{config.__name__.removesuffix('Config')}Stage", __base__=config, **fields, **overrides)
    model.filled = filled
    return model


DistillStage = _stage_model(DistillConfig, ("output",))
# data may be left out when a distil stage supplies it; FinetuneConfig checks the joined list.
FinetuneStage = _stage_model(FinetuneConfig, ("model", "output", "force"),
                             data=(list[Path] | None, Field(None, description=FinetuneConfig.model_fields[
                                 "data"].description)),
                             target=(Literal["local", "azureml"], Field("local", description=(
                                 "local: train here; azureml: an Azure ML job (the azureml: block), whose output "
                                 "is downloaded into the stage's folder"))),
                             azureml=(AzureTarget | None, Field(None, description="With target: azureml")))
ExportStage = _stage_model(ExportConfig, ("adapter", "model", "output", "force"))
EvalStage = _stage_model(EvalConfig, ("output", "force"), models=(list[str], Field(
    default_factory=lambda: list(EVAL_MODELS), description="export, finetune, base (the stages' models), or "
                                                           "onnx:PATH / torch:PATH")))


class Stages(StrictModel):
    import_: ImportStage = Field(default_factory=ImportStage, alias="import")
    distill: DistillStage | None = None
    finetune: FinetuneStage
    export: ExportStage = Field(default_factory=ExportStage)
    generate: GenerateStage | None = None
    eval: EvalStage | None = None


class PipelineSpec(StrictModel):
    name: str
    workdir: Path
    models_dir: Path | None = Field(None, description="Default: ./models or $FTL_MODELS_DIR, as for ftl models")
    stages: Stages


@dataclass
class StageReport:
    stage: str
    status: str
    seconds: float
    detail: str
    output: str = ""


@dataclass
class PipelinePlan:
    """Every stage's own config, built and checked before anything runs."""

    spec: PipelineSpec
    source: str
    work: Path
    models_dir: Path
    model_dir: Path
    distill: DistillConfig | None
    finetune: FinetuneConfig
    export: ExportConfig
    generate: GenerateStage | None
    eval: EvalConfig | None
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    azure: AzureTarget | None = None  # the finetune stage runs as an Azure ML job

    def folder(self, stage: str) -> Path:
        """The work folder a stage writes under: the pipeline's, or a sweep variant's own."""
        return self.stage_dirs.get(stage, self.work)


def read_pipeline(path: Path) -> dict:
    """The pipeline YAML as a mapping, with name and workdir filled in."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where, "fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline must be a YAML mapping", str(path), "see pipelines/quickstart.yaml")
    raw.setdefault("name", Path(path).stem)
    raw.setdefault("workdir", f"runs/{raw['name']}")
    return raw


def load_pipeline(path: Path, overrides: tuple[str, ...] | list[str] = (), *, raw: dict | None = None,
                  stage_dirs: dict[str, Path] | None = None) -> PipelinePlan:
    """Read, override, validate every stage block and build every stage's config, or raise one
    ConfigError that lists every problem by its YAML key."""
    raw = copy.deepcopy(raw) if raw is not None else read_pipeline(path)
    if "matrix" in raw:
        raise ConfigError("this pipeline has a matrix: block", str(path),
                          f"run it with `ftl sweep {path}`, or remove the block")
    for item in overrides:
        _apply_override(raw, item)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise settings_error(exc, source=str(path), model=PipelineSpec,
                             fix="see pipelines/quickstart.yaml for the keys each stage takes") from None
    return _build(spec, str(path), stage_dirs or {})


def _build(spec: PipelineSpec, source: str, stage_dirs: dict[str, Path]) -> PipelinePlan:
    from ftl.models import default_models_dir

    work = Path(spec.workdir)
    stages = spec.stages

    def under(stage: str) -> Path:
        return stage_dirs.get(stage, work)

    models_dir = spec.models_dir or default_models_dir()
    model_dir = models_dir / (stages.import_.name or stages.import_.source)
    built, problems = {}, []
    for name in ("distill", "finetune", "export", "eval"):
        block = getattr(stages, name)
        for key in sorted(set(getattr(block, "filled", ())) & (block.model_fields_set if block else set())):
            problems.append(f"stages.{name}.{key}: set by the pipeline from workdir and the stage before, not here")

    def make(name: str, config: type, values: dict):
        try:
            built[name] = config(**values)
        except ValidationError as exc:
            problems.append(settings_error(exc, source=source, key_name=lambda loc: ".".join(
                ["stages", name, *map(str, loc)])).what)

    if stages.distill is not None:
        # The distilled Q/A is trained on after the finetune stage's own data files.
        make("distill", DistillConfig, {"model": str(model_dir), **_set(stages.distill),
                                        "output": under("distill") / "distill" / "qa.jsonl"})
    finetune = _set(stages.finetune)
    target, azure = finetune.pop("target", "local"), stages.finetune.azureml
    finetune.pop("azureml", None)
    if target == "azureml" and azure is None:
        problems.append("stages.finetune.azureml: target: azureml needs an azureml: block with at least compute")
    elif target != "azureml" and azure is not None:
        problems.append("stages.finetune.azureml: set target: azureml to use it, or remove the block")
    if "distill" in built:
        own = finetune.get("data") or []
        finetune["data"] = (own if isinstance(own, list) else [own]) + [built["distill"].output]
    make("finetune", FinetuneConfig, {**finetune, "model": str(model_dir), "output": under("finetune") / "finetune"})
    export = {**_set(stages.export), "adapter": under("finetune") / "finetune", "output": under("export") / "export"}
    if target == "azureml":
        export["model"] = str(model_dir)  # the job's manifest names the base by the path it had inside the job
    make("export", ExportConfig, export)
    if stages.eval is not None:
        named = {"export": f"onnx:{under('export') / 'export'}", "finetune": f"torch:{under('finetune') / 'finetune'}",
                 "base": f"torch:{model_dir}"}
        settings = stages.eval.model_dump(exclude_unset=True)
        settings["models"] = [named.get(m, m) for m in stages.eval.models]
        for model in stages.eval.models:
            if model not in named and ":" not in model:
                close = difflib.get_close_matches(model, list(named), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"stages.eval.models: unknown model {model!r}{hint}; use export, finetune, base, "
                                "onnx:PATH or torch:PATH")
        make("eval", EvalConfig, {**settings, "output": under("eval") / "eval"})
    if problems:
        raise ConfigError("; ".join(problems), source, "see pipelines/quickstart.yaml for the keys each stage takes")
    return PipelinePlan(spec, source, work, models_dir, model_dir, built.get("distill"), built["finetune"],
                        built["export"], stages.generate, built.get("eval"), dict(stage_dirs),
                        azure if target == "azureml" else None)


def _set(block) -> dict:
    """Only the keys the YAML set: the stage config's own defaults apply to the rest."""
    return block.model_dump(exclude_unset=True, by_alias=False)


def check(plan: PipelinePlan) -> list[StageReport]:
    """Each stage's own checks, before anything runs: data files line by line, templates, seeds,
    the eval set and the generate questions. Returns one 'planned' report per stage."""
    from ftl.distill.seeds import load_seeds
    from ftl.distill.stage import build_messages
    from ftl.chat import check_text_template
    from ftl.eval.models import check_spec
    from ftl.eval.stage import load_test_set

    reports = [StageReport("import", "planned", 0.0, f"{plan.spec.stages.import_.source} → {plan.model_dir}",
                           str(plan.model_dir))]
    distilled = None
    if plan.distill:
        seeds = load_seeds(plan.distill)
        build_messages(seeds[0], plan.distill)  # a wrong template placeholder fails here, not mid-run
        distilled = plan.distill.output
        reports.append(StageReport("distill", "planned", 0.0, f"{len(seeds)} seeds valid", str(distilled)))
    if plan.finetune.text_template:
        try:
            check_text_template(plan.finetune.text_template, plan.finetune.question_field,
                                plan.finetune.answer_field)
        except ConfigError as exc:  # name the YAML key, not the flag
            raise ConfigError(exc.what.replace("--text-template", "stages.finetune.text_template"), plan.source,
                              exc.fix) from None
    rows = load_rows_safely(plan.finetune.model_copy(
        update={"data": [f for f in plan.finetune.data_files if f != distilled]}))
    where = ""
    if plan.azure:
        if plan.finetune.method == "qscale" and plan.azure.instance_count * plan.azure.gpus_per_node > 1:
            raise ConfigError("stages.finetune.method qscale trains in one process", plan.source,
                              "use lora or qlora for a distributed job, or one GPU")
        where = f", on Azure ML ({plan.azure.compute}, {plan.azure.instance_count}×{plan.azure.gpus_per_node})"
    reports.append(StageReport("finetune", "planned", 0.0, f"{len(rows)} rows valid"
                               + (" + the distilled ones" if distilled else "") + where, str(plan.finetune.output)))
    if plan.finetune.method == "qscale" and not plan.export.exact_grid:
        raise ConfigError("stages.finetune.method qscale trains an int4 grid in blocks of 32; this export would "
                          "re-quantise it", plan.source, "leave stages.export.grid and block_size at their defaults")
    what = ("the qscale grid written exactly (og builder + ftl.export.exact)" if plan.finetune.method == "qscale"
            else "MergeAdapterWeights → og builder int4" + (", put back on the exact grid" if plan.export.exact_grid
                                                           else ""))
    reports.append(StageReport("export", "planned", 0.0, what, str(plan.export.output)))
    if plan.generate:
        questions = _questions(plan.generate)
        reports.append(StageReport("generate", "planned", 0.0, f"{len(questions)} questions",
                                   str(plan.folder("generate") / "generate")))
    if plan.eval:
        samples = load_test_set(plan.eval)
        produced = {f"onnx:{plan.export.output}", f"torch:{plan.finetune.output}", f"torch:{plan.model_dir}"}
        for spec in plan.eval.models:
            if spec not in produced:  # a model from outside the pipeline must exist now
                check_spec(spec)
        reports.append(StageReport("eval", "planned", 0.0, f"{len(samples)} samples, "
                                   f"{len(plan.eval.models)} models", str(plan.eval.output)))
    return reports


def write_workflows(plan: PipelinePlan, reports: list[StageReport]) -> None:
    """A dry run writes the exact Olive workflows the finetune and export stages will run."""
    from ftl.export.stage import olive_workflow as export_workflow
    from ftl.finetune.stage import finetune, olive_workflow, steps_for
    from ftl import olive

    by_stage = {r.stage: r for r in reports}
    path = plan.work / "finetune.olive_config.json"
    if (plan.model_dir / "config.json").is_file() and all(Path(f).is_file() for f in plan.finetune.data_files):
        finetune(plan.finetune, save_config=path)
    else:  # before the import or the distil has run: the row count and length limit from the settings
        rows = len(load_rows_safely(plan.finetune))
        steps, logging_steps = steps_for(plan.finetune, rows)
        olive.save_config(olive_workflow(plan.finetune, plan.finetune.output, model_dir=plan.model_dir,
                                         max_seq_len=plan.finetune.max_seq_len, steps=steps,
                                         logging_steps=logging_steps), path)
        olive.package_config(plan.work, path.with_suffix(".package_config.json"))
    by_stage["finetune"].detail += f"; Olive workflow → {path}"
    if plan.azure:
        by_stage["finetune"].detail += "; " + _azure_dry_run(plan)
    path = plan.work / "export.olive_config.json"
    qscale = plan.finetune.method == "qscale"
    olive.save_config(export_workflow(plan.export, plan.export.output, model_dir=plan.model_dir,
                                      adapter=None if qscale else plan.finetune.output / ADAPTER,
                                      qscale=plan.finetune.output / QSCALE if qscale else None), path)
    # ftl's own Olive passes are in the package config: olive run --config X --package-config Y
    olive.package_config(plan.work, path.with_suffix(".package_config.json"))
    by_stage["export"].detail += f"; Olive workflow → {path}"


def _azure_dry_run(plan: PipelinePlan) -> str:
    """The job a target: azureml stage would submit, written beside its folder (as ftl finetune --dry-run)."""
    from ftl.azure import jobs
    from ftl.azure.workspace import resolve_workspace

    if not (plan.model_dir / "config.json").is_file() or not all(Path(f).is_file() for f in plan.finetune.data_files):
        return "its Azure ML job is written once the model is imported and the data is there"
    target = plan.azure
    prepared = jobs.prepare(plan.finetune, **_job_placement(plan),
                            workspace=resolve_workspace(target.subscription, target.resource_group, target.workspace,
                                                        required=False))
    return f"Azure ML job → {prepared.job_yml}"


def _job_placement(plan: PipelinePlan) -> dict:
    from ftl.azure.jobs import DEFAULT_IMAGE

    target = plan.azure
    return {"compute": target.compute, "instance_count": target.instance_count,
            "gpus_per_node": target.gpus_per_node, "image": target.image or DEFAULT_IMAGE,
            "experiment": target.experiment or plan.spec.name}


def load_rows_safely(config: FinetuneConfig) -> list:
    from ftl.finetune.stage import load_training_rows

    existing = [f for f in config.data_files if Path(f).is_file()]
    return load_training_rows(config.model_copy(update={"data": existing})) if existing else []


def stage_manifests(plan: PipelinePlan) -> dict[str, Path]:
    """Where each stage of this plan keeps its manifest."""
    from ftl.distill.stage import manifest_path

    found = {"distill": manifest_path(plan.distill.output)} if plan.distill else {}
    found.update(finetune=plan.finetune.output / manifest.MANIFEST, export=plan.export.output / manifest.MANIFEST)
    if plan.generate:
        found["generate"] = plan.folder("generate") / "generate" / manifest.MANIFEST
    if plan.eval:
        found["eval"] = plan.eval.output / manifest.MANIFEST
    return found


def run(plan: PipelinePlan, *, force: bool = False, dry_run: bool = False, tracker: Tracker | None = None,
        parent: str | None = None, run_name: str | None = None, log_model: bool = False, kind: str = "pipeline",
        extra_tags: dict | None = None, extra_params: dict | None = None,
        run_ids: dict | None = None, azure: "AzureSession | None" = None,
        finished: list[StageReport] | None = None) -> list[StageReport]:
    """Check every stage, then run each top to bottom, then a summary table. Returns the reports.

    With a tracker, the pipeline is an MLflow run (a child of ``parent``, for a sweep's variants)
    and each stage that runs is a run nested under it. ``finished`` (when given) gets the report of
    each stage as it finishes, so a caller knows which results are this run's even when a later
    stage fails."""
    planned = check(plan)
    console.rule(f"[bold]pipeline {plan.spec.name}[/] → {plan.work}")
    if dry_run:
        write_workflows(plan, planned)
        _summary(plan, planned, write=False)  # a plan must not replace the last real run's summary
        return planned
    tracker = tracker or Tracker.open(None, enabled=False)
    pipeline_run = tracker.start(run_name or plan.spec.name, parent=parent,
                                 tags={TAG_STAGE: kind, "ftl.pipeline": plan.source, **(extra_tags or {})})
    if run_ids is not None:
        run_ids["pipeline"] = pipeline_run
    tracker.log(pipeline_run, params={**flat_params(plan.spec.model_dump(mode="json", exclude_unset=True,
                                                                         exclude={"workdir", "models_dir"})),
                                      **(extra_params or {})})
    status = "FAILED"
    finished = [] if finished is None else finished
    try:
        reports = _run_stages(plan, force, tracker, pipeline_run, log_model, azure, finished)
        status = "FINISHED"
        return reports
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        manifests = stage_manifests(plan)
        # Only the stages that finished in this run: a stage that failed, or never started, may have
        # the previous result's manifest in its folder, and its metrics are not this run's.
        done = {r.stage for r in finished}
        # The same id `ftl runs sync` gives this work folder, so syncing it later adds nothing.
        tracker.log(pipeline_run, metrics=summary_metrics({s: p for s, p in manifests.items() if s in done}),
                    tags={TAG_UID: pipeline_uid([p for p in manifests.values() if p.is_file()])})
        tracker.log_files(pipeline_run, [p for p in [plan.work / "pipeline_summary.json"] if p.is_file()])
        tracker.end(pipeline_run, status)
        if pipeline_run and tracker.on:
            console.print(f"MLflow: pipeline run {pipeline_run} in experiment {tracker.experiment!r} at "
                          f"{redact(tracker.uri)}", highlight=False, soft_wrap=True)


def _run_stages(plan: PipelinePlan, force: bool, tracker: Tracker, parent: str | None,
                log_model: bool, azure: "AzureSession | None", reports: list[StageReport]) -> list[StageReport]:
    """Each stage in turn; ``reports`` gets each stage's report as soon as it has finished."""
    from ftl.export import export_onnx
    from ftl.finetune import finetune
    from ftl.models import import_model

    work = plan.work
    manifests = stage_manifests(plan)

    def tracked(stage: str):
        return tracker.stage(stage, manifests[stage], parent=parent, log_model=log_model)

    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = plan.spec.stages.import_.source
    with task_progress(f"import {source}"):
        imported = _replacing(lambda f: import_model(source, name=plan.model_dir.name, models_dir=plan.models_dir,
                                                     force=f), force)
    reports.append(StageReport("import", "skipped" if imported.skipped else "ran", time.perf_counter() - started,
                               f"{imported.parameters / 1e6:.0f}M params", str(imported.path)))
    if plan.distill:
        with tracked("distill") as stage_run:
            reports.append(_distill(plan.distill))
            stage_run.skipped = reports[-1].status == "skipped"
        if "pending" in reports[-1].detail:  # training now would need --force once they are answered
            _summary(plan, reports)
            raise DistillPending(f"the distil left seeds pending ({reports[-1].detail})", str(plan.distill.output),
                                 "run the same command again to ask for them; finished answers are kept")
    started = time.perf_counter()
    with tracked("finetune") as stage_run:
        if plan.azure:
            tuned = _replacing(lambda f: _finetune_on_azure(plan, f, azure or AzureSession()), force)
        else:
            tuned = run_with_progress(f"finetune (Olive, {plan.finetune.method})", lambda cb: _replacing(
                lambda f: finetune(plan.finetune.model_copy(update={"force": f}), on_progress=cb), force))
        stage_run.skipped = tuned.skipped
    reports.append(StageReport("finetune", _status(tuned), time.perf_counter() - started,
                               f"{tuned.rows} rows, {tuned.tokens} tokens, {tuned.steps} steps, final loss "
                               f"{tuned.final_loss if tuned.final_loss is not None else '—'}", str(tuned.output)))
    started = time.perf_counter()
    with tracked("export") as stage_run, task_progress("export int4 ONNX (Olive)"):
        exported = _replacing(lambda f: export_onnx(plan.export.model_copy(update={"force": f})), force)
        stage_run.skipped = exported.skipped
    reports.append(StageReport("export", _status(exported), time.perf_counter() - started,
                               f"{exported.size_mb} MB", str(exported.output)))
    if plan.generate:
        with tracked("generate") as stage_run:
            reports.append(_generate(plan.generate, exported.output, plan.folder("generate") / "generate", force))
            stage_run.skipped = reports[-1].status == "skipped"
    if plan.eval:
        with tracked("eval") as stage_run:
            reports.append(_eval(plan.eval, force))
            stage_run.skipped = reports[-1].status == "skipped"
    _summary(plan, reports)
    return reports


@dataclass
class AzureSession:
    """The client and transfer seam a target: azureml stage uses (built from the workspace when None;
    tests give the real SDK's client over a fake workspace, ftl.azure.jobs.Transfer's local stand-in)."""

    ml: object | None = None
    transfer: object | None = None
    poll_s: float | None = None


def _finetune_on_azure(plan: PipelinePlan, force: bool, azure: AzureSession):
    """The finetune stage as an Azure ML job: submitted, waited for, its output downloaded into the
    stage's folder, so the stages after it run here. It skips itself when the folder holds the job
    result of the same inputs (``azureml_job.json`` keeps the fingerprint the local plan had)."""
    from ftl.azure import jobs
    from ftl.azure.workspace import ml_client, resolve_workspace
    from ftl.finetune.stage import _result_from_manifest, plan as plan_finetune

    config = plan.finetune.model_copy(update={"force": force})
    out, target = Path(config.output), plan.azure
    fingerprint = plan_finetune(config).fingerprint
    if not force and manifest.is_complete(out) and jobs.job_record(out).get("fingerprint") == fingerprint:
        return _result_from_manifest(out, skipped=True)
    manifest.check_output(out, force=force, stage="finetune")
    ref = resolve_workspace(target.subscription, target.resource_group, target.workspace)
    prepared = jobs.prepare(config, **_job_placement(plan), workspace=ref)
    limits = jobs.WaitLimits(queue_s=target.queue_timeout * 60, run_s=target.run_timeout * 60)
    if azure.poll_s is not None:
        limits.poll_s = azure.poll_s
    with task_progress(f"finetune on Azure ML ({target.compute})"):
        jobs.submit(azure.ml or ml_client(ref), prepared, limits=limits, compute=target.compute,
                                transfer=azure.transfer, download_to=out, fingerprint=fingerprint,
                                say=lambda line: console.print(line, highlight=False))
    return _result_from_manifest(out, skipped=False)


def _distill(config) -> StageReport:
    """Distil is resumable by nature: answered seeds are skipped, so a re-run only asks for the rest."""
    from ftl.distill import distill

    started = time.perf_counter()
    with task_progress(f"distill ({config.teacher} teacher)") as (progress, task):
        result = distill(config, on_progress=lambda r: progress.update(
            task, completed=r.settled, total=r.to_ask, info=f"{r.answered} answered"),
            on_warning=lambda message: console.print(f"[yellow]warning:[/] {message}"))
    fresh = result.answered + sum(result.rejected.values())
    status = "skipped" if fresh == 0 and result.already_done and not result.pending else (
        "resumed" if result.already_done else "ran")
    rejected, pending = sum(result.rejected.values()), sum(result.pending.values())
    detail = f"{result.answered + result.already_done} Q/A, {rejected} rejected this run"
    if pending:
        detail += f", {pending} pending (run again to ask for them)"
    if result.rate_limited:
        detail += f", {result.rate_limited} of {result.requests} requests answered 429"
    return StageReport("distill", status, time.perf_counter() - started, detail, str(result.output))


def _eval(config: EvalConfig, force: bool) -> StageReport:
    """Compare the stages' own models (by default export vs finetune vs base) on held-out data."""
    from ftl.eval import evaluate

    started = time.perf_counter()
    out = Path(config.output)
    lineage = [manifest.read(Path(m.split(":", 1)[1])) or {} for m in config.models]
    fingerprint = manifest.sha256_json({"models": [r.get("fingerprint") or r.get("outputs") for r in lineage],
                                        "settings": config.model_dump(mode="json", exclude={"force"})})
    if manifest.is_complete(out, fingerprint):
        result_status, summary = "skipped", json.loads((out / "metrics_summary.json").read_text())
    else:
        with task_progress("eval", total=None) as (progress, task):
            result = _replacing(lambda f: evaluate(config.model_copy(update={"force": f}), fingerprint=fingerprint,
                                                   on_progress=lambda i, n: progress.update(task, completed=i,
                                                                                            total=n)), force)
        result_status, summary = "ran", result.summary
    onnx = next((m for m in summary["models"].values() if m.get("quantization_source")), None)
    detail = f"{summary['samples']} samples"
    if onnx:
        source = summary["models"].get(onnx["quantization_source"])
        ratio = onnx["perplexity_answer"] / source["perplexity_answer"] if source and source.get(
            "perplexity_answer") else None
        detail += f", int4 ppl × {ratio:.3f}" if ratio else ""
        detail += f", top-1 {onnx['top1_agreement']:.3f}"
    return StageReport("eval", result_status, time.perf_counter() - started, detail, str(out / "report.html"))


def _replacing(stage, force: bool):
    """Run a stage; a finished stage with the same inputs skips itself. One whose inputs changed
    is only replaced when ``ftl run --force`` was given, so no result is lost by accident."""
    try:
        return stage(False)
    except OutputExistsError:
        if not force:
            raise
        return stage(True)


def _generate(stage: GenerateStage, export_dir: Path, out: Path, force: bool) -> StageReport:
    from ftl.generate import OnnxChatModel

    started = time.perf_counter()
    questions = _questions(stage)
    export_record = manifest.read(export_dir) or {}
    fingerprint = manifest.sha256_json({"export": export_record.get("fingerprint"), "questions": questions,
                                        "settings": stage.model_dump(mode="json", exclude={"questions"})})
    answers_path = out / "answers.jsonl"
    if manifest.is_complete(out, fingerprint) and not force:
        return StageReport("generate", "skipped", time.perf_counter() - started,
                           f"{len(questions)} answers", str(answers_path))
    manifest.prepare_output(out, force=True, stage="generate")
    record = manifest.new("generate", inputs={"export": str(export_dir)}, params=stage.model_dump(mode="json"),
                          fingerprint=fingerprint)
    manifest.write(out, record)
    model = OnnxChatModel(export_dir)
    rates = []
    with open(answers_path, "w", encoding="utf-8") as handle, \
            task_progress("generate (onnxruntime-genai)", total=len(questions)) as (progress, task):
        for question in questions:
            result = model.ask(question, max_new_tokens=stage.max_new_tokens, temperature=stage.temperature)
            rates.append(result.decode_tokens_per_s)
            handle.write(json.dumps({"Question": question, "Answer": result.text, "new_tokens": result.new_tokens,
                                     "ttft_s": round(result.ttft_s, 4),
                                     "decode_tokens_per_s": result.decode_tokens_per_s}) + "\n")
            handle.flush()
            progress.advance(task)
            console.print(f"[bold]Q:[/] {question}\n[bold]A:[/] {result.text.strip()}\n", highlight=False)
    rates = [r for r in rates if r is not None]  # an answer of under two tokens has no decode rate
    mean_rate = sum(rates) / len(rates) if rates else None
    record.update(status="complete", metrics={"answers": len(questions), "mean_decode_tokens_per_s": mean_rate})
    manifest.write(out, record)
    return StageReport("generate", "ran", time.perf_counter() - started,
                       f"{len(questions)} answers" + (f", {mean_rate:.0f} tok/s decode" if mean_rate else ""),
                       str(answers_path))


def _questions(stage: GenerateStage) -> list[str]:
    if isinstance(stage.questions, list):
        found = stage.questions
    else:
        path = Path(stage.questions)
        if not path.is_file():
            raise DataError("questions file not found", str(path), "fix generate.questions in the pipeline")
        if path.suffix == ".jsonl":
            from ftl.data import read_jsonl

            found = []
            for number, row in read_jsonl(path):
                if stage.question_field not in row:
                    raise DataError(f"missing field {stage.question_field!r}", f"{path}:{number}",
                                    "set generate.question_field")
                found.append(row[stage.question_field])
        else:
            found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not found:
        raise DataError("no questions to answer", str(stage.questions), "add at least one question")
    return found


def _status(result) -> str:
    return "skipped" if result.skipped else ("resumed" if getattr(result, "resumed", False) else "ran")


def _apply_override(raw: dict, item: str) -> None:
    """``finetune.max_steps=5`` (a stage key) or ``workdir=runs/x`` (a top-level key); values are YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", None, "e.g. finetune.max_steps=5")
    key, value = item.split("=", 1)
    parts = key.split(".")
    if parts[0] in STAGES:
        parts = ["stages", *parts]
    target = raw
    for part in parts[:-1]:
        target = target.setdefault(part, {}) if isinstance(target.get(part, {}), dict) else None
        if target is None:
            raise ConfigError(f"override {key!r} does not name a setting", None, "e.g. finetune.max_steps=5")
    target[parts[-1]] = yaml.safe_load(value)


def _summary(plan: PipelinePlan, reports: list[StageReport], write: bool = True) -> None:
    table = Table("stage", "status", "time", "result", "output", title=f"pipeline {plan.spec.name}")
    for r in reports:
        colour = {"ran": "green", "resumed": "green", "skipped": "cyan"}.get(r.status, "white")
        table.add_row(r.stage, f"[{colour}]{r.status}[/]", f"{r.seconds:.1f}s", r.detail, r.output)
    console.print(table)
    if write:
        summary = [vars(r) for r in reports]
        (plan.work / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
