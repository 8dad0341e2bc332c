"""MLflow tracking, run comparison, sweeps, validation and early stopping.

Every test uses a real MLflow SQLite store in its temp folder and reads it back with MLflow's own
client; the stages are the real ones on the tiny Llama.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ftl import manifest
from ftl.errors import ConfigError, DataError
from ftl.finetune import finetune
from ftl.finetune.config import FinetuneConfig
from ftl.pipeline import load_pipeline
from ftl.pipeline.sweep import sweep
from ftl.tracking import TAG_PARENT, TAG_STAGE, Tracker
from conftest import write_jsonl


def ftl(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "250"}  # tables unwrapped, so names can be looked for
    return subprocess.run([sys.executable, "-m", "ftl.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env)


def store(tmp_path, name="mlflow.db"):
    return f"sqlite:///{tmp_path / name}"


def runs_of(uri, experiment="ftl"):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id], max_results=1000) if found else [])


def artefacts(client, run_id):
    return {a.path for a in client.list_artifacts(run_id)}


@pytest.fixture(scope="module")
def tracked_finetune(tiny_model, qa_file, tmp_path_factory):
    """One lone `ftl finetune` with validation rows, logged to a store of its own."""
    root = tmp_path_factory.mktemp("tracked")
    uri = store(root)
    result = ftl("finetune", "--model", tiny_model, "--data", qa_file, "--val-data", qa_file,
                 "--output", root / "ft", "--max-steps", 6, "--batch-size", 2, "--logging-steps", 1,
                 "--eval-steps", 3, "--tracking-uri", uri, "--experiment", "lone", cwd=root)
    assert result.returncode == 0, result.stderr
    return root, uri, result


def test_a_lone_stage_logs_live_loss_params_tags_and_artefacts(tracked_finetune):
    root, uri, result = tracked_finetune
    client, runs = runs_of(uri, "lone")
    assert len(runs) == 1
    run = runs[0]
    record = manifest.read(root / "ft")
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune ft"
    assert run.info.run_id in result.stderr  # the terminal says where it went
    # The Trainer logged the loss while training: one point per logging step, the manifest's curve.
    loss = sorted((m.step, round(m.value, 4)) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert loss == [(p["step"], p["loss"]) for p in record["metrics"]["loss_curve"]]
    assert [s for s, _ in loss] == list(range(1, 7))
    # eval_loss as the Trainer logged it, and the manifest's curve: the same values, unrounded.
    evals = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss"))
    assert evals == [(p["step"], p["eval_loss"]) for p in record["metrics"]["eval_curve"]] and [s for s, _ in evals] == [3, 6]
    params = run.data.params
    assert params["r"] == "16" and params["max_steps"] == "6" and params["val_rows"] == "6"
    tags = run.data.tags
    assert tags["ftl.fingerprint"] == record["fingerprint"]
    assert tags["ftl.base_sha256"] == record["inputs"]["base_model"]["sha256"]
    assert tags["ftl.data_sha256"] == ",".join([record["inputs"]["data"]["sha256"],
                                                record["inputs"]["val_data"][0]["sha256"]])
    assert tags["ftl.version"] and tags["ftl.run_uid"] == record["run_uid"]
    assert {"manifest.json", "olive_config.json", "training_summary.json"} <= artefacts(client, run.info.run_id)
    assert "model" not in artefacts(client, run.info.run_id)  # weights only with --log-model
    assert (root / "mlartifacts").is_dir() and not (root / "mlruns").exists()


def test_runs_sync_logs_a_folder_once(tracked_finetune, tmp_path):
    root, uri, _ = tracked_finetune
    other = store(tmp_path, "other.db")
    for _ in range(2):
        result = ftl("runs", "sync", root / "ft", "--tracking-uri", other, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    client, runs = runs_of(other)
    assert len(runs) == 1 and "already there" in result.stderr
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == list(range(1, 7))
    # The store it was logged to while running already has it.
    result = ftl("runs", "sync", root / "ft", "--tracking-uri", uri, "--experiment", "lone", cwd=tmp_path)
    assert "0 new run(s)" in result.stderr and len(runs_of(uri, "lone")[1]) == 1


def test_runs_compare_reads_mlflow_and_writes_the_report(tracked_finetune, tiny_model, qa_file):
    root, uri, _ = tracked_finetune
    result = ftl("finetune", "--model", tiny_model, "--data", qa_file, "--output", root / "ft-lr", "--max-steps", 4,
                 "--batch-size", 2, "--logging-steps", 1, "--learning-rate", "1e-3", "--tracking-uri", uri,
                 "--experiment", "lone", cwd=root)
    assert result.returncode == 0, result.stderr
    listed = ftl("runs", "list", "--tracking-uri", uri, "--experiment", "lone", cwd=root)
    assert listed.returncode == 0 and "finetune ft-lr" in listed.stderr and "finetune ft" in listed.stderr
    report = root / "cmp.html"
    result = ftl("runs", "compare", "--experiment", "lone", "--tracking-uri", uri, "--output", report, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "learning_rate" in result.stderr and "0.001" in result.stderr  # a parameter that differs
    page = report.read_text()
    assert "finetune ft-lr" in page and "data:image/png;base64," in page and "final_loss" in page


def test_an_unreachable_tracking_server_is_a_warning_and_the_stage_finishes(tiny_model, qa_file, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = ftl("finetune", "--model", tiny_model, "--data", qa_file, "--output", tmp_path / "ft", "--max-steps", 2,
                 "--batch-size", 2, "--tracking-uri", f"http://user:secret@127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert manifest.read(tmp_path / "ft")["status"] == "complete"
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning and "ftl runs sync" in result.stderr and "secret" not in result.stderr


@pytest.mark.parametrize("uri, message", [("ftp://host/x", "unknown tracking URI scheme 'ftp'"),
                                          ("file:///tmp/mlruns", "file store"),
                                          ("/tmp/mlruns", "file store")])
def test_a_tracking_uri_with_an_unknown_scheme_is_refused(tiny_model, qa_file, tmp_path, uri, message):
    result = ftl("finetune", "--model", tiny_model, "--data", qa_file, "--output", tmp_path / "ft",
                 "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ft").exists()


def test_no_track_logs_nothing(tiny_model, qa_file, tmp_path):
    result = ftl("finetune", "--model", tiny_model, "--data", qa_file, "--output", tmp_path / "ft", "--max-steps", 1,
                 "--batch-size", 2, "--no-track", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "runs").exists() and "MLflow" not in result.stderr


def test_early_stopping_stops_on_a_validation_set_built_to_get_worse(tiny_model, tmp_path):
    # Training teaches one answer; the validation rows ask the same questions with other answers,
    # so the better it learns, the worse eval_loss gets.
    train = [{"Question": f"What colour is item {i}?", "Answer": "red red red red"} for i in range(24)]
    val = [{"Question": f"What colour is item {i}?", "Answer": "green blue yellow purple"} for i in range(6)]
    config = FinetuneConfig(model=str(tiny_model), data=write_jsonl(tmp_path / "train.jsonl", train),
                            val_data=write_jsonl(tmp_path / "val.jsonl", val), output=tmp_path / "ft", max_steps=60,
                            batch_size=4, learning_rate=1e-2, eval_steps=2, early_stopping_patience=2)
    result = finetune(config)
    metrics = manifest.read(tmp_path / "ft")["metrics"]
    curve = metrics["eval_curve"]
    best = min(curve, key=lambda p: p["eval_loss"])
    assert metrics["stop_reason"] == "early_stopping" and metrics["steps_run"] < 60
    # The curve is the Trainer's own values at full precision: its minimum is the best the Trainer kept,
    # not a tie of two rounded values (steps 6 and 8 at 6.1942 once made min() pick the wrong one).
    assert metrics["best_eval_loss"] == best["eval_loss"]
    assert metrics["best_step"] == best["step"] and [p["step"] for p in curve][-3] == best["step"]
    assert metrics["val_rows"] == 6 and result.steps == 60
    # The adapter written is the best checkpoint's, not the last step's.
    written = load_file(tmp_path / "ft" / "adapter" / "adapter_model.safetensors")
    kept = load_file(tmp_path / "ft" / "checkpoints" / metrics["best_checkpoint"] / "adapter_model.safetensors")
    assert written.keys() == kept.keys() and all((written[k] == kept[k]).all() for k in written)


def test_validation_rows_bad_input(tiny_model, qa_file, tmp_path):
    tiny = write_jsonl(tmp_path / "two.jsonl", [{"Question": "a?", "Answer": "b"}, {"Question": "c?", "Answer": "d"}])
    with pytest.raises(DataError, match="leaves no training rows"):
        finetune(FinetuneConfig(model=str(tiny_model), data=tiny, output=tmp_path / "ft", val_split=0.9))
    result = ftl("finetune", "--model", tiny_model, "--data", qa_file, "--output", tmp_path / "ft",
                 "--early-stopping-patience", 2, cwd=tmp_path)
    assert result.returncode == 1 and "needs validation rows" in result.stderr
    config = FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / "ft", val_split=0.34)
    from ftl.finetune.stage import plan

    p = plan(config)
    assert len(p.val_examples) == 2 and len(p.examples) == 4
    assert {e.line for e in p.val_examples} == {e.line for e in plan(config).val_examples}  # seeded: the same rows


def _sweep_spec(tmp_path, tiny_model, qa_file, **extra):
    spec = {
        "name": "tiny-sweep",
        "workdir": str(tmp_path / "runs" / "tiny-sweep"),
        "stages": {
            "import": {"source": str(tiny_model), "name": "tiny"},
            "finetune": {"data": str(qa_file), "max_steps": 2, "batch_size": 2, "logging_steps": 1},
            "export": {"int4_algo": "default"},
            "eval": {"data": str(qa_file), "max_new_tokens": 2, "memory": False, "limit": 2},
        },
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_sweep_runs_two_variants_as_child_runs_and_shares_upstream_stages(tmp_path, tiny_model, qa_file):
    path = _sweep_spec(tmp_path, tiny_model, qa_file, matrix={"eval.max_new_tokens": [2, 3]})
    uri = store(tmp_path)
    ranked = sweep(path, tracker=Tracker.open(uri, "tiny-sweep"))
    client, runs = runs_of(uri, "tiny-sweep")
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags[TAG_STAGE], []).append(run)
    (sweep_run,) = by_stage["sweep"]
    variants = by_stage["variant"]
    assert len(variants) == 2 and all(v.data.tags[TAG_PARENT] == sweep_run.info.run_id for v in variants)
    assert {v.data.params["sweep.eval.max_new_tokens"] for v in variants} == {"2", "3"}
    control = next(v for v in variants if v.data.tags["ftl.control"] == "1")
    assert control.data.params["sweep.eval.max_new_tokens"] == "2"
    # finetune and export have the same inputs in both variants: each ran once, under the control.
    assert len(by_stage["finetune"]) == 1 and len(by_stage["export"]) == 1 and len(by_stage["eval"]) == 2
    assert by_stage["finetune"][0].data.tags[TAG_PARENT] == control.info.run_id
    other = next(v for v in variants if v is not control)
    assert other.data.tags["ftl.reused.finetune"] == by_stage["finetune"][0].info.run_id
    assert {e.data.tags[TAG_PARENT] for e in by_stage["eval"]} == {v.info.run_id for v in variants}
    finetune_run = by_stage["finetune"][0].info.run_id
    assert [m.step for m in client.get_metric_history(finetune_run, "loss")] == [1, 2]
    assert {"manifest.json", "report.html"} <= artefacts(client, by_stage["eval"][0].info.run_id)
    # Ranked by the exported model's answer perplexity; the comparison is written and logged.
    work = tmp_path / "runs" / "tiny-sweep"
    summary = json.loads((work / "sweep" / "sweep_summary.json").read_text())
    assert summary["rank_by"] == "eval.exported.perplexity_answer" and summary["shared_stages"] == [
        "import", "distill", "finetune", "export", "generate"]
    assert all(v["metrics"]["eval.exported.perplexity_answer"] > 0 for v in summary["variants"])
    assert [v.name for v in ranked] == [v["name"] for v in summary["variants"]]
    assert "comparison.html" in artefacts(client, sweep_run.info.run_id)
    assert (work / "finetune" / "manifest.json").is_file() and not (work / "sweep" / ranked[0].name / "finetune").exists()


def test_sweep_bad_input_is_one_line_before_anything_runs(tmp_path, tiny_model, qa_file):
    path = _sweep_spec(tmp_path, tiny_model, qa_file)
    for sets, message in [(["finetune.rr=8,16"], "unknown sweep key 'finetune.rr' (did you mean finetune.r?)"),
                          (["finetune.r="], "the grid would be empty"),
                          (["finetune.r=8,abc"], "stages.finetune.r"),
                          ([], "nothing to sweep")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            sweep(path, sets)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="ftl sweep"):
        load_pipeline(_sweep_spec(tmp_path, tiny_model, qa_file, matrix={"finetune.r": [8, 16]}))
    result = ftl("sweep", path, "--set", "finetune.r=8", "--rank-by", "x:best", cwd=tmp_path)
    assert result.returncode == 1 and "min or max" in result.stderr


def test_qscale_validates_stops_early_and_logs_live_from_its_olive_pass(tiny_model, tmp_path):
    train = [{"Question": f"What colour is item {i}?", "Answer": "red red red red"} for i in range(24)]
    val = [{"Question": f"What colour is item {i}?", "Answer": "green blue yellow purple"} for i in range(6)]
    config = FinetuneConfig(model=str(tiny_model), data=write_jsonl(tmp_path / "train.jsonl", train),
                            val_data=write_jsonl(tmp_path / "val.jsonl", val), output=tmp_path / "ft", method="qscale",
                            max_steps=60, batch_size=4, learning_rate=2e-2, eval_steps=2, early_stopping_patience=2)
    tracker = Tracker.open(store(tmp_path))
    with tracker.stage("finetune", tmp_path / "ft" / "manifest.json") as run:
        finetune(config)
    metrics = manifest.read(tmp_path / "ft")["metrics"]
    best = min(metrics["eval_curve"], key=lambda p: p["eval_loss"])
    assert metrics["stop_reason"] == "early_stopping" and metrics["steps_run"] < 60
    assert metrics["best_step"] == best["step"] and metrics["best_eval_loss"] == best["eval_loss"]
    client = MlflowClient(tracker.uri)
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "eval_loss"))
    assert logged == [(p["step"], p["eval_loss"]) for p in metrics["eval_curve"]]
    assert len(client.get_metric_history(run.run_id, "loss")) == metrics["steps_run"]


def test_uris_are_checked_and_made_absolute_and_no_track_checks_nothing(tmp_path, monkeypatch):
    from ftl.cli.base import open_tracker
    from ftl.tracking import check_uri

    assert check_uri("sqlite:///runs/mlflow.db", "x") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert check_uri("sqlite:////abs/m.db", "x") == "sqlite:////abs/m.db"
    assert check_uri("databricks", "x") == "databricks"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    assert not open_tracker({"no_track": True}).on  # --no-track: the environment's URI is not even read
    with pytest.raises(ConfigError, match="file store"):
        open_tracker({})


def test_a_failed_stage_never_logs_the_previous_result_as_its_own(tmp_path):
    folder = tmp_path / "ft"
    folder.mkdir()
    old = manifest.new("finetune", inputs={}, params={"r": 8}, fingerprint="old")
    old["status"] = "complete"
    manifest.write(folder, old)
    tracker = Tracker.open(store(tmp_path))
    with pytest.raises(DataError):
        with tracker.stage("finetune", folder / "manifest.json") as run:
            run.ensure()
            raise DataError("bad row", "qa.jsonl:3", "fix it")
    got = MlflowClient(tracker.uri).get_run(run.run_id)
    assert got.info.status == "FAILED" and "r" not in got.data.params
    assert "ftl.run_uid" not in got.data.tags and "ftl.mirrored" not in got.data.tags


def test_secrets_in_url_settings_do_not_reach_mlflow_params():
    from ftl.tracking import _param_value, flat_params

    params = flat_params({"distill": {"base_url": "https://user:s3cret@host/v1?api-key=k3y", "n": 3}})
    assert {k: _param_value(v) for k, v in params.items()} == {"distill.base_url": "https://host/v1",
                                                               "distill.n": "3"}


def test_reading_an_unknown_experiment_lists_the_ones_there(tracked_finetune):
    _, uri, _ = tracked_finetune
    result = ftl("runs", "list", "--tracking-uri", uri, "--experiment", "nope")
    assert result.returncode == 1 and "no experiment 'nope'" in result.stderr and "lone" in result.stderr
    assert MlflowClient(uri).get_experiment_by_name("nope") is None


def _previous_result(folder, stage, metrics):
    """A finished result of an earlier run with other inputs, as a stage leaves it in its folder."""
    record = manifest.new(stage, inputs={}, params={}, fingerprint="an earlier run's")
    record.update(status="complete", metrics=metrics)
    manifest.write(folder, record)


def test_a_failed_pipeline_run_carries_no_metrics_of_the_previous_result(tmp_path, tiny_model, qa_file):
    """The finetune folder holds an earlier result with other inputs: without --force the stage stops
    before writing anything, and the pipeline's run must not report that result (nor the export's)
    as this run's."""
    from ftl.errors import OutputExistsError
    from ftl.pipeline import run

    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump({"name": "again", "workdir": str(tmp_path / "runs" / "again"),
                                    "models_dir": str(tmp_path / "models"), "stages": {
                                        "import": {"source": str(tiny_model), "name": "tiny"},
                                        "finetune": {"data": str(qa_file), "max_steps": 2, "batch_size": 2}}}))
    work = tmp_path / "runs" / "again"
    _previous_result(work / "finetune", "finetune", {"final_loss": 1.5, "steps": 2})
    _previous_result(work / "export", "export", {"size_mb": 3.0})
    uri = store(tmp_path)
    with pytest.raises(OutputExistsError):
        run(load_pipeline(path), tracker=Tracker.open(uri, "again"))
    _, runs = runs_of(uri, "again")
    (pipeline_run,) = [r for r in runs if r.data.tags[TAG_STAGE] == "pipeline"]
    assert pipeline_run.info.status == "FAILED"
    assert not [k for k in pipeline_run.data.metrics if k.startswith(("finetune.", "export."))]
    assert manifest.read(work / "finetune")["metrics"]["final_loss"] == 1.5  # the earlier result is kept


def test_a_sweep_keeps_its_own_error_and_ends_its_run_when_mlflow_drops_a_call_at_the_end(
        tmp_path, tiny_model, qa_file):
    """Both variants fail (their model folders are someone else's). At the end, MLflow drops one call,
    as a reset connection would. The sweep raises its own error, not MLflow's, and its run ends FAILED
    instead of staying RUNNING."""
    from ftl.errors import FtlError
    from mlflow.exceptions import MlflowException

    for name in ("taken", "also-taken"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "notes.txt").write_text("not ftl's")
    path = _sweep_spec(tmp_path, tiny_model, qa_file, matrix={"import.name": ["taken", "also-taken"]})
    tracker = Tracker.open(store(tmp_path), "tiny-sweep")

    class DropsOneRead:
        """The real client, except that its first get_run fails the way a dropped connection does."""

        def __init__(self, client):
            self.client, self.dropped = client, False

        def __getattr__(self, name):
            if name != "get_run" or self.dropped:
                return getattr(self.client, name)
            self.dropped = True

            def dropped(*args, **kwargs):
                raise MlflowException("API request to http://mlflow/api/2.0/mlflow/runs/get failed with exception "
                                      "ConnectionResetError(104, 'Connection reset by peer')")
            return dropped

    tracker.client = DropsOneRead(tracker.client)
    with pytest.raises(FtlError, match="2 of 2 variants failed: output folder exists and was not written by ftl"):
        sweep(path, tracker=tracker)
    client, runs = runs_of(tracker.uri, "tiny-sweep")
    (sweep_run,) = [r for r in runs if r.data.tags[TAG_STAGE] == "sweep"]
    assert tracker.client.dropped and sweep_run.info.status == "FAILED"
    summary = json.loads((tmp_path / "runs" / "tiny-sweep" / "sweep" / "sweep_summary.json").read_text())
    assert [v["status"] for v in summary["variants"]] == ["failed", "failed"]
    assert (tmp_path / "runs" / "tiny-sweep" / "sweep" / "comparison.html").is_file()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server (SQLite behind it) on a free port; ``stop()`` takes it away."""
    import signal
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
                               str(tmp_path / "server-artefacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own group: the uvicorn worker goes with it

    def stop():
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)

    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop()
                pytest.fail("mlflow server did not start")
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", stop
    stop()


def test_a_refused_call_costs_that_call_and_an_unreachable_server_turns_tracking_off(tmp_path, mlflow_server,
                                                                                      capsys):
    """One parameter the server refuses (a name MLflow does not allow): the rest of that stage and every
    later stage are still logged, with one warning naming it. The server gone: one warning, tracking
    off, and the stages still finish."""
    uri, stop = mlflow_server
    tracker = Tracker.open(uri, "refusals")

    def stage(name, params, metrics):
        with tracker.stage(name, tmp_path / name / "manifest.json") as run:
            record = manifest.new(name, inputs={}, params=params, fingerprint=name)
            record.update(status="complete", metrics=metrics)
            manifest.write(tmp_path / name, record)
        return run.run_id

    first = stage("finetune", {"r": 8, "headers": {"X-Trace?": "1"}}, {"final_loss": 1.5})
    second = stage("export", {"block_size": 32}, {"size_mb": 3.0})
    client = MlflowClient(uri)
    logged = client.get_run(first)
    assert tracker.on and logged.info.status == "FINISHED" and logged.data.metrics["final_loss"] == 1.5
    assert logged.data.params["r"] == "8" and "headers.X-Trace?" not in logged.data.params
    assert client.get_run(second).data.metrics["size_mb"] == 3.0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "refused" in warned[0] and "X-Trace?" in warned[0]
    stop()
    assert stage("eval", {"limit": 2}, {"rougeL": 0.5}) is None and not tracker.on
    assert stage("generate", {}, {"answers": 2}) is None
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "ftl runs sync" in warned[0]
    assert manifest.read(tmp_path / "generate")["status"] == "complete"
