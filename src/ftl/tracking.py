"""MLflow as a mirror of ftl's manifests: every stage run is an MLflow run.

The manifest stays the truth. A stage logs to MLflow while it runs (the fine-tune's loss and
eval_loss per step, from the HF Trainer that Olive drives, with ``report_to: mlflow``) and, when
it has finished, mirrors its manifest: parameters, numeric metrics, tags (fingerprint, ftl
version, base model and data hashes) and the small files beside it. If MLflow cannot be reached,
the stage still finishes and one warning says what was not logged; ``ftl runs sync FOLDER``
logs it later, and running that twice creates no duplicate (runs are found by the manifest's
``run_uid`` tag).

Where runs go: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI`` (an Azure ML job sets it), else
a SQLite file: ``<workdir>/mlflow.db`` for a pipeline, ``runs/mlflow.db`` for a lone stage.
MLflow's file store is deprecated and refused. Inside an Azure ML job (``$MLFLOW_RUN_ID`` set by
the job) ftl's runs nest under the job's run, and the loss and eval_loss go to the job's run as
well: an Azure ML sweep reads its ``primary_metric`` from the trial's own run.

A store that cannot be reached turns tracking off for the rest of the command (one warning); a
call the store refuses (one bad parameter) loses that call only, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from ftl import __version__, manifest
from ftl.errors import ConfigError
from ftl.progress import console

DB_NAME = "mlflow.db"
LONE_STAGE_DIR = Path("runs")
DEFAULT_EXPERIMENT = "ftl"
# Schemes MLflow's tracking client understands (SQL stores, a tracking server, Databricks, and
# Azure ML through azureml-mlflow). "file" is MLflow's deprecated file store.
SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "azureml"}
# Small files mirrored as artefacts when present beside a manifest (report plots are *.png).
ARTEFACTS = ("manifest.json", "olive_config.json", "report.html", "report.md", "metrics_summary.json",
             "genai_config.json", "int4_grid.json", "training_summary.json", "pipeline_summary.json",
             "answers.jsonl", "sweep_summary.json", "comparison.html")
# What --log-model adds: the weights a stage produced.
MODEL_FILES = ("adapter", "qscale.safetensors", "model.onnx", "model.onnx.data", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "adapter_weights.onnx_adapter")
TAG_UID = "ftl.run_uid"
TAG_STAGE = "ftl.stage"
TAG_MIRRORED = "ftl.mirrored"
TAG_FOLDER = "ftl.folder"
TAG_PARENT = "mlflow.parentRunId"
OFF = "FTL_MLFLOW_OFF"
# Inside an Azure ML job: the job's own run (its $MLFLOW_RUN_ID), for the child process that trains.
JOB_RUN = "FTL_MLFLOW_JOB_RUN_ID"
# What an Azure ML sweep can name as its primary_metric. It reads that from the trial's own run, not
# from ftl's run nested under it, so these go to the job's run as well.
OBJECTIVE = ("loss", "eval_loss")
_SET_BY_FTL: set[str] = set()
_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. /]")
# user:password@ in any URL an error message quotes (MLflow's own errors repeat the request URL)
_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")


def scrub(text: str) -> str:
    """Any user:password@ in the URLs a message quotes removed (MLflow's errors repeat the request URL)."""
    return _CREDENTIALS.sub(r"\1", text)


def redact(uri: str) -> str:
    """A URI fit for logs and errors: no user name, password or query string (tokens live there)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc and not parts.query:
        return uri
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def resolve_uri(explicit: str | None, default_dir: Path) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<default_dir>/mlflow.db``; checked."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return "sqlite:///" + str((Path(default_dir) / DB_NAME).resolve())
    return check_uri(uri, "--tracking-uri" if explicit else "$MLFLOW_TRACKING_URI")


def check_uri(uri: str, where: str) -> str:
    """A known scheme; a SQLite path made absolute (Olive's child process runs in another folder)."""
    if uri == "databricks" or uri.startswith("databricks://"):
        return uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    scheme = urlsplit(uri).scheme.split("+", 1)[0].lower()
    if scheme == "file" or (not scheme and uri):
        raise ConfigError(f"{redact(uri)!r} is MLflow's file store, which MLflow 3 deprecates", where,
                          "use a SQLite store, e.g. sqlite:///runs/mlflow.db, or a tracking server URL")
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown tracking URI scheme {scheme!r} in {redact(uri)!r}", where,
                          "use sqlite:///PATH, http(s)://HOST, azureml://… or databricks")
    return uri


def refused(exc: BaseException) -> bool:
    """The store answered and refused this one call (MLflow's 400 and 404 answers: an invalid or
    changed parameter, a run that is gone), as against a store that cannot be reached or fails for
    every call (connection errors, 5xx after MLflow's retries, 401/403)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.get_http_status_code() in (400, 404)


def _warn(what: str) -> None:
    console.print(f"[yellow]warning:[/] {what}", highlight=False, soft_wrap=True, markup=True)


@dataclass
class Tracker:
    """One tracking store and experiment; ``off`` when disabled or unreachable (then every call is a no-op)."""

    uri: str
    experiment: str
    client: Any = None
    experiment_id: str | None = None
    parent_env: str | None = None  # the Azure ML job's run, which ftl's runs nest under
    problem: str | None = None
    _warned: set = field(default_factory=set)

    @classmethod
    def open(cls, uri: str | None, experiment: str | None = None, *, enabled: bool = True,
             create: bool = True) -> "Tracker":
        """``create=False`` (reading runs): an unknown experiment is an error, not a new empty one."""
        if not enabled or uri is None:
            return cls(uri or "", experiment or DEFAULT_EXPERIMENT, problem="tracking is off (--no-track)")
        experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        tracker = cls(uri, experiment, parent_env=os.environ.get("MLFLOW_RUN_ID"))
        try:
            tracker._connect(create)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 — any failure to reach the store is a warning, never fatal
            tracker._fail(exc, "nothing was logged", disable=True)
        return tracker

    @property
    def on(self) -> bool:
        return self.client is not None

    def _connect(self, create: bool = True) -> None:
        # A dead server must cost seconds, not MLflow's default minutes of retries: set for ftl's
        # own process only when the user has not (Olive's child gets the user's environment).
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
            if key not in os.environ:
                os.environ[key] = value
                _SET_BY_FTL.add(key)
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri)
        found = client.get_experiment_by_name(self.experiment)
        if found is None and not create:
            names = sorted(e.name for e in client.search_experiments())
            raise ConfigError(f"no experiment {self.experiment!r} at {redact(self.uri)}", "--experiment",
                              f"experiments there: {', '.join(names)}" if names else "nothing has been logged there yet")
        if found is None:
            location = None
            if self.uri.startswith("sqlite:///"):  # else MLflow puts artefacts in ./mlruns of the cwd
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = client.create_experiment(self.experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.client = client

    def _fail(self, exc: BaseException, what: str, *, disable: bool | None = None) -> None:
        """One warning. A store that cannot be reached (or fails for every call) is turned off for the
        rest of the command; a call the store refused (a bad parameter, a run that is gone) is only
        that call: the warning says so, once, and tracking carries on. ``disable`` overrides the choice."""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = scrub(reason.replace(self.uri, redact(self.uri)))[:200]
        if disable is None:
            disable = not refused(exc)
        if disable:
            self.problem = f"MLflow at {redact(self.uri)} failed: {reason}"
            self.client = None
            _warn(f"{self.problem}; {what} — the results are in the manifests; `ftl runs sync FOLDER` logs them later")
            return
        message = f"MLflow at {redact(self.uri)} refused a call: {reason}; {what} — tracking carries on"
        if message not in self._warned:
            self._warned.add(message)
            _warn(message)

    # -- runs -----------------------------------------------------------------------------------

    def start(self, name: str, *, parent: str | None = None, tags: dict | None = None) -> str | None:
        if not self.on:
            return None
        try:
            all_tags = {"ftl.version": __version__, **(tags or {})}
            if parent or self.parent_env:
                all_tags[TAG_PARENT] = parent or self.parent_env
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, f"the {name} run was not logged")
            return None
        return run.info.run_id

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id and self.on:
            try:
                self.client.set_terminated(run_id, status)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, "a run's status was not set")

    def log(self, run_id: str | None, *, params: dict | None = None, metrics: dict | None = None,
            tags: dict | None = None, step: int = 0) -> None:
        """Parameters, metrics and tags in one batch (chunked to MLflow's limits)."""
        if not run_id or not self.on:
            return
        from mlflow.entities import Metric, Param, RunTag

        now = _now_ms()
        items = {"params": [Param(k, _param_value(v)) for k, v in (params or {}).items()],
                 "metrics": [Metric(_metric_name(k), float(v), now, step) for k, v in (metrics or {}).items()],
                 "tags": [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]}
        batches = [{kind: found[i:i + 100] for kind, found in items.items()}
                   for i in range(0, max(len(found) for found in items.values()) or 1, 100)]
        for index, batch in enumerate(batches):
            try:
                self.client.log_batch(run_id, **batch)
            except Exception as exc:  # noqa: BLE001
                if not refused(exc):
                    self._fail(exc, "some parameters or metrics were not logged")
                    return
                # One refused item fails its whole batch: the rest go one by one, and the warning names it.
                self._one_by_one(run_id, batches[index:], exc)
                return

    def _one_by_one(self, run_id: str, batches: list[dict], first: BaseException) -> None:
        names = []
        for kind, item in ((kind, item) for batch in batches for kind, found in batch.items() for item in found):
            try:
                self.client.log_batch(run_id, **{kind: [item]})
            except Exception as exc:  # noqa: BLE001
                if not refused(exc):
                    self._fail(exc, "some parameters or metrics were not logged")
                    return
                names.append(f"{kind[:-1]} {item.key!r}")
        self._fail(first, f"{', '.join(names) or 'one batch'} not logged", disable=False)

    def log_history(self, run_id: str | None, name: str, points: list[tuple[int, float]]) -> None:
        if not run_id or not self.on or not points:
            return
        from mlflow.entities import Metric

        try:
            now = _now_ms()
            metrics = [Metric(_metric_name(name), float(v), now, int(s)) for s, v in points]
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, f"the {name} history was not logged")

    def log_files(self, run_id: str | None, files: list[Path], artifact_path: str | None = None) -> None:
        if not run_id or not self.on:
            return
        try:
            for path in files:
                if path.is_dir():
                    self.client.log_artifacts(run_id, str(path), f"{artifact_path}/{path.name}" if artifact_path
                                              else path.name)
                elif path.is_file():
                    self.client.log_artifact(run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001 — e.g. an unwritable artefact folder: the run itself is fine
            self._fail(exc, "some artefacts were not logged", disable=False)

    # -- stages ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, stage: str, manifest_path: Path, *, parent: str | None = None, log_model: bool = False,
              name: str | None = None) -> Iterator["StageRun"]:
        """A run around one stage. It is made when the stage needs it live (the fine-tune's Olive
        child logs its loss into it: :func:`child_env`) or at the end; then the finished manifest
        is mirrored into it. A stage that skipped itself (same inputs, already done) makes no run."""
        global _ACTIVE
        run = StageRun(self, None, Path(manifest_path), stage, name or run_name(stage, Path(manifest_path)), parent)
        before = manifest.read_file(run.manifest_path)
        before_uid = run_uid(before) if before else None
        previous, _ACTIVE = _ACTIVE, run
        try:
            yield run
        except BaseException as exc:
            _ACTIVE = previous
            if run.ensure():
                now = manifest.read_file(run.manifest_path)
                if now and run_uid(now) != before_uid:  # never the previous result left in the folder
                    self.mirror(run.run_id, run.manifest_path, failed=True)
                self.end(run.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        _ACTIVE = previous
        if run.skipped and run.run_id is None:  # the run that made this result already holds it
            run.run_id = self.find(run.manifest_path)
            if parent and run.run_id:
                self.log(parent, tags={f"ftl.reused.{stage}": run.run_id})
            return
        if run.ensure():
            self.mirror(run.run_id, run.manifest_path, log_model=log_model)
            self.end(run.run_id)

    def mirror(self, run_id: str | None, manifest_path: Path, *, log_model: bool = False,
               failed: bool = False) -> None:
        """Parameters, metrics, tags and small files of a finished (or failed) stage, from its manifest."""
        record = manifest.read_file(manifest_path)
        if not run_id or not self.on or record is None:
            return
        tags = {TAG_UID: run_uid(record), TAG_STAGE: record.get("stage"), TAG_FOLDER: str(manifest_path.parent.resolve()),
                "ftl.fingerprint": record.get("fingerprint"), "ftl.status": record.get("status"),
                "ftl.hardware": record.get("hardware")}
        tags.update(_hash_tags(record))
        for package, version in (record.get("versions") or {}).items():
            tags[f"ftl.versions.{package}"] = version
        metrics, histories = stage_metrics(record)
        self.log(run_id, params=flat_params(record.get("params") or {}), metrics=metrics,
                 tags={k: v for k, v in tags.items() if v is not None})
        for name, points in histories.items():
            for target in [run_id, *([self.parent_env] if self.parent_env and name in OBJECTIVE else [])]:
                # Logged per step while training (a resumed run only from its checkpoint): the rest now.
                try:
                    logged = {m.step for m in self.client.get_metric_history(target, _metric_name(name))}
                except Exception:  # noqa: BLE001
                    logged = set()
                self.log_history(target, name, [(s, v) for s, v in points if s not in logged])
        folder = manifest_path.parent
        files = [manifest_path] + [folder / n for n in ARTEFACTS if n != manifest.MANIFEST]
        if record.get("stage") == "eval":
            files += sorted(folder.glob("*.png"))
        self.log_files(run_id, [f for f in files if f.is_file()])
        if log_model:
            self.log_files(run_id, [folder / n for n in MODEL_FILES if (folder / n).exists()], "model")
        if record.get("status") == "complete" and not failed:
            self.log(run_id, tags={TAG_MIRRORED: "1"})

    def _get(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except Exception:  # noqa: BLE001
            return None

    def find(self, manifest_path: Path) -> str | None:
        """The run a finished result was mirrored into, if any (by its manifest's run_uid)."""
        record = manifest.read_file(manifest_path)
        if not self.on or record is None:
            return None
        try:
            found = self.client.search_runs([self.experiment_id], f"tags.`{TAG_UID}` = '{run_uid(record)}'",
                                            max_results=5)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "runs could not be searched")
            return None
        mirrored = [r for r in found if r.data.tags.get(TAG_MIRRORED) == "1"]
        return (mirrored or found)[0].info.run_id if (mirrored or found) else None

    def sync(self, manifest_path: Path, *, parent: str | None = None, log_model: bool = False) -> tuple[str | None, bool]:
        """Mirror one finished result; (run id, whether a new run was made). Idempotent."""
        existing = self.find(manifest_path)
        found = self._get(existing) if existing else None
        if found is not None and found.data.tags.get(TAG_MIRRORED) == "1":
            return existing, False
        record = manifest.read_file(manifest_path) or {}
        run_id = existing or self.start(run_name(record.get("stage", "stage"), Path(manifest_path)), parent=parent,
                                        tags={TAG_STAGE: record.get("stage")})
        self.mirror(run_id, manifest_path, log_model=log_model)
        self.end(run_id, "FINISHED" if record.get("status") == "complete" else "FAILED")
        return run_id, bool(run_id) and existing is None


@dataclass
class StageRun:
    tracker: Tracker
    run_id: str | None
    manifest_path: Path
    stage: str
    name: str
    parent: str | None = None
    skipped: bool = False

    def ensure(self) -> str | None:
        if self.run_id is None:
            self.run_id = self.tracker.start(self.name, parent=self.parent, tags={TAG_STAGE: self.stage})
        return self.run_id


_ACTIVE: StageRun | None = None


def child_env() -> dict[str, str | None]:
    """Environment for a child process (Olive) that logs into the active stage's run, made now
    (None: unset the variable there). The HF Trainer reads it with ``report_to: mlflow``."""
    if _ACTIVE is None or not _ACTIVE.tracker.on or not _ACTIVE.ensure():
        return {OFF: "1", JOB_RUN: None}  # an inherited MLFLOW_RUN_ID (an Azure ML job's) must not get the metrics either
    tracker = _ACTIVE.tracker
    env = {"MLFLOW_TRACKING_URI": tracker.uri, "MLFLOW_RUN_ID": _ACTIVE.run_id, JOB_RUN: tracker.parent_env,
           # the run's own experiment: the Trainer calls set_experiment() first, and a different one fails
           "MLFLOW_EXPERIMENT_NAME": tracker.experiment, "MLFLOW_EXPERIMENT_ID": str(tracker.experiment_id),
           # The Trainer's own parameter dump (~150 TrainingArguments and model-config keys) is off: ftl
           # logs the stage's settings itself, and the Olive config that ran is an artefact.
           "MLFLOW_MAX_LOG_PARAMS": "0", "HF_MLFLOW_LOG_ARTIFACTS": "0", "MLFLOW_NESTED_RUN": "false", OFF: None}
    for key in _SET_BY_FTL:  # MLflow's own retries for the child, unless the user set them
        env[key] = None
    return env


def tracks(env: dict[str, str]) -> bool:
    return bool(env.get("MLFLOW_RUN_ID"))


def live_logger(*, own_run: bool = True):
    """In a child process: a function logging metrics at a step into the run :func:`child_env`
    named, and the :data:`OBJECTIVE` into the Azure ML job's run too; ``own_run=False`` for the
    job's run alone (the HF Trainer's MLflowCallback logs the stage's run itself). A no-op when
    there is none. A failure to log never stops training (the manifest keeps the curve, and the
    stage's mirror logs what is missing when it ends)."""
    uri, run_id, job_run = (os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", JOB_RUN))
    targets = [(run_id, None)] if own_run and run_id else []
    targets += [(job_run, OBJECTIVE)] if job_run else []
    if not uri or not targets or os.environ.get(OFF):
        return lambda metrics, step: None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, state = MlflowClient(tracking_uri=uri), {"ok": True}

    def log(metrics: dict, step: int) -> None:
        if not state["ok"]:
            return
        try:
            for target, names in targets:
                batch = [Metric(_metric_name(k), float(v), _now_ms(), int(step)) for k, v in metrics.items()
                         if _number(v) and (names is None or k in names)]
                if batch:
                    client.log_batch(target, metrics=batch)
        except Exception:  # noqa: BLE001
            state["ok"] = False

    return log


def run_name(stage: str, manifest_path: Path) -> str:
    """``finetune ft-r8`` for a lone stage's folder; just ``finetune`` inside a pipeline."""
    folder = manifest_path.parent.name if manifest_path.name == manifest.MANIFEST else manifest_path.name.split(".")[0]
    return stage if folder in (stage, "qa") else f"{stage} {folder}"


def run_uid(record: dict) -> str:
    """The manifest's own id; manifests from before it get one from what made them unique."""
    return record.get("run_uid") or hashlib.sha256(json.dumps(
        [record.get("stage"), record.get("fingerprint"), record.get("created")]).encode()).hexdigest()[:32]


def flat_params(params: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys; lists as JSON."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value
    return out


def stage_metrics(record: dict) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """(final numeric metrics, per-step histories) of a manifest, named for comparison across runs."""
    metrics: dict[str, float] = {}
    histories: dict[str, list[tuple[int, float]]] = {}
    stage = record.get("stage")
    raw = record.get("metrics") or {}
    if stage == "eval":
        onnx = None
        for spec, values in raw.items():
            if not isinstance(values, dict):
                continue
            label = model_label(spec)
            for key, value in values.items():
                if _number(value):
                    metrics[f"{label}.{key}"] = value
            if values.get("kind") == "onnx" and onnx is None:
                onnx = values
                source = raw.get(values.get("quantization_source") or "", {})
                for key in ("perplexity_answer", "rougeL", "decode_tokens_per_s", "top1_agreement",
                            "kl_divergence", "size_mb"):
                    if _number(values.get(key)):
                        metrics[f"exported.{key}"] = values[key]
                if _number(values.get("perplexity_answer")) and _number(source.get("perplexity_answer")):
                    metrics["exported.ppl_ratio"] = values["perplexity_answer"] / source["perplexity_answer"]
    else:
        for key, value in _flat_numbers(raw).items():
            metrics[key] = value
        for name, key in (("loss", "loss_curve"), ("eval_loss", "eval_curve")):
            curve = raw.get(key)
            if isinstance(curve, list):
                points = [(int(p["step"]), float(p[name if name in p else "loss"])) for p in curve
                          if isinstance(p, dict) and "step" in p and (name in p or "loss" in p)]
                if points:
                    histories[name] = points
    seconds = (record.get("timings") or {}).get("seconds")
    if _number(seconds):
        metrics["seconds"] = seconds
    return metrics, histories


def pipeline_uid(manifests: list[Path]) -> str:
    """A pipeline run's id for `ftl runs sync`: made from its stages' own ids."""
    uids = [run_uid(manifest.read_file(p) or {}) for p in manifests if Path(p).is_file()]
    return hashlib.sha256("".join(uids).encode()).hexdigest()[:32]


def summary_metrics(manifests: dict[str, Path]) -> dict[str, float]:
    """The key results of a pipeline's stages, as ``<stage>.<metric>``: what a sweep ranks and compares."""
    keep = {"finetune": ("final_loss", "best_eval_loss", "best_step", "seconds"),
            "export": ("size_mb", "seconds"), "generate": ("mean_decode_tokens_per_s",)}
    out = {}
    for stage, path in manifests.items():
        record = manifest.read_file(path)
        if not record or record.get("status") != "complete":
            continue
        metrics, _ = stage_metrics(record)
        for key, value in metrics.items():
            if key in keep.get(stage, ()) or (stage == "eval" and key.startswith("exported.")):
                out[f"{stage}.{key}"] = value
    return out


def model_label(spec: str) -> str:
    """``onnx:runs/x/export`` → ``onnx.export``: short metric names that read across runs."""
    kind, _, path = spec.partition(":")
    return f"{kind}.{Path(path).name}" if path else spec


def _flat_numbers(value: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flat_numbers(item, f"{prefix}{key}."))
        elif _number(item):
            out[f"{prefix}{key}"] = item
    return out


def _hash_tags(record: dict) -> dict[str, str]:
    inputs = record.get("inputs") or {}
    tags = {}
    base = inputs.get("base_model")
    if isinstance(base, dict) and base.get("sha256"):
        tags["ftl.base_sha256"] = base["sha256"]
    items = []
    for key in ("data", "val_data", "seeds"):
        data = inputs.get(key)
        items += data if isinstance(data, list) else [data] if data else []
    hashes = [d.get("sha256") for d in items if isinstance(d, dict) and d.get("sha256")]
    if hashes:
        tags["ftl.data_sha256"] = ",".join(hashes)
    return tags


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _metric_name(name: str) -> str:
    return _METRIC_NAME.sub("_", name)[:250]


def _param_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if "://" in text:  # an endpoint or base URL: no user:key@ and no ?api-key=… in MLflow
        text = re.sub(r"\?[^\s\"']*", "", _CREDENTIALS.sub(r"\1", text))
    return text[:6000]


def _now_ms() -> int:
    return int(time.time() * 1000)
