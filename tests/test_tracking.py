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
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [3, 6]
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
    assert metrics["best_step"] == best["step"]
    client = MlflowClient(tracker.uri)
    logged = sorted((m.step, round(m.value, 4)) for m in client.get_metric_history(run.run_id, "eval_loss"))
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
