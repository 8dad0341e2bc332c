"""``ftl register`` and ``ftl deploy --target azureml``: an ftl int4 export as a model asset, served
by a managed online endpoint on a CPU instance (CPU is the point of int4).

:func:`prepare` writes, beside the export (``<export>.deploy/``), what ``az ml`` takes and checks
it with the SDK's loaders: ``model.yml`` (the export folder as a ``custom_model`` asset, named by
content hash), ``endpoint.yml`` (key auth), ``deployment.yml`` (CPU instance, generous probes:
the model loads in seconds but the image pulls for minutes), ``score/score.py``
(:mod:`ftl.azure.score`, onnxruntime-genai only), ``environment/conda.yml``,
``sample-request.json`` and ``az.sh``. :func:`deploy` does the same through azure-ai-ml.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from ftl import manifest
from ftl.azure.jobs import _call, listed_image
from ftl.azure.workspace import WorkspaceRef
from ftl.errors import ConfigError, ModelNotFoundError

# Azure ML's CPU inference base image (it runs azureml-inference-server-http), pinned in images.json.
DEFAULT_IMAGE = listed_image("deploy")
DEFAULT_INSTANCE = "Standard_DS3_v2"
# One request at a time per instance, for at most 90 s: score.py stops generating REQUEST_MARGIN_S
# before that (FTL_DEADLINE_S) and at FTL_MAX_NEW_TOKENS, so one request cannot hold the only slot
# after its client has given up.
REQUEST_TIMEOUT_MS = 90_000
REQUEST_MARGIN_S = 10
DEFAULT_MAX_NEW_TOKENS = 512
# The scoring server the image runs score.py under; 1.5.1 is the version ftl's score.py is written for.
SERVER = "azureml-inference-server-http==1.5.1"
# ftl's inference engine as score.py imports it (score/ftl/): the code ftl generate and ftl serve run,
# which needs onnxruntime-genai, pydantic and jinja2 but nothing of the training stack.
ENGINE_FILES = ("__init__.py", "errors.py", "system.py", "manifest.py", "chat.py", "lazy.py", "generate/__init__.py",
                "generate/engine.py")
SAMPLE = {"messages": [{"role": "user", "content": "What can you help me with?"}], "max_new_tokens": 128}


@dataclass
class DeployPrepared:
    folder: Path
    model_name: str
    endpoint: str
    deployment: str


def model_name(export: Path) -> str:
    digest = manifest.sha256_dir(export)[:12]
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(export).resolve().name)[:40].strip("-") or "export"
    return f"ftl-{stem}-{digest}"


def prepare(export: Path, endpoint: str, *, deployment: str = "blue", instance_type: str = DEFAULT_INSTANCE,
            instance_count: int = 1, image: str = DEFAULT_IMAGE, workspace: WorkspaceRef | None = None,
            threads: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> DeployPrepared:
    export = Path(export)
    if not (export / "genai_config.json").is_file():
        raise ModelNotFoundError("not an ftl export (no genai_config.json)", str(export),
                                 "give the folder ftl export-onnx wrote")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]", endpoint):
        raise ConfigError(f"endpoint name {endpoint!r} is not valid for Azure ML", "--endpoint",
                          "3-32 letters, digits and dashes, starting with a letter")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})", "--max-new-tokens",
                          f"pass a positive number (default {DEFAULT_MAX_NEW_TOKENS})")
    folder = export.with_name(export.name + ".deploy")
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "score").mkdir(parents=True)
    (folder / "environment").mkdir()
    shutil.copy2(Path(__file__).with_name("score.py"), folder / "score" / "score.py")
    package = Path(__file__).resolve().parents[1]
    for name in ENGINE_FILES:
        (folder / "score" / "ftl" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / name, folder / "score" / "ftl" / name)
    name = model_name(export)
    (folder / "model.yml").write_text(yaml.safe_dump({
        "$schema": "https://azuremlschemas.azureedge.net/latest/model.schema.json",
        "name": name, "version": "1", "type": "custom_model", "path": str(export.resolve()),
        "description": "an ftl int4 onnxruntime-genai export (written by ftl)"}, sort_keys=False))
    conda = yaml.safe_dump({
        "name": "ftl-serve", "channels": ["conda-forge"],
        # pydantic and jinja2 as floors: the server pins pydantic~=2.12 itself, and Flask brings jinja2.
        "dependencies": ["python=3.11", "pip", {"pip": [f"onnxruntime-genai=={metadata.version('onnxruntime-genai')}",
                                                        f"onnxruntime=={metadata.version('onnxruntime')}", SERVER,
                                                        "pydantic>=2.6", "jinja2>=3.1"]}]},
        sort_keys=False)
    (folder / "environment" / "conda.yml").write_text(conda)
    (folder / "endpoint.yml").write_text(yaml.safe_dump({
        "$schema": "https://azuremlschemas.azureedge.net/latest/managedOnlineEndpoint.schema.json",
        "name": endpoint, "auth_mode": "key", "description": "ftl int4 model on CPU"}, sort_keys=False))
    probe = {"initial_delay": 30, "period": 10, "timeout": 10, "success_threshold": 1, "failure_threshold": 60}
    (folder / "deployment.yml").write_text(yaml.safe_dump({
        "$schema": "https://azuremlschemas.azureedge.net/latest/managedOnlineDeployment.schema.json",
        "name": deployment, "endpoint_name": endpoint, "model": f"azureml:{name}:1",
        "code_configuration": {"code": "./score", "scoring_script": "score.py"},
        "environment": {"name": environment_name(image, conda), "version": "1", "image": image,
                        "conda_file": "./environment/conda.yml"},
        "instance_type": instance_type, "instance_count": instance_count,
        "environment_variables": {"FTL_THREADS": str(threads or 0), "FTL_MAX_NEW_TOKENS": str(max_new_tokens),
                                  "FTL_DEADLINE_S": str(REQUEST_TIMEOUT_MS // 1000 - REQUEST_MARGIN_S)},
        "request_settings": {"request_timeout_ms": REQUEST_TIMEOUT_MS, "max_concurrent_requests_per_instance": 1},
        "liveness_probe": probe, "readiness_probe": probe}, sort_keys=False))
    (folder / "sample-request.json").write_text(json.dumps(SAMPLE, indent=2) + "\n")
    ws = (f" --subscription {workspace.subscription_id} --resource-group {workspace.resource_group} "
          f"--workspace-name {workspace.workspace_name}") if workspace else ""
    lines = ["#!/usr/bin/env bash", "# The az ml commands ftl deploy would run (written by ftl deploy --dry-run).",
             "set -euo pipefail", 'cd "$(dirname "$0")"',
             f"az ml model show --name {name} --version 1{ws} >/dev/null 2>&1 || az ml model create --file model.yml{ws}",
             f"az ml online-endpoint create --file endpoint.yml{ws}",
             f"az ml online-deployment create --file deployment.yml --all-traffic{ws}",
             f"az ml online-endpoint invoke --name {shlex.quote(endpoint)} --request-file sample-request.json{ws}"]
    (folder / "az.sh").write_text("\n".join(lines) + "\n")
    (folder / "az.sh").chmod(0o755)
    check(folder)
    return DeployPrepared(folder, name, endpoint, deployment)


def environment_name(image: str, conda: str) -> str:
    """Named by the image and the requirements: a changed image (or pin) builds a new environment,
    never a new build under a name the workspace already holds."""
    return "ftl-serve-env-" + hashlib.sha256((image + "\n" + conda).encode()).hexdigest()[:12]


def check(folder: Path) -> None:
    try:
        from azure.ai.ml import load_model, load_online_deployment, load_online_endpoint
    except ImportError:
        raise ConfigError("Azure ML needs the [azure] extra (azure-ai-ml)", None, 'pip install -e ".[azure]"') from None
    for loader, name in ((load_model, "model.yml"), (load_online_endpoint, "endpoint.yml"),
                         (load_online_deployment, "deployment.yml")):
        try:
            loader(source=str(folder / name))
        except Exception as exc:  # noqa: BLE001 — a bug in ftl's YAML, said in one line
            raise ConfigError(f"the written YAML does not load: {str(exc).strip().splitlines()[0][:300]}",
                              str(folder / name), "report this as an ftl bug") from None


def register(ml, prepared: DeployPrepared) -> str:
    """The export as a model asset (uploaded once: the name is its content hash); its id."""
    from azure.ai.ml import load_model
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return ml.models.get(prepared.model_name, version="1").id
    except ResourceNotFoundError:
        model = _call(lambda: ml.models.create_or_update(load_model(source=str(prepared.folder / "model.yml"))),
                      "registering the model")
        return model.id


def deploy(ml, prepared: DeployPrepared) -> dict:
    """Model, endpoint, deployment (long-running creates), then all traffic to the deployment."""
    from azure.ai.ml import load_online_deployment, load_online_endpoint

    model_id = register(ml, prepared)
    endpoint = _call(lambda: ml.online_endpoints.begin_create_or_update(
        load_online_endpoint(source=str(prepared.folder / "endpoint.yml"))).result(), "creating the endpoint")
    _call(lambda: ml.online_deployments.begin_create_or_update(
        load_online_deployment(source=str(prepared.folder / "deployment.yml"))).result(), "creating the deployment")
    endpoint.traffic = {prepared.deployment: 100}
    endpoint = _call(lambda: ml.online_endpoints.begin_create_or_update(endpoint).result(), "routing the traffic")
    return {"model": model_id, "endpoint": prepared.endpoint, "deployment": prepared.deployment,
            "scoring_uri": getattr(endpoint, "scoring_uri", None), "traffic": dict(endpoint.traffic or {})}
