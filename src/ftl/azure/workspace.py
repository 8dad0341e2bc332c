"""Which Azure ML workspace, with which credential: the one place ftl builds an ``MLClient``.

The workspace comes from flags, then ``AZURE_SUBSCRIPTION_ID`` / ``AZURE_RESOURCE_GROUP`` /
``AZUREML_WORKSPACE_NAME``, then ``.azureml/config.json`` (or ``config.json``) in the current
folder or above it, as ``az ml`` and the SDK look for it. The credential is azure-identity's
``DefaultAzureCredential`` (an ``az login``, a managed identity, or the AZURE_* environment); no
key is ever written to a file. azure-ai-ml is imported only here and in :mod:`ftl.azure.jobs`,
so nothing else needs the ``[azure]`` extra.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ftl.errors import ConfigError, FtlError

ENV = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME")
CONFIG_NAMES = (Path(".azureml") / "config.json", Path("config.json"))
HOW = ("pass --subscription, --resource-group and --workspace; or export AZURE_SUBSCRIPTION_ID, "
       "AZURE_RESOURCE_GROUP and AZUREML_WORKSPACE_NAME; or download the workspace's config.json to "
       ".azureml/config.json")


class AzureError(FtlError):
    """Azure ML refused or failed something; the service's own message is kept."""


@dataclass(frozen=True)
class WorkspaceRef:
    subscription_id: str
    resource_group: str
    workspace_name: str
    source: str  # where the settings came from, for `ftl azure check`


def resolve_workspace(subscription: str | None = None, resource_group: str | None = None,
                      workspace: str | None = None, *, start: Path | None = None,
                      required: bool = True) -> WorkspaceRef | None:
    """The workspace, or (``required=False``, for a dry run) None when none is given."""
    if subscription and resource_group and workspace:
        return WorkspaceRef(subscription, resource_group, workspace, "flags")
    env = [os.environ.get(name) for name in ENV]
    values = [subscription or env[0], resource_group or env[1], workspace or env[2]]
    if all(values):
        return WorkspaceRef(*values, "flags and environment" if any((subscription, resource_group, workspace))
                            else "environment")
    found = _config_file(start or Path.cwd())
    if found:
        try:
            data = json.loads(found.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"unreadable workspace config: {exc}", str(found), HOW) from None
        from_file = [data.get("subscription_id"), data.get("resource_group"), data.get("workspace_name")]
        values = [v or f for v, f in zip(values, from_file)]
        if all(values):
            return WorkspaceRef(*values, str(found))
    missing = [flag for flag, value in zip(("--subscription", "--resource-group", "--workspace"), values)
               if not value]
    if not required:
        return None
    raise ConfigError(f"no Azure ML workspace given ({', '.join(missing)} missing)", None, HOW)


def _config_file(start: Path) -> Path | None:
    for folder in [start, *start.resolve().parents]:
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def credential():
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise ConfigError("Azure needs the [azure] extra", None, 'pip install -e ".[azure]"') from None
    return DefaultAzureCredential()


def ml_client(ref: WorkspaceRef, cred=None, **kwargs):
    """An ``MLClient`` for the workspace. ``kwargs`` reach azure-core (``transport=``, ``retry_total=``…):
    transient 5xx/429 answers are retried by azure-core's RetryPolicy."""
    try:
        from azure.ai.ml import MLClient
    except ImportError:
        raise ConfigError("Azure ML needs the [azure] extra (azure-ai-ml)", None, 'pip install -e ".[azure]"') from None
    kwargs.setdefault("enable_telemetry", False)
    kwargs.setdefault("show_progress", False)
    return MLClient(cred or credential(), ref.subscription_id, ref.resource_group, ref.workspace_name, **kwargs)


def service_error(exc: BaseException, doing: str) -> FtlError:
    """One line for an Azure failure: the service's own message, and what to do."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    if isinstance(exc, ClientAuthenticationError):
        return AzureError(f"Azure sign-in failed while {doing}", "DefaultAzureCredential",
                          "run `az login`, or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET, or use a "
                          "managed identity")
    if isinstance(exc, HttpResponseError):
        error = getattr(exc, "error", None)
        code = getattr(error, "code", None) or getattr(exc, "status_code", "")
        message = getattr(error, "message", None) or str(exc).strip().splitlines()[0]
        return AzureError(f"Azure ML refused {doing}: ({code}) {message}", None,
                          "read the service's message above; quota and VM sizes are set in the Azure portal")
    return AzureError(f"{doing} failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}", None,
                      "run `ftl azure check` to test the workspace and credential")


def check(ref: WorkspaceRef, cred=None, **kwargs) -> list[tuple[str, str]]:
    """(what, result) lines for `ftl azure check`: the settings, the credential, the workspace, the computes.
    A failure raises with the fix."""
    lines = [("workspace settings", f"{ref.workspace_name} in {ref.resource_group} (subscription "
                                    f"{ref.subscription_id}), from {ref.source}")]
    cred = cred or credential()
    try:
        cred.get_token("https://management.azure.com/.default")
    except Exception as exc:  # noqa: BLE001
        raise service_error(exc, "getting a token") from None
    lines.append(("credential", type(cred).__name__ + " gave a token for Azure Resource Manager"))
    ml = ml_client(ref, cred, **kwargs)
    try:
        ws = ml.workspaces.get(ref.workspace_name)
    except Exception as exc:  # noqa: BLE001
        raise service_error(exc, f"reading workspace {ref.workspace_name}") from None
    lines.append(("workspace", f"{ws.name} in {ws.location}; MLflow tracking URI {ws.mlflow_tracking_uri or '—'}"))
    try:
        computes = list(ml.compute.list())
    except Exception as exc:  # noqa: BLE001
        raise service_error(exc, "listing computes") from None
    described = [f"{c.name} ({c.type}, {getattr(c, 'size', None) or '?'}, max {getattr(c, 'max_instances', '?')} nodes)"
                 for c in computes]
    lines.append(("computes", "; ".join(described) if described else "none: create a GPU cluster in the studio"))
    return lines
