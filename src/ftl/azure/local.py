"""``ftl deploy --target local``: the managed endpoint's own score.py under the real
azureml-inference-server-http, on 127.0.0.1, before paying for an endpoint.

**Why an environment of its own.** azureml-inference-server-http 1.5.1 pins pydantic~=2.12 and
opentelemetry-sdk 1.33; azure-ai-ml 1.35 (ftl's [azure] extra) needs a newer opentelemetry. They
cannot share one environment, so ftl builds a small virtual environment for the server, once, from
the very pins the deployment's ``environment/conda.yml`` lists (the server, onnxruntime-genai and
onnxruntime at ftl's versions): the local server runs what Azure ML would. It lives in
``$XDG_CACHE_HOME/ftl/envs/azureml-server-<sha12 of the pins>`` (``FTL_SERVER_ENV`` to choose
another folder); a marker file is written last, so an interrupted build is redone.

**The model folder** is laid out as Azure ML mounts it (``AZUREML_MODEL_DIR`` =
``…/azureml-models/<model name>/1``, the export inside it) with symlinks to the export's files, so
nothing is copied and score.py finds the model as it would there.

**127.0.0.1 only.** The server's own ``azmlinfsrv`` binds every interface (``0.0.0.0`` is a
constant in 1.5.1); ftl starts it through the same entry point with that constant set to
127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

import yaml

from ftl.errors import ConfigError

# The server's entry point (azureml_inference_server_http.amlserver.run, what azmlinfsrv runs) with its
# bind address set to loopback before it is imported.
LAUNCHER = ("import sys, azureml_inference_server_http.constants as c; c.DEFAULT_HOST = '127.0.0.1'; "
            "from azureml_inference_server_http.amlserver import run; sys.argv = ['azmlinfsrv', *sys.argv[1:]]; run()")


def server_requirements(deploy_folder: Path) -> list[str]:
    """The pip pins of the deployment's environment (written by :func:`ftl.azure.deploy.prepare`)."""
    conda = yaml.safe_load((Path(deploy_folder) / "environment" / "conda.yml").read_text())
    return next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict) and "pip" in item)


def deployment_environment(deploy_folder: Path) -> dict[str, str]:
    """The environment variables the deployment sets for score.py (written by :func:`ftl.azure.deploy.prepare`)."""
    deployment = yaml.safe_load((Path(deploy_folder) / "deployment.yml").read_text())
    return {key: str(value) for key, value in (deployment.get("environment_variables") or {}).items()}


def env_folder(requirements: list[str]) -> Path:
    if os.environ.get("FTL_SERVER_ENV"):
        return Path(os.environ["FTL_SERVER_ENV"])
    digest = hashlib.sha256("\n".join([sys.version.split()[0], *sorted(requirements)]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ftl" / "envs" / f"azureml-server-{digest}"


def ensure_env(requirements: list[str], say=print) -> Path:
    """The server's virtual environment, built once (a folder without the completion marker, from an
    interrupted build, is built again); returns its python."""
    folder = env_folder(requirements)
    python = folder / "bin" / "python"
    marker = folder / ".ftl-complete"
    if marker.is_file() and python.is_file():
        return python
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "pyvenv.cfg").is_file():
        raise ConfigError("the scoring server's environment folder holds something else", str(folder),
                          "point FTL_SERVER_ENV at an empty or new folder")
    say(f"setting up the scoring server's own environment (once, under a minute): {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ConfigError(f"could not install the scoring server's environment: {last}", " ".join(requirements),
                          "check that pip can reach your package index, then run the command again")
    marker.write_text("\n".join(requirements) + "\n")
    return python


def model_dir(export: Path, deploy_folder: Path, name: str) -> Path:
    """``<deploy>/local/azureml-models/<name>/1/<export name>/``, each file a symlink into the export."""
    version = Path(deploy_folder) / "local" / "azureml-models" / name / "1"
    inside = version / Path(export).resolve().name
    inside.mkdir(parents=True)
    for item in Path(export).resolve().iterdir():
        (inside / item.name).symlink_to(item)
    return version


def command(python: Path, deploy_folder: Path, models: Path, port: int) -> list[str]:
    return [str(python), "-c", LAUNCHER, "--entry_script", str(Path(deploy_folder).resolve() / "score" / "score.py"),
            "--model_dir", str(models.resolve()), "--port", str(port)]
