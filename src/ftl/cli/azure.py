"""``ftl azure check``, ``ftl register`` and ``ftl deploy``."""

from __future__ import annotations

from pathlib import Path

import click

from ftl.azure.deploy import DEFAULT_INSTANCE, DEFAULT_MAX_NEW_TOKENS
from ftl.cli.base import workspace_options
from ftl.progress import console


@click.group()
def azure() -> None:
    """Azure ML: check the workspace and credential ftl would use (needs the [azure] extra)."""


@azure.command("check")
@workspace_options
def check_command(subscription: str | None, resource_group: str | None, workspace: str | None) -> None:
    """Report the workspace settings, the credential, the workspace and its computes, a line each."""
    from ftl.azure.workspace import check, resolve_workspace

    for what, result in check(resolve_workspace(subscription, resource_group, workspace)):
        console.print(f"[green]✓[/] {what}: {result}", highlight=False)


@click.command("register")
@click.argument("export", type=click.Path(exists=True, file_okay=False, path_type=Path))
@workspace_options
def register_command(export: Path, subscription, resource_group, workspace) -> None:
    """Register an ftl export folder as an Azure ML model asset (named by its content hash)."""
    from ftl.azure import deploy
    from ftl.azure.workspace import ml_client, resolve_workspace

    ref = resolve_workspace(subscription, resource_group, workspace)
    prepared = deploy.prepare(export, "ftl-register", workspace=ref)
    model_id = deploy.register(ml_client(ref), prepared)
    console.print(f"[green]✓[/] model {prepared.model_name}:1 → {model_id}", highlight=False)


@click.command("deploy")
@click.argument("export", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(["azureml", "local"]), default="azureml", show_default=True,
              help="azureml: a managed online endpoint; local: the same score.py under azureml-inference-server-http "
                   "on 127.0.0.1, to try before paying.")
@click.option("--endpoint", help="azureml: the endpoint name (3-32 letters, digits, dashes).")
@click.option("--deployment", default="blue", show_default=True, help="The deployment name; it gets all traffic.")
@click.option("--instance-type", default=DEFAULT_INSTANCE, show_default=True, help="A CPU VM size.")
@click.option("--instance-count", type=int, default=1, show_default=True)
@click.option("--threads", type=int, help="onnxruntime-genai threads per instance (default: the VM's cores).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS, show_default=True,
              help="The most tokens one request may generate (a larger ask gets this many): an instance serves "
                   "one request at a time.")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True,
              help="local: the port on 127.0.0.1 (the server's own default).")
@click.option("--dry-run", is_flag=True, help="Write endpoint.yml, deployment.yml, model.yml, score/, "
                                              "sample-request.json and az.sh into <export>.deploy/; create nothing.")
@workspace_options
def deploy_command(export: Path, target: str, endpoint: str | None, deployment: str, instance_type: str,
                   instance_count: int, threads: int | None, max_new_tokens: int, port: int, dry_run: bool,
                   subscription, resource_group, workspace) -> None:
    """Serve an ftl int4 export from an Azure ML managed online endpoint on CPU (key auth), or
    (--target local) from the same score.py on this machine."""
    from ftl.azure import deploy
    from ftl.azure.workspace import ml_client, resolve_workspace
    from ftl.errors import ConfigError

    if target == "local":
        _serve_locally(export, endpoint or "ftl-local", deployment, threads, max_new_tokens, port)
        return
    if not endpoint:
        raise ConfigError("--target azureml needs an endpoint name", "--endpoint",
                          "pass --endpoint NAME (3-32 letters, digits, dashes)")
    ref = resolve_workspace(subscription, resource_group, workspace, required=not dry_run)
    prepared = deploy.prepare(export, endpoint, deployment=deployment, instance_type=instance_type,
                              instance_count=instance_count, threads=threads, max_new_tokens=max_new_tokens,
                              workspace=ref)
    if dry_run:
        console.print(f"[green]✓[/] written, nothing created: {prepared.folder} (run it with bash "
                      f"{prepared.folder / 'az.sh'})", highlight=False)
        return
    done = deploy.deploy(ml_client(ref), prepared)
    console.print(f"[green]✓[/] {done['endpoint']}/{done['deployment']} serves {prepared.model_name}: "
                  f"{done['scoring_uri']} (keys: az ml online-endpoint get-credentials -n {done['endpoint']})",
                  highlight=False)


def _serve_locally(export: Path, endpoint: str, deployment: str, threads: int | None, max_new_tokens: int,
                   port: int) -> None:
    """The deployment's score.py under azureml-inference-server-http in its own environment (see
    ftl.azure.local), in the foreground until Ctrl-C or SIGTERM."""
    import os
    import signal
    import socket
    import subprocess

    from ftl.azure import deploy, local
    from ftl.errors import ConfigError

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"port {port} on 127.0.0.1 is in use", "--port", "pass another --port") from None
    prepared = deploy.prepare(export, endpoint, deployment=deployment, threads=threads, max_new_tokens=max_new_tokens)
    python = local.ensure_env(local.server_requirements(prepared.folder),
                              say=lambda line: console.print(line, highlight=False))
    models = local.model_dir(export, prepared.folder, prepared.model_name)
    # The deployment's own settings (the token cap, the deadline), as Azure ML would set them.
    env = {**os.environ, **local.deployment_environment(prepared.folder), "FTL_THREADS": str(threads or os.cpu_count() or 1)}
    url = f"http://127.0.0.1:{port}"
    console.print(f"[green]✓[/] score.py of {prepared.folder} under azureml-inference-server-http: POST {url}/score, "
                  f"liveness GET {url}/ (Ctrl-C stops it)\n  try: curl -s {url}/score -H 'Content-Type: "
                  f"application/json' -d @{prepared.folder / 'sample-request.json'}", highlight=False, soft_wrap=True)
    server = subprocess.Popen(local.command(python, prepared.folder, models, port), env=env)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        code = server.wait()
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise ConfigError(f"the scoring server stopped with exit code {code}", str(prepared.folder / "score"),
                          "see its log lines above")
