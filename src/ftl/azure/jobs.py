"""``ftl finetune --target azureml``: the same fine-tune as an Azure ML command job.

:func:`prepare` writes everything the job needs into a folder beside the output
(``<output>.azureml/``), in the forms ``az ml`` takes, and checks the YAML with the SDK's own
loaders (``load_job``, ``load_environment``):

- ``job.yml``: a CLI v2 command job that installs ftl from its wheel and runs ``ftl finetune
  --config finetune.json``; ``az ml job create -f job.yml`` runs it;
- ``environment/``: ``environment.yml`` (an ACPT PyTorch GPU image plus ftl's pinned
  requirements, named by their content hash) and ``conda.yml``;
- ``code/``: ftl's wheel and ``finetune.json`` (the validated settings, typed, as the job reads them;
  the working folder of the job); ``code_manifest.json``: its files and hashes;
- ``az.sh``: the ``az ml`` commands, data assets first.

The training data (and a local base model) become data assets named by content hash
(``ftl-data-<sha12>``), so a second job with the same data uploads nothing. :func:`submit` does
through azure-ai-ml what ``az.sh`` does, then polls the job. Inside the job, Azure ML sets
``MLFLOW_TRACKING_URI`` and ``MLFLOW_RUN_ID``: ftl's finetune run logs to the workspace, nested
under the job's run (:mod:`ftl.tracking`). Downloading outputs and reading logs go through
:class:`Transfer`, the one seam between ftl and what azure-core's transport does not carry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ftl import manifest
from ftl.azure.workspace import AzureError, WorkspaceRef, service_error
from ftl.errors import ConfigError, ModelNotFoundError

IMAGES = Path(__file__).with_name("images.json")


def listed_image(use: str) -> str:
    """The base image ftl names for ``use`` ("job", "deploy"): pinned to a tag Azure published, from
    images.json, which records where each tag comes from (a name that does not exist fails only on
    the workspace, after the uploads)."""
    entry = next(e for e in json.loads(IMAGES.read_text())["images"] if e["use"] == use)
    return f"{entry['name']}:{entry['tag']}"


# A curated Azure ML image with PyTorch, CUDA and the Azure ML runtime bits (ACPT); ftl's pinned
# requirements go on top (torch==2.13.0 from PyPI is the CUDA build on Linux).
DEFAULT_IMAGE = listed_image("job")
OUTPUT = "finetune"
QUEUED = {"NotStarted", "Queued", "Preparing", "Starting", "Provisioning"}
RUNNING = {"Running", "Finalizing", "CancelRequested"}
TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding", "Paused"}


@dataclass
class Asset:
    input_name: str
    name: str
    path: Path
    type: str  # uri_file or uri_folder

    @property
    def ref(self) -> str:
        return f"azureml:{self.name}:1"


@dataclass
class Prepared:
    folder: Path
    job_yml: Path
    environment_yml: Path
    environment_name: str
    assets: list[Asset]
    job_name: str
    command: str
    hub_model: str | None = None  # a Hub id the job downloads itself (checked before submitting)


@dataclass
class SweepSpec:
    """An Azure ML sweep job over ftl finetune: a grid of choices (``${{search_space.<name>}}`` in the
    trial's KEY=VALUE arguments), the MLflow metric the trainer logs as the objective, and a Bandit policy that
    stops trials falling behind."""

    search_space: dict[str, list]
    primary_metric: str = "eval_loss"
    max_concurrent: int = 4
    trial_timeout_s: int = 24 * 3600

    def job(self, command_job: dict, compute: str) -> dict:
        trials = 1
        for values in self.search_space.values():
            trials *= len(values)
        return {
            "$schema": "https://azuremlschemas.azureedge.net/latest/sweepJob.schema.json",
            "type": "sweep",
            "name": command_job["name"],
            "display_name": command_job["display_name"].replace("ftl finetune", "ftl sweep"),
            "experiment_name": command_job["experiment_name"],
            "description": "ftl sweep as an Azure ML sweep job; each trial is ftl finetune (written by ftl)",
            "compute": f"azureml:{compute}",
            "sampling_algorithm": "grid",
            "search_space": {name: {"type": "choice", "values": values} for name, values in self.search_space.items()},
            "objective": {"primary_metric": self.primary_metric, "goal": "minimize"},
            "early_termination": {"type": "bandit", "slack_factor": 0.1, "evaluation_interval": 1,
                                  "delay_evaluation": 2},
            "limits": {"max_total_trials": trials, "max_concurrent_trials": min(trials, self.max_concurrent),
                       "timeout": trials * self.trial_timeout_s, "trial_timeout": self.trial_timeout_s},
            "inputs": command_job["inputs"],
            "outputs": command_job["outputs"],
            "trial": {"code": command_job["code"], "command": command_job["command"],
                      "environment": command_job["environment"]},
        }


@dataclass
class Submitted:
    name: str
    status: str
    studio_url: str | None = None
    downloaded: Path | None = None
    polls: int = 0


def staging_folder(output: Path) -> Path:
    """Where the job's files go: beside the output folder, which the job's result later fills."""
    output = Path(output)
    return output.with_name(output.name + ".azureml")


def prepare(config, overrides: list[str] | tuple[str, ...] = (), *, compute: str, instance_count: int = 1,
            gpus_per_node: int = 1, image: str = DEFAULT_IMAGE, experiment: str = "ftl",
            workspace: WorkspaceRef | None = None, wheel: Path | None = None,
            sweep: "SweepSpec | None" = None) -> Prepared:
    """Write the job's folder and check it with the SDK's loaders. The job ships the validated
    settings as ``code/finetune.json`` and runs ``ftl finetune --config finetune.json`` with the model,
    data and output as job inputs; ``overrides`` are ``KEY=VALUE`` arguments after it (a sweep's
    ``r=${{search_space.r}}``). With ``sweep``, the job is an Azure ML sweep job whose trial is that
    command (see :class:`SweepSpec`)."""
    from ftl.finetune.config import CONFIG_FILE, settings
    from ftl.models import resolve_model

    folder = staging_folder(config.output)
    _clear_keeping_record(folder)
    (folder / "environment").mkdir(parents=True)
    (folder / "code").mkdir()
    assets = [_asset(f"data_{i}", path, "uri_file", "data") for i, path in enumerate(config.data_files)]
    assets += [_asset(f"val_{i}", path, "uri_file", "data") for i, path in enumerate(config.val_data or [])]
    model_arg = config.model
    try:
        model_dir = resolve_model(config.model)
    except ModelNotFoundError:
        given = Path(config.model)
        if given.is_absolute() or given.parent.is_dir() and str(given.parent) != "." or len(given.parts) != 2:
            raise  # a local path that is not there (a Hub id is exactly org/name)
        model_dir = None  # a Hub id: the job downloads it itself
    if model_dir is not None:
        from ftl.models import model_identity

        digest = model_identity(model_dir)["sha256"]
        assets.append(Asset("model", f"ftl-model-{digest[:12]}", Path(model_dir).resolve(), "uri_folder"))
        model_arg = "${{inputs.model}}"
    wheel = wheel or build_wheel(folder / "code")
    if wheel.parent != folder / "code":
        shutil.copy2(wheel, folder / "code" / wheel.name)
    (folder / "code" / CONFIG_FILE).write_text(json.dumps(settings(config), indent=2) + "\n")
    env_name = _write_environment(folder / "environment", image)
    job_name = f"ftl-{'sweep' if sweep else 'finetune'}-{re.sub(r'[^a-z0-9-]', '-', Path(config.output).name.lower())[:40]}-" \
               f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d%H%M%S')}"
    data = " ".join(f"--data ${{{{inputs.{a.input_name}}}}}" for a in assets if a.input_name.startswith("data_"))
    val = " ".join(f"--val-data ${{{{inputs.{a.input_name}}}}}" for a in assets if a.input_name.startswith("val_"))
    distributed = sweep is None and instance_count * gpus_per_node > 1
    command = " ".join(part for part in (
        f"pip install --no-deps {wheel.name} &&", launcher(instance_count, gpus_per_node) if distributed else "",
        f"ftl finetune --config {CONFIG_FILE}", f"--model {shlex.quote(model_arg) if model_dir is None else model_arg}",
        data, val, f"--output ${{{{outputs.{OUTPUT}}}}}", f"--experiment {shlex.quote(experiment)}",
        " ".join(map(shlex.quote, overrides))) if part)
    job = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
        "type": "command",
        "name": job_name,
        "display_name": f"ftl finetune {Path(config.output).name}",
        "experiment_name": experiment,
        "description": "ftl finetune as an Azure ML job (written by ftl; `az ml job create -f job.yml` runs it)",
        "code": "./code",
        "command": command,
        "environment": f"azureml:{env_name}:1",
        "compute": f"azureml:{compute}",
        "inputs": {a.input_name: {"type": a.type, "path": a.ref} for a in assets},
        "outputs": {OUTPUT: {"type": "uri_folder", "mode": "rw_mount"}},
        "resources": {"instance_count": instance_count},
        "environment_variables": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"},
    }
    if sweep is not None:
        job = sweep.job(job, compute)
    elif distributed:
        # One launcher per node (Azure ML sets MASTER_ADDR/MASTER_PORT/NODE_RANK for the PyTorch distribution);
        # torchrun starts a process per GPU, so the wheel is installed once per node, not once per GPU.
        job["distribution"] = {"type": "pytorch", "process_count_per_instance": 1}
    job_yml = folder / "job.yml"
    job_yml.write_text(yaml.safe_dump(job, sort_keys=False, width=1000))
    (folder / "code_manifest.json").write_text(json.dumps(
        {str(p.relative_to(folder / "code")): manifest.sha256_file(p) for p in sorted((folder / "code").rglob("*"))
         if p.is_file()}, indent=2) + "\n")
    _write_az_sh(folder / "az.sh", assets, env_name, workspace)
    prepared = Prepared(folder, job_yml, folder / "environment" / "environment.yml", env_name, assets, job_name,
                        command, hub_model=config.model if model_dir is None else None)
    check(prepared)
    return prepared


def _clear_keeping_record(folder: Path) -> None:
    """Empty the staging folder but for the record of the job submitted from it (:data:`JOB_RECORD`):
    a re-run after an interrupted wait must find that job, not submit a second one."""
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.name != JOB_RECORD:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def launcher(nodes: int, per_node: int) -> str:
    """torchrun for ``nodes`` × ``per_node`` processes, from the variables Azure ML's PyTorch
    distribution sets on each node (defaults for a single node, where it may set none)."""
    return (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --node-rank ${{NODE_RANK:-0}} "
            "--master-addr ${MASTER_ADDR:-127.0.0.1} --master-port ${MASTER_PORT:-29500} --no-python")


def _asset(input_name: str, path: Path, kind: str, prefix: str) -> Asset:
    path = Path(path).resolve()
    digest = manifest.sha256_file(path) if path.is_file() else manifest.sha256_dir(path)
    return Asset(input_name, f"ftl-{prefix}-{digest[:12]}", path, kind)


def requirements() -> list[str]:
    """ftl's own pinned requirements (no extras), as its installed metadata states them."""
    from importlib import metadata

    return [r for r in metadata.requires("ftl") or [] if "extra ==" not in r]


def _write_environment(folder: Path, image: str) -> str:
    conda = {"name": "ftl", "channels": ["conda-forge"],
             "dependencies": ["python=3.11", "pip", {"pip": requirements()}]}
    text = yaml.safe_dump(conda, sort_keys=False)
    (folder / "conda.yml").write_text(text)
    name = "ftl-env-" + hashlib.sha256((image + "\n" + text).encode()).hexdigest()[:12]
    (folder / "environment.yml").write_text(yaml.safe_dump({
        "$schema": "https://azuremlschemas.azureedge.net/latest/environment.schema.json",
        "name": name, "version": "1", "image": image, "conda_file": "conda.yml",
        "description": "ftl's pinned requirements on an ACPT PyTorch GPU image; named by their content hash"},
        sort_keys=False))
    return name


def _write_az_sh(path: Path, assets: list[Asset], env_name: str, workspace: WorkspaceRef | None) -> None:
    ws = (f" --subscription {workspace.subscription_id} --resource-group {workspace.resource_group} "
          f"--workspace-name {workspace.workspace_name}") if workspace else ""
    lines = ["#!/usr/bin/env bash", "# The az ml commands ftl would run (written by ftl finetune --target azureml --dry-run).",
             "# Without workspace flags, az uses `az configure --defaults group=… workspace=…`.",
             "set -euo pipefail", 'cd "$(dirname "$0")"']
    for a in assets:
        lines.append(f"az ml data show --name {a.name} --version 1{ws} >/dev/null 2>&1 || "
                     f"az ml data create --name {a.name} --version 1 --type {a.type} --path {shlex.quote(str(a.path))}{ws}")
    lines.append(f"az ml environment show --name {env_name} --version 1{ws} >/dev/null 2>&1 || "
                 f"az ml environment create --file environment/environment.yml{ws}")
    lines.append(f"az ml job create --file job.yml{ws}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)


def check(prepared: Prepared) -> None:
    """The written YAML loads with the SDK's own loaders (as ``az ml`` would read it)."""
    try:
        from azure.ai.ml import load_environment, load_job
    except ImportError:
        raise ConfigError("Azure ML needs the [azure] extra (azure-ai-ml)", None, 'pip install -e ".[azure]"') from None
    for loader, path in ((load_job, prepared.job_yml), (load_environment, prepared.environment_yml)):
        try:
            loader(source=str(path))
        except Exception as exc:  # noqa: BLE001 — a bug in ftl's YAML, said in one line
            raise ConfigError(f"the written YAML does not load: {str(exc).strip().splitlines()[0][:300]}", str(path),
                              "report this as an ftl bug") from None


def build_wheel(dest: Path) -> Path:
    """ftl's wheel (pip wheel . --no-deps), which ships olive_configs/ as ftl.olive_configs."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():  # installed from a wheel: no source tree to build from
        raise ConfigError("ftl is not installed from a source tree, so its wheel cannot be built", str(root),
                          "install ftl with pip install -e . from a clone, or pass the wheel")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", tmp, str(root)], capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"building ftl's wheel failed: {done.stderr.strip().splitlines()[-1:]}", str(root),
                              "run `pip wheel . --no-deps` to see why")
        built = next(Path(tmp).glob("ftl-*.whl"))
        return Path(shutil.copy2(built, dest / built.name))


# -- submission ------------------------------------------------------------------------------------


class Transfer:
    """What azure-core's transport does not carry: job output downloads and log files. The real one
    uses the SDK (blob storage); tests give a local one."""

    def download(self, ml, job_name: str, dest: Path) -> Path:
        with tempfile.TemporaryDirectory() as tmp:
            ml.jobs.download(job_name, download_path=tmp, output_name=OUTPUT)
            found = Path(tmp) / "named-outputs" / OUTPUT
            shutil.move(str(found), dest)
        return dest

    def log_tail(self, ml, job_name: str, lines: int = 20) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ml.jobs.download(job_name, download_path=tmp, all=False)
            except Exception:  # noqa: BLE001 — logs are a courtesy on the way to an error
                return []
            logs = sorted(Path(tmp).rglob("std_log*.txt")) or sorted(Path(tmp).rglob("*.txt"))
            return logs[-1].read_text(errors="replace").splitlines()[-lines:] if logs else []


@dataclass
class WaitLimits:
    queue_s: float = 4 * 3600
    run_s: float = 48 * 3600
    poll_s: float = 30.0


def submit(ml, prepared: Prepared, *, wait: bool = True, limits: WaitLimits | None = None,
           transfer: Transfer | None = None, download_to: Path | None = None, compute: str | None = None,
           fingerprint: str | None = None, say: Callable[[str], None] = print) -> Submitted:
    """Create the data assets and environment if missing, submit the job, and (with ``wait``) poll
    it with a heartbeat line until it ends, then download its output into ``download_to``, with the
    job record (:func:`write_job_record`: which job, and ``fingerprint``, the fine-tune as planned here).

    The job's name is recorded in the staging folder as soon as the service has it: a wait that is
    interrupted (Ctrl-C, a polling error, the queue limit) leaves the job running and billing, and the
    next submit of the same plan follows that job instead of submitting a second one."""
    limits, transfer = limits or WaitLimits(), transfer or Transfer()
    if prepared.hub_model:
        check_hub_model(prepared.hub_model, say)
    if compute:
        _check_compute(ml, compute)
    plan = plan_key(prepared, fingerprint)
    result = _earlier_job(ml, prepared.folder, plan, say) or _create(ml, prepared, plan, fingerprint)
    if not wait:
        return result
    try:
        result.status = _wait(ml, result, limits, say)
    except KeyboardInterrupt:
        say(f"job {result.name} goes on in Azure ML: the same command follows it again; "
            f"`ftl jobs cancel {result.name}` stops it")
        raise
    if result.status != "Completed":
        tail = transfer.log_tail(ml, result.name)
        last = " | ".join(line.strip() for line in tail[-5:] if line.strip()) or "no log lines"
        raise AzureError(f"job {result.name} ended {result.status}; last log lines: {last}", result.studio_url,
                         "open the studio link for the full logs")
    if download_to is not None:
        result.downloaded = download_output(ml, result.name, Path(download_to), transfer)
        write_job_record(result.downloaded, result, fingerprint)
        (prepared.folder / JOB_RECORD).unlink(missing_ok=True)  # its output is here: nothing left to follow
    return result


def _create(ml, prepared: Prepared, plan: str, fingerprint: str | None) -> Submitted:
    """Upload what is missing and submit the job; record it at once (see :func:`submit`)."""
    from azure.ai.ml import load_environment, load_job
    from azure.ai.ml.entities import Data
    from azure.core.exceptions import ResourceNotFoundError

    for asset in prepared.assets:
        try:
            ml.data.get(asset.name, version="1")
        except ResourceNotFoundError:
            _call(lambda: ml.data.create_or_update(Data(name=asset.name, version="1", type=asset.type,
                                                        path=str(asset.path))), f"uploading {asset.path.name}")
        except Exception as exc:  # noqa: BLE001
            raise service_error(exc, f"looking up data asset {asset.name}") from None
    try:
        ml.environments.get(prepared.environment_name, version="1")
    except ResourceNotFoundError:
        _call(lambda: ml.environments.create_or_update(load_environment(source=str(prepared.environment_yml))),
              "creating the environment")
    except Exception as exc:  # noqa: BLE001
        raise service_error(exc, "looking up the environment") from None
    spec = load_job(source=str(prepared.job_yml))
    # Recorded before the call, under the name ftl chose: a lost response (a timeout, a reset, Ctrl-C)
    # may still have created the job, and the next run must find it rather than submit a second one.
    write_job_record(prepared.folder, Submitted(spec.name, "Submitting", None), fingerprint, plan)
    job = _call(lambda: ml.jobs.create_or_update(spec), "submitting the job")
    result = Submitted(job.name, _status(job), _studio(job))
    write_job_record(prepared.folder, result, fingerprint, plan)
    return result


def _wait(ml, result: Submitted, limits: WaitLimits, say: Callable[[str], None]) -> str:
    """Poll with a heartbeat line until the job ends; its final status."""
    started, phase_started, phase = time.monotonic(), time.monotonic(), "queued"
    while True:
        try:
            job = _call(lambda: ml.jobs.get(result.name), f"polling job {result.name}")
        except AzureError as error:  # the job itself goes on: say how to get back to it
            raise AzureError(error.what, result.studio_url, f"{error.fix}; the job goes on in Azure ML: run the same "
                             f"command again to follow it, or `ftl jobs cancel {result.name}` to stop it") from None
        result.polls += 1
        status = _status(job)
        now = time.monotonic()
        if status in RUNNING and phase == "queued":
            phase, phase_started = "running", now
        say(f"job {result.name}: {status} ({_clock(now - started)})")
        if status in TERMINAL:
            return status
        limit = limits.queue_s if phase == "queued" else limits.run_s
        if now - phase_started > limit:
            raise AzureError(f"job {result.name} still {status} after {_clock(limit)} ({phase} limit)",
                             result.studio_url, "it goes on in Azure ML: run the same command again to follow it, "
                             f"`ftl jobs cancel {result.name}` to stop it, or raise --queue-timeout / --run-timeout")
        time.sleep(limits.poll_s)


# Ended without an output to collect: a re-run submits a new job rather than follow one of these.
DEAD = {"Failed", "Canceled", "NotResponding", "Paused"}


def plan_key(prepared: Prepared, fingerprint: str | None) -> str:
    """What the job will do, as written: the fine-tune's fingerprint, the job less its name (which
    carries the time of day) and the code it ships (less ftl's wheel, whose zip is not byte-stable)."""
    job = yaml.safe_load(prepared.job_yml.read_text())
    for key in ("name", "display_name"):
        job.pop(key, None)
    code = json.loads((prepared.folder / "code_manifest.json").read_text())
    code = {name: digest for name, digest in code.items() if not name.endswith(".whl")}
    return hashlib.sha256(json.dumps({"fingerprint": fingerprint, "job": job, "code": code},
                                     sort_keys=True).encode()).hexdigest()


def _earlier_job(ml, folder: Path, plan: str, say: Callable[[str], None]) -> Submitted | None:
    """The job submitted earlier from this staging folder, when it is for this plan and not dead:
    submit follows it instead of paying for a second one. One for another plan that still runs is
    said in a line (it bills until it ends)."""
    from azure.core.exceptions import ResourceNotFoundError

    record = job_record(folder)
    name = record.get("job")
    if not name:
        return None
    try:
        job = ml.jobs.get(name)
    except ResourceNotFoundError:
        return None  # another workspace, or deleted
    except Exception as exc:  # noqa: BLE001 — never submit a second job on a guess
        raise service_error(exc, f"looking up job {name}, submitted earlier from {folder}") from None
    status = _status(job)
    if status in DEAD:
        return None
    if record.get("plan") != plan:
        if status not in TERMINAL:
            say(f"note: job {name}, submitted earlier for another plan, is still {status} and billing: "
                f"`ftl jobs cancel {name}` stops it")
        return None
    say(f"job {name} was submitted earlier for this plan and is {status}: following it, not submitting another "
        f"(`ftl jobs cancel {name}` stops it)")
    return Submitted(name, status, _studio(job))


def check_hub_model(model_id: str, say: Callable[[str], None] = print) -> None:
    """A Hub id is downloaded by the job itself, without a token, so a gated or private model is
    refused here, before anything queues. Why no token: azure-ai-ml and ``az ml`` (v2) have no way to
    hand a job a secret (Microsoft's advice, "Use authentication credential secrets in Azure Machine
    Learning jobs", is a Key Vault read inside the job), and a job's environment variables show in its
    definition to everyone who can read the workspace. What works: ``ftl models import`` the model here,
    and it goes to the job as a data asset named by its content hash, which no token is needed for."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode():
        say(f"note: {model_id} is a Hub id and the Hub is offline here (HF_HUB_OFFLINE): whether the job can "
            "download it is not checked")
        return
    api = HfApi()
    try:
        api.auth_check(model_id, token=False)  # as the job will ask: anonymously
        return
    except RepositoryNotFoundError as exc:  # GatedRepoError is one too
        kind = "gated" if isinstance(exc, GatedRepoError) else "private or missing"
    except Exception as exc:  # noqa: BLE001 — the Hub unreachable: the job may still reach it
        say(f"note: could not check {model_id} on the Hub ({type(exc).__name__}); submitting anyway")
        return
    try:
        api.auth_check(model_id)  # with HF_TOKEN or the saved login
    except Exception:  # noqa: BLE001
        raise ModelNotFoundError(f"{model_id} cannot be read from the Hub ({kind})", "--model",
                                 "check the id; for a gated model accept its licence on huggingface.co and set "
                                 "HF_TOKEN, then `ftl models import` it") from None
    raise ConfigError(f"{model_id} is {kind} on the Hub: you can read it, the job could not (an Azure ML job "
                      "gets no HF_TOKEN)", "--model", f"run `ftl models import {model_id}` here and pass the "
                      "imported model: it goes to the job as a data asset")


JOB_RECORD = "azureml_job.json"


def write_job_record(out: Path, submitted: Submitted, fingerprint: str | None = None, plan: str | None = None) -> None:
    """Which job, and the fingerprint of the fine-tune as it was planned here: beside a downloaded job
    output (the job's own manifest has the paths it had inside the job), and in the staging folder
    from submission until then, with the ``plan`` (:func:`plan_key`) a re-run is matched against."""
    record = {"job": submitted.name, "status": submitted.status, "studio_url": submitted.studio_url,
              "fingerprint": fingerprint}
    if plan is not None:
        record["plan"] = plan
    (Path(out) / JOB_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def job_record(out: Path) -> dict:
    path = Path(out) / JOB_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def download_output(ml, job_name: str, final: Path, transfer: Transfer | None = None) -> Path:
    """The job's ``finetune`` output into ``final``: into a fresh sibling first, so the folder is
    replaced only once all of it is here."""
    staging = manifest.staging_folder(final)
    try:
        (transfer or Transfer()).download(ml, job_name, staging / OUTPUT)
        manifest.swap_in(staging / OUTPUT, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# -- ftl jobs status | logs | download | cancel ---------------------------------------------------------


def status(ml, job_name: str) -> dict:
    job = _call(lambda: ml.jobs.get(job_name), f"reading job {job_name}")
    created = getattr(getattr(job, "creation_context", None), "created_at", None)
    return {"name": job.name, "status": _status(job), "compute": getattr(job, "compute", None),
            "experiment": getattr(job, "experiment_name", None), "created": str(created) if created else None,
            "studio_url": _studio(job)}


def cancel(ml, job_name: str) -> dict:
    _call(lambda: ml.jobs.begin_cancel(job_name).result(), f"cancelling job {job_name}")
    return status(ml, job_name)


def logs(ml, job_name: str, lines: int = 200, transfer: Transfer | None = None) -> list[str]:
    _call(lambda: ml.jobs.get(job_name), f"reading job {job_name}")  # an unknown name is the service's 404
    return (transfer or Transfer()).log_tail(ml, job_name, lines)


def download(ml, job_name: str, dest: Path, *, force: bool = False, transfer: Transfer | None = None) -> Path:
    """A finished job's output into ``dest``, by the same rules as every ftl output folder."""
    manifest.check_output(dest, force=force, stage="finetune")
    found = status(ml, job_name)
    if found["status"] != "Completed":
        raise AzureError(f"job {job_name} is {found['status']}, not Completed: nothing to download yet",
                         found["studio_url"], "wait for it (ftl jobs status), or read ftl jobs logs")
    return download_output(ml, job_name, Path(dest), transfer)


def _check_compute(ml, name: str) -> None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        ml.compute.get(name)
    except ResourceNotFoundError:
        try:
            names = sorted(c.name for c in ml.compute.list())
        except Exception:  # noqa: BLE001
            names = []
        raise ConfigError(f"no compute named {name!r} in the workspace", "--compute",
                          f"use one of: {', '.join(names)}" if names else "create a GPU cluster in the studio first") from None
    except Exception as exc:  # noqa: BLE001
        raise service_error(exc, f"looking up compute {name}") from None


def _call(work: Callable, doing: str):
    try:
        return work()
    except (ConfigError, AzureError):
        raise
    except Exception as exc:  # noqa: BLE001 — the service's message, in one line
        raise service_error(exc, doing) from None


def _status(job) -> str:
    """The job's status as the service spells it (the SDK's JobStatus is a str enum; str() of it is
    "JobStatus.COMPLETED" on Python 3.11)."""
    status = job.status
    return str(getattr(status, "value", status))


def _studio(job) -> str | None:
    services = getattr(job, "services", None) or {}
    studio = services.get("Studio") if isinstance(services, dict) else None
    return getattr(studio, "endpoint", None) or getattr(job, "studio_url", None)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
