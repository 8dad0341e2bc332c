"""A pipeline is a YAML file naming a work folder and the settings of each stage.

Stages chain by path: import writes ``models/<name>``, finetune reads it and writes
``<workdir>/finetune``, export reads that and writes ``<workdir>/export``, generate answers the
sample questions from it. Each stage skips itself when its manifest says it finished with the
same inputs (the fingerprint), and an interrupted finetune resumes from its last checkpoint.
Relative paths in the YAML are relative to the current directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError
from rich.table import Table

from ftl import manifest
from ftl.errors import ConfigError, DataError, OutputExistsError
from ftl.progress import console, run_with_progress, task_progress


class ImportStage(BaseModel):
    source: str = "smollm2-135m"
    name: str | None = None


class GenerateStage(BaseModel):
    questions: list[str] | Path = Field(description="A list, or a text/JSONL file of questions")
    question_field: str = "Question"
    max_new_tokens: int = 128
    temperature: float = 0.0


class PipelineSpec(BaseModel):
    name: str
    workdir: Path
    models_dir: Path | None = None  # default: ./models or $FTL_MODELS_DIR, as for ftl models
    import_: ImportStage = Field(default_factory=ImportStage, alias="import")
    distill: dict[str, Any] | None = None
    finetune: dict[str, Any]
    export: dict[str, Any] = Field(default_factory=dict)
    generate: GenerateStage | None = None
    eval: dict[str, Any] | None = None


@dataclass
class StageReport:
    stage: str
    status: str
    seconds: float
    detail: str
    output: str = ""
    extra: dict = field(default_factory=dict)


def load_pipeline(path: Path, overrides: tuple[str, ...] | list[str] = ()) -> PipelineSpec:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where, "fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline must be a YAML mapping", str(path), "see pipelines/quickstart.yaml")
    stages = raw.get("stages", {})
    flat = {"name": raw.get("name", Path(path).stem), "workdir": raw.get("workdir", f"runs/{Path(path).stem}"),
            "models_dir": raw.get("models_dir"), **stages}
    for item in overrides:
        _apply_override(flat, item)
    try:
        return PipelineSpec.model_validate(flat)
    except ValidationError as exc:  # → one line naming the key
        errors = exc.errors()
        loc = ".".join(str(p) for p in errors[0]["loc"])
        raise ConfigError(f"invalid pipeline setting: {errors[0]['msg']}", f"{path}: {loc}",
                          "see pipelines/quickstart.yaml for the expected keys") from None


def run(spec: PipelineSpec, *, force: bool = False, dry_run: bool = False) -> list[StageReport]:
    """Setup, then each stage top to bottom, then a summary table. Returns the stage reports."""
    from ftl.export import ExportConfig, export_onnx
    from ftl.finetune import FinetuneConfig, finetune
    from ftl.models import import_model

    work = Path(spec.workdir)
    work.mkdir(parents=True, exist_ok=True)
    reports: list[StageReport] = []
    console.rule(f"[bold]pipeline {spec.name}[/] → {work}")

    started = time.perf_counter()
    from ftl.models import default_models_dir

    models_dir = spec.models_dir or default_models_dir()
    name = spec.import_.name or spec.import_.source
    model_dir = models_dir / name
    if dry_run:
        reports.append(StageReport("import", "planned", 0.0, f"{spec.import_.source} → {model_dir}"))
    else:
        with task_progress(f"import {spec.import_.source}"):
            imported = _replacing(lambda f: import_model(spec.import_.source, name=name, models_dir=models_dir,
                                                         force=f), force)
        reports.append(StageReport("import", "skipped" if imported.skipped else "ran",
                                   time.perf_counter() - started, f"{imported.parameters / 1e6:.0f}M params",
                                   str(imported.path)))

    finetune_settings = dict(spec.finetune)
    distill_config = None
    if spec.distill is not None:
        from ftl.distill import DistillConfig

        # The distilled Q/A is trained on after the finetune stage's own data files.
        distill_config = DistillConfig(**{"model": str(model_dir), "output": work / "distill" / "qa.jsonl",
                                          **spec.distill})
        own = finetune_settings.get("data", [])
        finetune_settings["data"] = (own if isinstance(own, list) else [own]) + [distill_config.output]
    ft_config = FinetuneConfig(**{"model": str(model_dir), "output": work / "finetune", **finetune_settings})
    ex_config = ExportConfig(**{"adapter": work / "finetune", "output": work / "export", **spec.export})
    if dry_run:
        from ftl.data import Fields, load_examples

        if distill_config:
            from ftl.distill.seeds import load_seeds

            seeds = load_seeds(distill_config)
            reports.append(StageReport("distill", "planned", 0.0, f"{len(seeds)} seeds valid",
                                       str(distill_config.output)))
        fields = Fields(ft_config.question_field, ft_config.answer_field, ft_config.messages_field)
        existing = [f for f in ft_config.data_files if Path(f).is_file()]
        rows = [e for f in existing for e in load_examples(f, fields)]
        reports.append(StageReport("finetune", "planned", 0.0, f"{len(rows)} rows valid", str(ft_config.output)))
        if (model_dir / "config.json").is_file() and len(existing) == len(ft_config.data_files):
            finetune(ft_config, save_config=work / "finetune.olive_config.json")
            reports[-1].detail += f"; Olive workflow → {work / 'finetune.olive_config.json'}"
        reports.append(StageReport("export", "planned", 0.0, "MergeAdapterWeights → ModelBuilder int4",
                                   str(ex_config.output)))
        _summary(spec, reports, write=False)  # a plan must not replace the last real run's summary
        return reports

    if distill_config:
        reports.append(_distill(distill_config))
    started = time.perf_counter()
    tuned = run_with_progress("finetune (Olive LoRA)", lambda cb: _replacing(
        lambda f: finetune(ft_config.model_copy(update={"force": f or ft_config.force}), on_progress=cb), force))
    reports.append(StageReport("finetune", _status(tuned), time.perf_counter() - started,
                               f"{tuned.rows} rows, {tuned.tokens} tokens, {tuned.steps} steps, final loss "
                               f"{tuned.final_loss if tuned.final_loss is not None else '—'}", str(tuned.output)))

    started = time.perf_counter()
    with task_progress("export int4 ONNX (Olive)"):
        exported = _replacing(lambda f: export_onnx(ex_config.model_copy(update={"force": f or ex_config.force})),
                              force)
    reports.append(StageReport("export", _status(exported), time.perf_counter() - started,
                               f"{exported.size_mb} MB", str(exported.output)))

    if spec.generate:
        reports.append(_generate(spec.generate, exported.output, work / "generate", force))
    if spec.eval is not None:
        reports.append(_eval(spec.eval, {"export": f"onnx:{exported.output}", "finetune": f"torch:{tuned.output}",
                                         "base": f"torch:{model_dir}"}, work / "eval", force))
    _summary(spec, reports)
    return reports


def _distill(config) -> StageReport:
    """Distil is resumable by nature: answered seeds are skipped, so a re-run only asks for the rest."""
    from ftl.distill import distill

    started = time.perf_counter()
    with task_progress(f"distill ({config.teacher} teacher)") as (progress, task):
        result = distill(config, on_progress=lambda r: progress.update(task, info=f"{r.answered} answered"))
    fresh = result.answered + sum(result.rejected.values())
    status = "skipped" if fresh == 0 and result.already_done else ("resumed" if result.already_done else "ran")
    rejected = sum(result.rejected.values())
    return StageReport("distill", status, time.perf_counter() - started,
                       f"{result.answered + result.already_done} Q/A, {rejected} rejected this run",
                       str(result.output))


def _eval(settings: dict, named: dict[str, str], out: Path, force: bool) -> StageReport:
    """Compare the stages' own models (by default export vs finetune vs base) on held-out data."""
    from ftl.eval import EvalConfig, evaluate

    started = time.perf_counter()
    settings = dict(settings)
    models = [named.get(m, m) for m in settings.pop("models", ["export", "finetune", "base"])]
    config = EvalConfig(models=models, output=out, **settings)
    lineage = [manifest.read(Path(m.split(":", 1)[1])) or {} for m in models]
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
                                     "decode_tokens_per_s": round(result.decode_tokens_per_s, 1)}) + "\n")
            handle.flush()
            progress.advance(task)
            console.print(f"[bold]Q:[/] {question}\n[bold]A:[/] {result.text.strip()}\n", highlight=False)
    mean_rate = sum(rates) / len(rates)
    record.update(status="complete", metrics={"answers": len(questions), "mean_decode_tokens_per_s": mean_rate})
    manifest.write(out, record)
    return StageReport("generate", "ran", time.perf_counter() - started,
                       f"{len(questions)} answers, {mean_rate:.0f} tok/s decode", str(answers_path))


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


def _apply_override(flat: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", None, "e.g. finetune.max_steps=5")
    key, value = item.split("=", 1)
    target = flat
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = yaml.safe_load(value)


def _summary(spec: PipelineSpec, reports: list[StageReport], write: bool = True) -> None:
    table = Table("stage", "status", "time", "result", "output", title=f"pipeline {spec.name}")
    for r in reports:
        colour = {"ran": "green", "resumed": "green", "skipped": "cyan"}.get(r.status, "white")
        table.add_row(r.stage, f"[{colour}]{r.status}[/]", f"{r.seconds:.1f}s", r.detail, r.output)
    console.print(table)
    if write:
        summary = [vars(r) for r in reports]
        (Path(spec.workdir) / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
