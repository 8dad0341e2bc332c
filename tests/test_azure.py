"""ftl finetune --target azureml, offline: the real azure-ai-ml SDK against a fake workspace on 127.0.0.1.

MLClient is never mocked: requests go through azure-core's transport to ``azure_fake.FakeAzureML``,
which answers as the REST API and blob storage would. Only ftl's Transfer seam (output download
and log files, which azure-core's transport does not carry) is replaced, by a local one.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("azure.ai.ml", reason="the [azure] extra is not installed")

from azure.ai.ml import load_environment, load_job, load_online_deployment  # noqa: E402
from azure.core.credentials import AccessToken  # noqa: E402
from azure.core.exceptions import ClientAuthenticationError  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from azure_fake import RG, SUB, WS, WS_PREFIX, FakeAzureML, FakeCredential, LocalTransport, patch_all_azure_transports  # noqa: E402
from ftl import manifest  # noqa: E402
from ftl.azure import jobs  # noqa: E402
from ftl.azure.workspace import AzureError, WorkspaceRef, check, ml_client, resolve_workspace  # noqa: E402
from ftl.errors import ConfigError, ModelNotFoundError  # noqa: E402
from ftl.finetune.config import FinetuneConfig  # noqa: E402
from ftl.tracking import TAG_PARENT  # noqa: E402

REF = WorkspaceRef(SUB, RG, WS, "test")


def ftl(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "ftl.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "250", **(env or {})})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return jobs.build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def fake():
    server = FakeAzureML()
    server.start()
    undo = patch_all_azure_transports(server.port)  # the blob clients the SDK builds itself
    yield server
    undo()
    server.stop()


def client(fake):
    return ml_client(REF, FakeCredential(), transport=LocalTransport(fake.port), retry_total=3,
                     retry_backoff_factor=0.01)


class LocalTransfer(jobs.Transfer):
    """The seam, locally: the job's output is a folder this test made; its log is a list of lines."""

    def __init__(self, produced: Path | None = None, log: list[str] | None = None):
        self.produced, self.log = produced, log or []

    def download(self, ml, job_name, dest):
        shutil.copytree(self.produced, dest)
        return dest

    def log_tail(self, ml, job_name, lines=20):
        return self.log[-lines:]


def run_job_command(command: str, inputs: dict[str, Path], out: Path, code: Path, env: dict | None = None):
    """A job's command as Azure ML runs it on a node: in the job's code folder (which holds the
    finetune.json it reads), ${{inputs.*}} / ${{outputs.finetune}} filled with mounted paths, ftl already
    installed (the job pip-installs its wheel first), Azure ML's variables."""
    command = command.split("&&", 1)[1]
    for name, path in inputs.items():
        command = command.replace("${{inputs.%s}}" % name, str(path))
    command = command.replace("${{outputs.finetune}}", str(out))
    return subprocess.run(["bash", "-c", command], cwd=code, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250",
                               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})})


def config(tmp_path, tiny_model, qa_file, **kw):
    return FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / "runs" / "ft", **kw)


def test_dry_run_writes_a_job_that_loads_and_submits_nothing(tmp_path, tiny_model, qa_file):
    result = ftl("finetune", "--target", "azureml", "--compute", "gpu-cluster", "--dry-run", "--model", tiny_model,
                 "--data", qa_file, "--output", "runs/ft", "--lora-r", 8, "--val-split", "0.34", cwd=tmp_path,
                 env={"AZURE_SUBSCRIPTION_ID": "", "AZURE_RESOURCE_GROUP": "", "AZUREML_WORKSPACE_NAME": ""})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "runs" / "ft.azureml"
    job = load_job(source=str(folder / "job.yml"))
    raw = yaml.safe_load((folder / "job.yml").read_text())
    assert raw["compute"] == "azureml:gpu-cluster" and job.compute == "gpu-cluster" and job.resources.instance_count == 1
    assert "distribution" not in raw
    digest = manifest.sha256_file(qa_file)[:12]
    assert raw["inputs"]["data_0"]["path"] == f"azureml:ftl-data-{digest}:1" and job.inputs["model"].type == "uri_folder"
    # The job runs ftl finetune on the validated settings it ships (typed, as JSON), the paths as its inputs.
    assert "ftl finetune --config finetune.json --model ${{inputs.model}} --data ${{inputs.data_0}} --output " \
        "${{outputs.finetune}}" in job.command and "--lora-r" not in job.command
    shipped = json.loads((folder / "code" / "finetune.json").read_text())
    assert shipped["r"] == 8 and shipped["val_split"] == 0.34 and shipped["packing"] is True
    assert not {"model", "data", "val_data", "output", "force"} & set(shipped)
    env = load_environment(source=str(folder / "environment" / "environment.yml"))
    conda = yaml.safe_load((folder / "environment" / "conda.yml").read_text())
    assert raw["environment"] == f"azureml:{env.name}:1" and env.name.startswith("ftl-env-")
    assert "olive-ai==0.13.0" in conda["dependencies"][-1]["pip"]
    files = json.loads((folder / "code_manifest.json").read_text())
    (wheel_name,) = set(files) - {"finetune.json"}
    assert files["finetune.json"] == manifest.sha256_file(folder / "code" / "finetune.json")
    assert re.fullmatch(r"ftl-.*\.whl", wheel_name) and files[wheel_name] == manifest.sha256_file(
        folder / "code" / wheel_name)
    az = (folder / "az.sh").read_text()
    assert f"az ml data create --name ftl-data-{digest} --version 1 --type uri_file" in az
    assert "az ml environment create --file environment/environment.yml" in az and "az ml job create --file job.yml" in az
    assert not (tmp_path / "runs" / "ft").exists()
    # Two nodes of 4 GPUs: a PyTorch distribution with torchrun on each node; qscale (one process) is refused.
    result = ftl("finetune", "--target", "azureml", "--compute", "gpu-cluster", "--dry-run", "--model", tiny_model,
                 "--data", qa_file, "--output", "runs/ft2", "--instance-count", 2, "--gpus-per-node", 4, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = load_job(source=str(tmp_path / "runs" / "ft2.azureml" / "job.yml"))
    assert job.resources.instance_count == 2 and job.distribution.process_count_per_instance == 1
    assert "torchrun --nnodes 2 --nproc-per-node 4 --node-rank ${NODE_RANK:-0}" in job.command
    result = ftl("finetune", "--target", "azureml", "--compute", "gpu-cluster", "--dry-run", "--model", tiny_model,
                 "--data", qa_file, "--output", "runs/ft3", "--gpus-per-node", 2, "--method", "qscale", cwd=tmp_path)
    assert result.returncode == 1 and "qscale trains in one process" in result.stderr


def test_submit_uploads_once_polls_and_downloads_through_the_real_sdk(tmp_path, tiny_model, qa_file, fake, wheel):
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file, r=8), compute="gpu-cluster",
                            instance_count=2, gpus_per_node=2, wheel=wheel)
    produced = tmp_path / "produced"
    produced.mkdir()
    (produced / "manifest.json").write_text("{}")
    said = []
    result = jobs.submit(client(fake), prepared, limits=jobs.WaitLimits(poll_s=0), compute="gpu-cluster",
                         transfer=LocalTransfer(produced), download_to=tmp_path / "runs" / "ft", say=said.append)
    assert result.status == "Completed" and result.polls == 3 and (tmp_path / "runs" / "ft" / "manifest.json").is_file()
    assert [line.split(": ")[1].split(" ")[0] for line in said] == ["Queued", "Running", "Completed"]
    puts = [(m, p.split("?")[0]) for m, h, p in fake.log if m == "PUT" and ".blob." not in h]
    kinds = [re.search(r"/(data|environments|codes|jobs)/", p).group(1) for _, p in puts]
    assert kinds.count("data") == 2 and kinds.count("environments") == 1 and kinds[-1] == "jobs"
    assert any(".blob." in h and m == "PUT" for m, h, _ in fake.log)  # the data really went to (fake) storage
    body = json.loads(fake.bodies[[i for i, (m, h, p) in enumerate(fake.log) if m == "PUT" and "/jobs/" in p][-1]])
    props = body["properties"]
    assert props["computeId"].endswith("/computes/gpu-cluster")
    assert props["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 1}
    assert "torchrun --nnodes 2 --nproc-per-node 2" in props["command"]
    assert props["resources"]["instanceCount"] == 2
    assert props["environmentId"].endswith(f"/environments/{prepared.environment_name}/versions/1")
    assert props["inputs"]["data_0"]["uri"].endswith(f"/data/{prepared.assets[0].name}/versions/1")
    assert "ftl finetune --config finetune.json" in props["command"]
    # A second job with the same data and environment creates neither again (their names are content hashes).
    fake.log.clear()
    jobs.submit(client(fake), prepared, wait=False)
    again = [p.split("?")[0] for m, h, p in fake.log if m == "PUT"]
    assert not [p for p in again if "/data/" in p or "/environments/" in p or "LocalUpload" in p]
    assert again[-1].endswith(f"/jobs/{prepared.job_name}")


def test_no_wait_prints_the_name_and_a_503_is_retried(tmp_path, tiny_model, qa_file, fake, wheel):
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file), [], compute="gpu-cluster", wheel=wheel)
    fake.fail_plan.append({"method": "PUT", "path_re": "/jobs/", "status": 503,
                           "body": {"error": {"code": "ServiceUnavailable", "message": "busy"}}})
    result = jobs.submit(client(fake), prepared, wait=False)
    job_requests = [m for m, h, p in fake.log if "/jobs/" in p]
    assert job_requests == ["PUT", "PUT"] and result.name == prepared.job_name
    assert result.studio_url and result.name in result.studio_url


def test_a_quota_error_is_the_services_message_in_one_line(tmp_path, tiny_model, qa_file, fake, wheel):
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file), [], compute="gpu-cluster", wheel=wheel)
    message = "Not enough quota available for Standard_NC24ads_A100_v4 in eastus. Current usage/limit: 24/24."
    fake.fail_plan.append({"method": "PUT", "path_re": "/jobs/", "status": 400,
                           "body": {"error": {"code": "UserError", "message": message}}})
    with pytest.raises(AzureError) as error:
        jobs.submit(client(fake), prepared)
    assert message in error.value.one_line() and "\n" not in error.value.one_line()


def test_an_unknown_compute_lists_the_ones_that_exist(tmp_path, tiny_model, qa_file, fake, wheel):
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file), [], compute="gpu", wheel=wheel)
    with pytest.raises(ConfigError, match="no compute named 'gpu'.*use one of: cpu-cluster, gpu-cluster"):
        jobs.submit(client(fake), prepared, compute="gpu")
    assert not any("/jobs/" in p for _, _, p in fake.log)


def test_a_failed_job_says_its_last_log_lines_and_studio_link(tmp_path, tiny_model, qa_file, fake, wheel):
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file), [], compute="gpu-cluster", wheel=wheel)
    fake.job_status_sequence = ["Queued", "Running", "Failed"]
    transfer = LocalTransfer(log=["step 1", "Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA"])
    with pytest.raises(AzureError) as error:
        jobs.submit(client(fake), prepared, limits=jobs.WaitLimits(poll_s=0), transfer=transfer)
    line = error.value.one_line()
    assert "ended Failed" in line and "torch.OutOfMemoryError: CUDA" in line and "https://ml.azure.com/runs/" in line


def test_waiting_gives_up_after_the_queue_limit(tmp_path, tiny_model, qa_file, fake, wheel):
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file), [], compute="gpu-cluster", wheel=wheel)
    fake.job_status_sequence = ["Queued"]
    with pytest.raises(AzureError, match="still Queued after .*queued limit"):
        jobs.submit(client(fake), prepared, limits=jobs.WaitLimits(queue_s=0.05, poll_s=0.02))


def _job_puts(fake) -> list[str]:
    return [p.split("?")[0] for m, h, p in fake.log if m == "PUT" and re.search(r"/jobs/[^/]+$", p.split("?")[0])]


@pytest.mark.parametrize("interruption", ["queue limit", "polling error", "ctrl-c"])
def test_an_interrupted_wait_is_followed_again_not_submitted_twice(tmp_path, tiny_model, qa_file, fake, wheel,
                                                                    interruption):
    """The job is recorded as soon as the service has it: after a wait that ended early, the same plan
    follows that job (still billing in Azure ML) to its end and downloads it, and submits nothing."""
    from ftl.finetune.stage import plan

    cfg = config(tmp_path, tiny_model, qa_file)
    fingerprint = plan(cfg).fingerprint
    fake.job_status_sequence = ["Queued"]
    said, limits = [], jobs.WaitLimits(poll_s=0)

    def heartbeat(line):
        said.append(line)
        if interruption == "ctrl-c":
            raise KeyboardInterrupt
        if interruption == "polling error":  # the next poll is refused
            fake.fail_plan.append({"method": "GET", "path_re": "/jobs/", "status": 400,
                                   "body": {"error": {"code": "UserError", "message": "the service had a bad day"}}})

    if interruption == "queue limit":
        limits = jobs.WaitLimits(queue_s=0.05, poll_s=0.02)
    expected = KeyboardInterrupt if interruption == "ctrl-c" else AzureError
    with pytest.raises(expected) as error:
        jobs.submit(client(fake), jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel), limits=limits,
                    transfer=LocalTransfer(), download_to=cfg.output, fingerprint=fingerprint, say=heartbeat)
    (first,) = _job_puts(fake)
    name = first.rsplit("/", 1)[1]
    record = jobs.job_record(jobs.staging_folder(cfg.output))
    assert record.get("job") == name and record["fingerprint"] == fingerprint and not Path(cfg.output).exists()
    assert f"ftl jobs cancel {name}" in (error.value.one_line() if expected is AzureError else said[-1])
    # Again, with the same plan: prepare keeps the record, and submit follows the job to its output.
    fake.job_status_sequence = ["Completed"]
    produced = tmp_path / "produced"
    produced.mkdir()
    (produced / "manifest.json").write_text("{}")
    said.clear()
    result = jobs.submit(client(fake), jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel),
                         limits=jobs.WaitLimits(poll_s=0), transfer=LocalTransfer(produced), download_to=cfg.output,
                         fingerprint=fingerprint, say=said.append)
    assert result.name == name and result.status == "Completed" and _job_puts(fake) == [first]
    assert "submitted earlier for this plan" in said[0] and f"ftl jobs cancel {name}" in said[0]
    assert (Path(cfg.output) / "manifest.json").is_file()
    assert jobs.job_record(cfg.output) == {"job": name, "status": "Completed", "studio_url": result.studio_url,
                                           "fingerprint": fingerprint}
    assert not jobs.job_record(jobs.staging_folder(cfg.output))  # nothing left to follow


def test_a_submission_whose_answer_was_lost_is_followed_not_submitted_again(tmp_path, tiny_model, qa_file, fake,
                                                                            wheel):
    """The service may create the job and the answer never arrive (a read timeout, a reset, Ctrl-C in the
    call): the name ftl chose is recorded before the call, so the next run finds that job."""
    from ftl.finetune.stage import plan

    cfg = config(tmp_path, tiny_model, qa_file)
    fingerprint = plan(cfg).fingerprint
    fake.fail_plan.append({"method": "PUT", "path_re": r"/jobs/[^/]+$", "status": 400, "after": True,
                           "body": {"error": {"code": "UserError", "message": "the answer was lost"}}})
    with pytest.raises(AzureError):
        jobs.submit(client(fake), jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel),
                    limits=jobs.WaitLimits(poll_s=0), transfer=LocalTransfer(), download_to=cfg.output,
                    fingerprint=fingerprint, say=lambda line: None)
    (first,) = _job_puts(fake)
    assert jobs.job_record(jobs.staging_folder(cfg.output))["job"] == first.rsplit("/", 1)[1]
    fake.job_status_sequence = ["Completed"]
    produced = tmp_path / "produced"
    produced.mkdir()
    (produced / "manifest.json").write_text("{}")
    said = []
    result = jobs.submit(client(fake), jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel),
                         limits=jobs.WaitLimits(poll_s=0), transfer=LocalTransfer(produced), download_to=cfg.output,
                         fingerprint=fingerprint, say=said.append)
    assert _job_puts(fake) == [first] and result.name == first.rsplit("/", 1)[1] and result.status == "Completed"
    assert "submitted earlier for this plan" in said[0]


def test_another_plan_says_the_earlier_job_still_runs_and_a_failed_one_is_not_followed(tmp_path, tiny_model, qa_file,
                                                                                      fake, wheel):
    cfg = config(tmp_path, tiny_model, qa_file)
    fake.job_status_sequence = ["Running"]
    first = jobs.submit(client(fake), jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel), wait=False)
    said = []
    jobs.submit(client(fake), jobs.prepare(cfg, ["r=8"], compute="gpu-cluster", wheel=wheel), wait=False,
                say=said.append)
    assert len(_job_puts(fake)) == 2
    assert said == [f"note: job {first.name}, submitted earlier for another plan, is still Running and billing: "
                    f"`ftl jobs cancel {first.name}` stops it"]
    # A job of this plan that failed is not followed: the next run submits a new one.
    fake.job_status_sequence = ["Failed"]
    said.clear()
    jobs.submit(client(fake), jobs.prepare(cfg, ["r=8"], compute="gpu-cluster", wheel=wheel), wait=False,
                say=said.append)
    assert len(_job_puts(fake)) == 3 and not said


class HubAuthCheck:
    """The Hub's /api/models/<id>/auth-check on 127.0.0.1, as huggingface.co answers it for a gated
    model: 401 GatedRepo without a token, 200 with the one the user was granted."""

    def __init__(self, token: str | None):
        import http.server
        import threading

        hub, self.seen = self, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization")
                hub.seen.append((self.path, auth))
                ok = hub.token is None or auth == f"Bearer {hub.token}"
                self.send_response(200 if ok else 401)
                if not ok:
                    self.send_header("X-Error-Code", "GatedRepo")
                body = b"{}" if ok else b'{"error": "Access to model org/gated is restricted."}'
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.token = token
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def checks(self) -> list[tuple[str, str | None]]:
        return [(path, auth) for path, auth in self.seen if path.endswith("/auth-check")]


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub pointed at a local HubAuthCheck, online (its settings are read at import)."""
    from huggingface_hub import constants

    server = HubAuthCheck(token="hf_test_granted_0123456789")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", server.token)
    yield server
    server.server.shutdown()


def test_a_gated_hub_model_is_refused_before_anything_is_submitted(tmp_path, qa_file, fake, wheel, hub):
    """The job downloads a Hub id without a token (an Azure ML job gets no secret): a model the user
    can read only with HF_TOKEN is refused here, not after the queue and the environment build."""
    cfg = FinetuneConfig(model="org/gated", data=qa_file, output=tmp_path / "runs" / "ft")
    prepared = jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel)
    assert prepared.hub_model == "org/gated" and "--model org/gated" in prepared.command
    with pytest.raises(ConfigError, match="org/gated is gated on the Hub.*ftl models import org/gated"):
        jobs.submit(client(fake), prepared, compute="gpu-cluster", wait=False)
    assert not fake.log  # nothing uploaded, nothing queued
    # Asked as the job would (no token), then as you.
    assert hub.checks() == [("/api/models/org/gated/auth-check", None),
                            ("/api/models/org/gated/auth-check", f"Bearer {hub.token}")]
    # Not readable even with the token: the model cannot be read at all.
    hub.token = "someone-else"
    with pytest.raises(ModelNotFoundError, match="org/gated cannot be read from the Hub \\(gated\\)"):
        jobs.submit(client(fake), prepared, wait=False)


def test_a_public_hub_model_is_submitted_and_the_token_goes_nowhere(tmp_path, qa_file, fake, wheel, hub):
    hub.token = None  # public: readable without a token
    cfg = FinetuneConfig(model="org/public", data=qa_file, output=tmp_path / "runs" / "ft")
    prepared = jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel)
    submitted = jobs.submit(client(fake), prepared, compute="gpu-cluster", wait=False)
    assert submitted.name == prepared.job_name and [auth for _, auth in hub.checks()] == [None]
    secret = os.environ["HF_TOKEN"].encode()
    assert not [body for body in fake.bodies if secret in body]  # not in the job, not in any upload
    assert not [p for p in prepared.folder.rglob("*") if p.is_file() and secret in p.read_bytes()]
    props = json.loads(fake.bodies[[i for i, (m, h, p) in enumerate(fake.log) if m == "PUT" and "/jobs/" in p][-1]])
    assert "HF_TOKEN" not in props["properties"].get("environmentVariables", {})


def test_a_hub_id_offline_is_said_unchecked_and_a_missing_folder_stops_before_azure(tmp_path, qa_file, fake, wheel):
    cfg = FinetuneConfig(model="org/some-model", data=qa_file, output=tmp_path / "runs" / "ft")
    said = []
    jobs.submit(client(fake), jobs.prepare(cfg, [], compute="gpu-cluster", wheel=wheel), wait=False,
                say=said.append)  # tests run with HF_HUB_OFFLINE=1
    assert said == ["note: org/some-model is a Hub id and the Hub is offline here (HF_HUB_OFFLINE): whether the job "
                    "can download it is not checked"]
    fake.log.clear()
    missing = FinetuneConfig(model=str(tmp_path / "models" / "gone"), data=qa_file, output=tmp_path / "runs" / "ft2")
    with pytest.raises(ModelNotFoundError):
        jobs.prepare(missing, [], compute="gpu-cluster", wheel=wheel)
    assert not fake.log


def test_workspace_settings_come_from_flags_then_environment_then_config_file(tmp_path, monkeypatch):
    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as error:
        resolve_workspace(start=tmp_path)
    assert all(way in error.value.one_line() for way in ("--subscription", "AZUREML_WORKSPACE_NAME",
                                                         ".azureml/config.json"))
    (tmp_path / ".azureml").mkdir()
    (tmp_path / ".azureml" / "config.json").write_text(json.dumps(
        {"subscription_id": "s-file", "resource_group": "rg-file", "workspace_name": "ws-file"}))
    (tmp_path / "sub").mkdir()
    assert resolve_workspace(start=tmp_path / "sub").workspace_name == "ws-file"
    monkeypatch.setenv("AZUREML_WORKSPACE_NAME", "ws-env")
    found = resolve_workspace(start=tmp_path)
    assert (found.workspace_name, found.resource_group) == ("ws-env", "rg-file")
    assert resolve_workspace("s", "rg", "ws-flag", start=tmp_path).workspace_name == "ws-flag"


def test_azure_check_reports_each_part_and_a_credential_failure_names_az_login(fake):
    lines = dict(check(REF, FakeCredential(), transport=LocalTransport(fake.port)))
    assert "eastus" in lines["workspace"] and "gpu-cluster" in lines["computes"] and "FakeCredential" in lines["credential"]

    class NoSignIn:
        def get_token(self, *scopes, **kwargs):
            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")

    with pytest.raises(AzureError, match="az login"):
        check(REF, NoSignIn(), transport=LocalTransport(fake.port))
    assert isinstance(FakeCredential().get_token("x"), AccessToken)


def test_the_jobs_own_command_runs_here_and_logs_under_the_jobs_run(tmp_path, tiny_model, qa_file, wheel):
    """The command Azure ML runs, with ${{inputs.*}}/${{outputs.*}} as Azure ML fills them and the
    environment it sets (RANK, MLFLOW_TRACKING_URI, MLFLOW_RUN_ID), on the tiny model."""
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file, max_steps=2, batch_size=2), compute="gpu-cluster",
                            wheel=wheel)
    out = tmp_path / "mnt" / "outputs" / "finetune"
    out.mkdir(parents=True)  # Azure ML mounts an empty output folder
    uri = f"sqlite:///{tmp_path / 'workspace-mlflow.db'}"
    job_run = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("job")).info.run_id
    done = run_job_command(prepared.command, {a.input_name: a.path for a in prepared.assets}, out,
                           prepared.folder / "code", {"RANK": "0", "WORLD_SIZE": "1", "MLFLOW_TRACKING_URI": uri,
                                                      "MLFLOW_RUN_ID": job_run, "AZUREML_RUN_ID": job_run})
    assert done.returncode == 0, done.stderr
    assert manifest.read(out)["status"] == "complete" and (out / "adapter" / "adapter_model.safetensors").is_file()
    client_ = MlflowClient(uri)
    runs = client_.search_runs([client_.get_experiment_by_name("ftl").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[TAG_PARENT] == job_run
    assert [m.step for m in client_.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]
    # The loss reaches the job's own run too, where an Azure ML sweep reads its objective.
    assert [m.step for m in client_.get_metric_history(job_run, "loss")] == [1, 2]


def test_a_distributed_jobs_command_trains_one_ddp_run_and_only_rank_0_writes(tmp_path, tiny_model, qa_file, wheel):
    """--instance-count 1 --gpus-per-node 2: the job's own command (torchrun, as Azure ML's PyTorch
    distribution runs it on each node) trains one data-parallel run over gloo on this CPU. Rank 0 writes
    the manifest, the adapter and the one MLflow run; rank 1 leaves nothing behind but its RNG state in
    the shared checkpoints."""
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file, max_steps=4, batch_size=2, save_steps=2),
                            compute="gpu-cluster", instance_count=1, gpus_per_node=2, wheel=wheel)
    job = yaml.safe_load(prepared.job_yml.read_text())
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 1}
    assert "torchrun --nnodes 1 --nproc-per-node 2" in job["command"]
    out = tmp_path / "mnt" / "outputs" / "finetune"
    out.mkdir(parents=True)
    scratch = tmp_path / "node-tmp"
    scratch.mkdir()
    uri = f"sqlite:///{tmp_path / 'workspace-mlflow.db'}"
    job_run = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("job")).info.run_id
    with socket.socket() as s:  # a free port for the rendezvous, as Azure ML would give MASTER_PORT
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_job_command(prepared.command, {a.input_name: a.path for a in prepared.assets}, out,
                           prepared.folder / "code", {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                            "TMPDIR": str(scratch), "MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": job_run,
                            "AZUREML_RUN_ID": job_run})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1: 4 steps trained" in done.stdout + done.stderr
    record = manifest.read(out)
    assert record["status"] == "complete" and record["distributed"] == {"world_size": 2, "rows_per_step": 4}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # One DDP run, not two lone ones: both ranks' RNG states sit in each checkpoint, and one step took
    # 2 × 2 rows (6 rows → 3 per rank → an epoch is 2 steps of 2, twice as fast as one process's 3).
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-2").glob("rng_state*")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["epoch"] for h in state["log_history"] if "loss" in h] == [0.5, 1.0, 1.5, 2.0]
    assert not (out / ".olive-cache").exists() and not any(scratch.glob("ftl-finetune-rank*"))
    client_ = MlflowClient(uri)
    runs = client_.search_runs([client_.get_experiment_by_name("ftl").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[TAG_PARENT] == job_run


def test_jobs_status_logs_download_and_cancel(tmp_path, tiny_model, qa_file, fake, wheel):
    prepared = jobs.prepare(config(tmp_path, tiny_model, qa_file), [], compute="gpu-cluster", wheel=wheel)
    ml = client(fake)
    fake.job_status_sequence = ["Queued", "Running", "Running", "Completed"]
    name = jobs.submit(ml, prepared, wait=False).name
    found = jobs.status(ml, name)
    assert found["status"] == "Queued" and found["compute"] == "gpu-cluster" and name in found["studio_url"]
    produced = tmp_path / "produced"
    produced.mkdir()
    (produced / "manifest.json").write_text("{}")
    transfer = LocalTransfer(produced, log=[f"line {i}" for i in range(300)])
    with pytest.raises(AzureError, match="is Running, not Completed"):
        jobs.download(ml, name, tmp_path / "dl", transfer=transfer)
    assert jobs.logs(ml, name, 3, transfer=transfer) == ["line 297", "line 298", "line 299"]
    assert jobs.download(ml, name, tmp_path / "dl", transfer=transfer) == tmp_path / "dl"
    assert (tmp_path / "dl" / "manifest.json").is_file() and not list(tmp_path.glob(".dl.new-*"))
    # A folder ftl did not write is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="not written by ftl"):
        jobs.download(ml, name, tmp_path / "mine", force=True, transfer=transfer)
    cancelled = jobs.cancel(ml, name)
    assert any(m == "POST" and p.split("?")[0].endswith(f"/jobs/{name}/cancel") for m, _, p in fake.log)
    assert cancelled["name"] == name
    with pytest.raises(AzureError, match="not found"):
        jobs.status(ml, "no-such-job")


def _score_module(score_py, model_dir, monkeypatch):
    import importlib.util

    monkeypatch.setenv("AZUREML_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("FTL_THREADS", "2")
    monkeypatch.setattr(sys, "path", list(sys.path))  # score.py puts its folder first
    spec = importlib.util.spec_from_file_location("ftl_score_under_test", score_py)
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    score.init()
    return score


def test_score_py_answers_as_ftl_generate_and_bad_requests_are_400(tiny_export, tmp_path, monkeypatch):
    from ftl.azure import deploy
    from ftl.generate import OnnxChatModel

    # Azure ML mounts the model as AZUREML_MODEL_DIR/<asset folder>/…: score.py finds the export inside.
    shutil.copytree(tiny_export, tmp_path / "model" / "export")
    prepared = deploy.prepare(tmp_path / "model" / "export", "ftl-tiny")
    assert (prepared.folder / "score" / "ftl" / "generate" / "engine.py").is_file()  # the engine travels with it
    score = _score_module(prepared.folder / "score" / "score.py", tmp_path / "model", monkeypatch)
    answer = score.run(json.dumps({"question": "What is 2 + 3?", "max_new_tokens": 5}))
    assert answer["completion_tokens"] == 5 and answer["finish_reason"] == "length" and answer["prompt_tokens"] > 0
    assert isinstance(answer["text"], str) and answer["latency_ms"] > 0
    # The same engine as ftl generate: the same prompt, the same greedy answer.
    assert answer["text"] == OnnxChatModel(tiny_export, threads=2).ask("What is 2 + 3?", max_new_tokens=5).text
    chat = score.run({"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 2, "temperature": 0.7})
    assert chat["completion_tokens"] <= 2
    for body, message in [("{not json", "not JSON"), (json.dumps({"max_new_tokens": 4}), "give \"messages\""),
                          (json.dumps({"question": "x", "max_new_tokens": 10 ** 7}), "exceeds the model's context"),
                          (json.dumps({"question": "x", "temprature": 1}), "unknown field(s) ['temprature']"),
                          (json.dumps([1, 2]), "JSON object")]:
        response = score.run(body)
        assert response.status_code == 400 and message in response.message["error"], body


def test_the_engine_copied_beside_score_py_imports_without_ftl_installed(tiny_export, tmp_path):
    """The deployment's image has onnxruntime-genai, pydantic and jinja2 but no ftl: score.py imports the
    engine from score/ftl/ (deploy.ENGINE_FILES), so that copy must be whole (it once lacked ftl/lazy.py)."""
    from ftl.azure import deploy

    shutil.copytree(tiny_export, tmp_path / "model" / "export")
    score_dir = deploy.prepare(tmp_path / "model" / "export", "ftl-tiny").folder / "score"
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]  # no installed ftl\n"
            f"sys.path.insert(0, {str(score_dir)!r})\n"
            "import ftl, ftl.generate.engine\n"
            "from ftl.generate import OnnxChatModel\n"
            "print(ftl.__file__)")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(score_dir / "ftl" / "__init__.py")


def test_score_py_caps_new_tokens_and_stops_at_the_deadline_the_deployment_sets(tiny_export, tmp_path, monkeypatch):
    """One request must not hold the endpoint's only slot: score.py generates at most the deployment's
    FTL_MAX_NEW_TOKENS (ftl deploy --max-new-tokens), and stops at its FTL_DEADLINE_S with what it has."""
    from ftl.azure import deploy, local
    from ftl.generate import OnnxChatModel

    shutil.copytree(tiny_export, tmp_path / "model" / "export")
    prepared = deploy.prepare(tmp_path / "model" / "export", "ftl-tiny", max_new_tokens=6)
    settings = local.deployment_environment(prepared.folder)  # what Azure ML sets for score.py
    assert settings["FTL_MAX_NEW_TOKENS"] == "6"
    assert int(settings["FTL_DEADLINE_S"]) < load_online_deployment(
        source=str(prepared.folder / "deployment.yml")).request_settings.request_timeout_ms / 1000
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    score = _score_module(prepared.folder / "score" / "score.py", tmp_path / "model", monkeypatch)
    answer = score.run(json.dumps({"question": "What is 2 + 3?", "max_new_tokens": 4000}))
    assert answer["max_new_tokens"] == 6 and answer["completion_tokens"] == 6 and answer["finish_reason"] == "length"
    assert answer["text"] == OnnxChatModel(tiny_export, threads=2).ask("What is 2 + 3?", max_new_tokens=6).text
    # A deadline already past when the first token arrives: that token, and the reason it stopped.
    monkeypatch.setenv("FTL_DEADLINE_S", "1e-9")
    score = _score_module(prepared.folder / "score" / "score.py", tmp_path / "model", monkeypatch)
    answer = score.run(json.dumps({"question": "What is 2 + 3?", "max_new_tokens": 5}))
    assert answer["finish_reason"] == "deadline" and answer["completion_tokens"] == 1 and answer["text"]


def test_deploy_dry_run_writes_yaml_that_loads(tiny_export, tmp_path):
    from azure.ai.ml import load_model, load_online_deployment, load_online_endpoint

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    result = ftl("deploy", export, "--endpoint", "ftl-tiny", "--instance-type", "Standard_F4s_v2", "--dry-run",
                 "--max-new-tokens", 64, cwd=tmp_path,
                 env={"AZURE_SUBSCRIPTION_ID": "", "AZURE_RESOURCE_GROUP": "", "AZUREML_WORKSPACE_NAME": ""})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "export.deploy"
    endpoint = load_online_endpoint(source=str(folder / "endpoint.yml"))
    deployment = load_online_deployment(source=str(folder / "deployment.yml"))
    model = load_model(source=str(folder / "model.yml"))
    assert endpoint.auth_mode == "key" and deployment.instance_type == "Standard_F4s_v2"
    assert deployment.code_configuration.scoring_script == "score.py" and (folder / "score" / "score.py").is_file()
    assert deployment.liveness_probe.failure_threshold >= 30 and deployment.readiness_probe.timeout >= 10
    assert deployment.environment_variables["FTL_MAX_NEW_TOKENS"] == "64"  # score.py's cap, set at deploy time
    assert model.name.startswith("ftl-export-") and Path(model.path) == export.resolve()
    conda = (folder / "environment" / "conda.yml").read_text()
    assert "onnxruntime-genai==" in conda and "azureml-inference-server-http==1.5.1" in conda
    assert json.loads((folder / "sample-request.json").read_text())["messages"][0]["role"] == "user"
    az = (folder / "az.sh").read_text()
    assert "az ml online-deployment create --file deployment.yml --all-traffic" in az
    assert "az ml online-endpoint invoke --name ftl-tiny --request-file sample-request.json" in az
    bad = ftl("deploy", export, "--endpoint", "1 bad", "--dry-run", cwd=tmp_path)
    assert bad.returncode == 1 and "not valid for Azure ML" in bad.stderr


def test_deploy_registers_once_and_creates_endpoint_and_deployment_through_the_real_sdk(tiny_export, tmp_path, fake):
    from ftl.azure import deploy

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    prepared = deploy.prepare(export, "ftl-tiny", instance_type="Standard_F4s_v2")
    done = deploy.deploy(client(fake), prepared)
    assert done["traffic"] == {"blue": 100} and done["scoring_uri"].startswith("https://ftl-tiny.")
    puts = [(i, p.split("?")[0]) for i, (m, h, p) in enumerate(fake.log) if m == "PUT" and ".blob." not in h]
    assert any(p.endswith(f"/models/{prepared.model_name}/versions/1") for _, p in puts)
    index, _ = next((i, p) for i, p in puts if p.endswith("/onlineEndpoints/ftl-tiny/deployments/blue"))
    body = json.loads(fake.bodies[index])
    props = body["properties"]
    assert body["sku"]["capacity"] == 1 and props["instanceType"] == "Standard_F4s_v2"
    assert props["codeConfiguration"]["scoringScript"] == "score.py" and props["endpointComputeType"] == "Managed"
    assert props["model"].endswith(f"/models/{prepared.model_name}/versions/1")
    assert props["livenessProbe"]["failureThreshold"] >= 30
    endpoint_puts = [json.loads(fake.bodies[i]) for i, p in puts if p.endswith("/onlineEndpoints/ftl-tiny")]
    assert endpoint_puts[0]["properties"]["authMode"] == "Key" and endpoint_puts[-1]["properties"]["traffic"] == {"blue": 100}
    # The model is already there: a second deploy registers nothing.
    fake.log.clear()
    deploy.deploy(client(fake), prepared)
    assert not [p for m, h, p in fake.log if m == "PUT" and "/models/" in p]


def test_the_images_ftl_names_are_the_pinned_ones_listed_with_their_source(tiny_export, tmp_path, tiny_model, qa_file,
                                                                           fake, wheel):
    """images.json lists each base image with a published tag and where Azure records it; the
    deployment and the job name only those, and the deployment's environment is named by its image."""
    import zipfile

    from ftl.azure import deploy

    listed = json.loads(jobs.IMAGES.read_text())["images"]
    for entry in listed:
        assert entry["tag"] != "latest" and ":" not in entry["name"] and entry["name"].startswith("mcr.microsoft.com/")
        assert entry["source"].startswith("https://github.com/Azure/azureml-assets/") and entry["why"]
    allowed = {f"{e['name']}:{e['tag']}" for e in listed}
    assert "mcr.microsoft.com/azureml/minimal-ubuntu22.04-py311-cpu-inference:latest" not in allowed  # never published
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    prepared = deploy.prepare(export, "ftl-tiny")
    environment = yaml.safe_load((prepared.folder / "deployment.yml").read_text())["environment"]
    assert environment["image"] in allowed
    job_env = yaml.safe_load(jobs.prepare(config(tmp_path, tiny_model, qa_file), [], compute="gpu-cluster",
                                          wheel=wheel).environment_yml.read_text())
    assert job_env["image"] in allowed
    assert "ftl/azure/images.json" in zipfile.ZipFile(wheel).namelist()  # the list ships with ftl
    # The deployment's environment is created under a name that carries its image: another image, another name.
    deploy.deploy(client(fake), prepared)
    puts = [p.split("?")[0] for m, h, p in fake.log if m == "PUT" and "/environments/" in p]
    assert puts == [f"{WS_PREFIX}/environments/{environment['name']}/versions/1"]
    body = json.loads(fake.bodies[[i for i, (m, h, p) in enumerate(fake.log) if m == "PUT" and "/environments/" in p][0]])
    assert body["properties"]["image"] == environment["image"]
    other = yaml.safe_load((deploy.prepare(export, "ftl-tiny", image="mcr.microsoft.com/azureml/other:1").folder
                            / "deployment.yml").read_text())["environment"]
    assert other["name"] != environment["name"] and other["name"].startswith("ftl-serve-env-")


def _azure_sweep_pipeline(tmp_path, tiny_model, qa_file):
    spec = {"name": "tiny-az", "workdir": str(tmp_path / "runs" / "tiny-az"),
            "stages": {"import": {"source": str(tiny_model), "name": "tiny"},
                       "finetune": {"data": str(qa_file), "max_steps": 2, "val_split": 0.34}}}
    path = tmp_path / "az.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_sweep_on_azure_is_one_sweep_job_with_a_bandit_policy(tmp_path, tiny_model, qa_file, fake, wheel):
    from ftl.pipeline.sweep import azure_sweep

    path = _azure_sweep_pipeline(tmp_path, tiny_model, qa_file)
    (tmp_path / "models").mkdir(exist_ok=True)
    result = ftl("sweep", path, "--target", "azureml", "--compute", "gpu-cluster", "--dry-run",
                 "--set", "finetune.r=8,16", "--set", "finetune.learning_rate=1e-4,2e-4", cwd=tmp_path,
                 env={"FTL_MODELS_DIR": str(tmp_path / "models"), "AZURE_SUBSCRIPTION_ID": ""})
    assert result.returncode == 1 and "ftl models import" in result.stderr  # the pipeline's model is not imported yet
    from ftl.models import import_model

    import_model(str(tiny_model), name="tiny")
    prepared, submitted = azure_sweep(path, ["finetune.r=8,16", "finetune.learning_rate=1e-4,2e-4"],
                                      compute="gpu-cluster", ml=client(fake), wheel=wheel)
    job = load_job(source=str(prepared.job_yml))
    assert type(job).__name__ == "SweepJob" and job.objective.primary_metric == "eval_loss"
    assert type(job.early_termination).__name__ == "BanditPolicy" and job.limits.max_total_trials == 4
    assert "ftl finetune --config finetune.json" in job.trial.command and "'r=${{search_space.r}}'" in job.trial.command
    assert json.loads((prepared.folder / "code" / "finetune.json").read_text())["val_split"] == 0.34
    body = json.loads(fake.bodies[[i for i, (m, h, p) in enumerate(fake.log) if m == "PUT" and "/jobs/" in p][-1]])
    props = body["properties"]
    assert props["jobType"] == "Sweep" and props["samplingAlgorithm"]["samplingAlgorithmType"] == "Grid"
    assert props["objective"] == {"goal": "minimize", "primaryMetric": "eval_loss"}
    assert props["earlyTermination"]["policyType"] == "Bandit" and props["limits"]["maxConcurrentTrials"] == 4
    assert props["searchSpace"]["r"] == ["choice", [[8, 16]]] and submitted.name == prepared.job_name
    assert props["searchSpace"]["learning_rate"] == ["choice", [[0.0001, 0.0002]]]
    with pytest.raises(ConfigError, match="only finetune.\\* can be swept"):
        azure_sweep(path, ["export.block_size=32,64"], compute="gpu-cluster", dry_run=True, wheel=wheel)
    with pytest.raises(ConfigError, match="trial v1-packing=maybe: .*stages.finetune.packing"):
        azure_sweep(path, ["finetune.packing=true,maybe"], compute="gpu-cluster", dry_run=True, wheel=wheel)
    with pytest.raises(ConfigError, match="finetune.data cannot be swept"):  # one upload serves every trial
        azure_sweep(path, [f"finetune.data={qa_file},{qa_file}"], compute="gpu-cluster", dry_run=True, wheel=wheel)


def test_each_azure_sweep_trial_reads_typed_values_and_reports_its_objective_in_its_own_run(
        tmp_path, tiny_model, qa_file, fake, wheel):
    """A sweep over a bool and a list. Each trial's command, as Azure ML fills in its search space, is run
    as a node would run it: the real ftl finetune (click) takes it, and the Olive workflow it writes has
    the trial's packing and target_modules. One trial trains for real under its own MLflow run, and the
    sweep's primary metric (eval_loss) is read from that run, as Azure ML reads it."""
    from ftl.models import import_model
    from ftl.pipeline.sweep import azure_sweep

    path = tmp_path / "az.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-az", "workdir": str(tmp_path / "runs" / "tiny-az"), "stages": {
        "import": {"source": str(tiny_model), "name": "tiny"},
        "finetune": {"data": str(qa_file), "max_steps": 2, "batch_size": 2, "val_split": 0.34, "eval_steps": 1}}}))
    import_model(str(tiny_model), name="tiny")
    prepared, submitted = azure_sweep(path, ["finetune.packing=true,false",
                                             "finetune.target_modules=[q_proj,v_proj],[o_proj]"],
                                      compute="gpu-cluster", ml=client(fake), wheel=wheel)
    uri = f"sqlite:///{tmp_path / 'workspace-mlflow.db'}"
    trials = fake.trials(submitted.name, uri)
    inputs = {a.input_name: a.path for a in prepared.assets}
    seen = []
    for index, trial in enumerate(trials):
        out = tmp_path / "mnt" / f"trial-{index}" / "finetune"
        out.mkdir(parents=True)
        workflow = tmp_path / f"trial-{index}.olive_config.json"
        done = run_job_command(f"{trial['command']} --save-config {workflow}", inputs, out, prepared.folder / "code")
        assert done.returncode == 0, done.stderr[-2000:]
        lora = json.loads(workflow.read_text())["passes"]["lora"]
        seen.append((lora["packing"], lora["target_modules"]))
    assert seen == [(True, ["q_proj", "v_proj"]), (True, ["o_proj"]), (False, ["q_proj", "v_proj"]),
                    (False, ["o_proj"])]
    trial = trials[-1]
    out = tmp_path / "mnt" / "trained" / "finetune"
    out.mkdir(parents=True)
    done = run_job_command(trial["command"], inputs, out, prepared.folder / "code",
                           {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": trial["run_id"], "AZUREML_RUN_ID": trial["run_id"]})
    assert done.returncode == 0, done.stderr[-3000:]
    record = manifest.read(out)
    assert record["params"]["packing"] is False and record["params"]["target_modules"] == ["o_proj"]
    curve = [(p["step"], p["eval_loss"]) for p in record["metrics"]["eval_curve"]]
    assert [s for s, _ in curve] == [1, 2] and fake.primary_metric(submitted.name, trial["run_id"], uri) == curve


class JobOnThisMachine(jobs.Transfer):
    """The seam, as a real job would fill it: the output is what the job's own command writes, run here
    with the model and data "mounted" in a folder that is gone afterwards (as the job's node is)."""

    def __init__(self, job_folder: Path, work: Path):
        self.job_folder, self.work, self.runs = job_folder, work, 0

    def download(self, ml, job_name, dest):
        self.runs += 1
        job = yaml.safe_load((self.job_folder / "job.yml").read_text())
        mounts = self.work / "mnt" / job_name
        # Where each data asset came from: az.sh's `az ml data create --name N … --path P` lines.
        local = dict(re.findall(r"--name (\S+) --version 1 --type \S+ --path (\S+)",
                                (self.job_folder / "az.sh").read_text()))
        inputs = {}
        for name, spec in job["inputs"].items():
            source = Path(local[spec["path"].split(":")[1]])
            inputs[name] = mounts / "inputs" / name / source.name
            inputs[name].parent.mkdir(parents=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, inputs[name])
        out = mounts / "outputs" / "finetune"
        out.mkdir(parents=True)
        done = run_job_command(job["command"], inputs, out, self.job_folder / "code")
        assert done.returncode == 0, done.stderr[-3000:]
        shutil.copytree(out, dest)
        shutil.rmtree(mounts)
        return dest

    def log_tail(self, ml, job_name, lines=20):
        return []


def test_a_pipeline_finetune_stage_with_target_azureml_runs_as_a_job_and_the_rest_here(
        tmp_path, tiny_model, qa_file, fake, wheel, monkeypatch):
    """stages.finetune.target: azureml. The job (its own command, run here on "mounted" copies that are
    gone afterwards) fills the finetune folder; export and generate carry on here, finding the base
    model by its hash since the job's manifest names the mount. A second run submits nothing."""
    from ftl.lineage import adapter_dir_of, require_base
    from ftl.models import import_model
    from ftl.pipeline.runner import AzureSession, load_pipeline, run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FTL_MODELS_DIR", str(tmp_path / "models"))
    for name, value in (("AZURE_SUBSCRIPTION_ID", SUB), ("AZURE_RESOURCE_GROUP", RG), ("AZUREML_WORKSPACE_NAME", WS)):
        monkeypatch.setenv(name, value)
    import_model(str(tiny_model), name="tiny")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "workdir": "runs/p", "stages": {
        "import": {"source": str(tiny_model), "name": "tiny"},
        "finetune": {"data": [str(qa_file)], "max_steps": 2, "batch_size": 2, "r": 8, "target": "azureml",
                     "azureml": {"compute": "gpu-cluster"}},
        "generate": {"questions": ["What is 2 + 3?"], "max_new_tokens": 4}}}))
    monkeypatch.setattr(jobs, "build_wheel", lambda dest: shutil.copy2(wheel, dest / wheel.name) and dest / wheel.name)
    plan = load_pipeline(path)
    assert plan.azure.compute == "gpu-cluster" and "target" not in plan.finetune.model_fields_set
    planned = {r.stage: r for r in run(plan, dry_run=True)}  # ftl run --dry-run: the job is written, not sent
    assert "on Azure ML (gpu-cluster, 1×1)" in planned["finetune"].detail and not fake.log
    assert load_job(source=str(tmp_path / "runs/p/finetune.azureml/job.yml")).compute == "gpu-cluster"
    session = AzureSession(ml=client(fake), transfer=JobOnThisMachine(tmp_path / "runs/p/finetune.azureml", tmp_path),
                           poll_s=0)
    reports = {r.stage: r for r in run(plan, azure=session)}
    assert [reports[s].status for s in ("finetune", "export", "generate")] == ["ran", "ran", "ran"]
    finetuned = tmp_path / "runs/p/finetune"
    record = manifest.read(finetuned)
    assert record["status"] == "complete" and "/mnt/" in record["inputs"]["base_model"]["path"]
    assert not Path(record["inputs"]["base_model"]["path"]).exists()  # the job's node is gone
    assert jobs.job_record(finetuned)["job"].startswith("ftl-finetune-finetune-")
    # ftl export-onnx / ftl eval on the folder alone find that base again by its hash among the imported models.
    assert require_base(adapter_dir_of(finetuned), None) == str(tmp_path / "models" / "tiny")
    job_put = [i for i, (m, h, p) in enumerate(fake.log) if m == "PUT" and "/jobs/" in p][-1]
    props = json.loads(fake.bodies[job_put])["properties"]
    shipped = json.loads((tmp_path / "runs/p/finetune.azureml/code/finetune.json").read_text())
    assert (shipped["r"], shipped["max_steps"], shipped["batch_size"]) == (8, 2, 2) and "target" not in shipped
    assert "ftl finetune --config finetune.json" in props["command"] and props["experimentName"] == "p"
    assert manifest.read(tmp_path / "runs/p/export")["status"] == "complete"
    # Again: the same inputs, so nothing is submitted and nothing trains.
    fake.log.clear()
    reports = {r.stage: r for r in run(load_pipeline(path), azure=session)}
    assert reports["finetune"].status == "skipped" and session.transfer.runs == 1
    assert not [p for m, h, p in fake.log if m == "PUT" and "/jobs/" in p]
    # A block that says where but not that it should go there is refused, with its key.
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["finetune"].pop("target")
    with pytest.raises(ConfigError, match="stages.finetune.azureml: set target: azureml"):
        load_pipeline(path, raw=raw)

