"""ftl distill against a real local HTTP server (OpenAI-compatible) with scripted faults."""

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from ftl.distill import DistillConfig, distill
from ftl.distill.stage import TeacherFailed
from ftl.testing import TeacherServer, onnx_answerer
from ftl.errors import ConfigError, DataError
from conftest import REPO, kill_9_after, write_jsonl

SHARED_SEEDS = REPO.parent / "shared" / "datasets" / "self-instruct" / "seed_tasks.jsonl"


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def config(seeds, server, **kw):
    base = dict(seeds=str(seeds), output="out.jsonl", teacher="openai", base_url=server.url, model="teacher",
                concurrency=4, timeout=1.0, backoff=0.05, max_retries=3)
    return DistillConfig(**{**base, **kw})


def test_real_model_answers_and_output_feeds_finetune(tmp_path, tiny_export, tiny_model, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"question": f"What is {i} + {i}?"} for i in range(6)])
    with TeacherServer(onnx_answerer(tiny_export, max_new_tokens=6)) as server:
        result = distill(config(seeds, server))
    answered = rows(tmp_path / "out.jsonl")
    assert result.answered == 6 and len(answered) == 6
    assert {r["Question"] for r in answered} == {f"What is {i} + {i}?" for i in range(6)}
    assert all(r["Answer"] and r["teacher"] == "openai" and r["finish_reason"] for r in answered)
    from ftl.finetune import FinetuneConfig, finetune  # the output is finetune's input, as it is

    tuned = finetune(FinetuneConfig(model=str(tiny_model), data=tmp_path / "out.jsonl", output=tmp_path / "ft"),
                     save_config=tmp_path / "wf.json")
    assert tuned.rows == 6


def test_faults_are_retried_rejected_or_left_pending_and_nothing_is_lost(tmp_path):
    questions = ["Plain question one", "Rate limited [429]", "Flaky [500x2]", "Dropped [reset]", "Slow [hang]",
                 "Broken [garbage]", "Nothing [empty]", "Refused [refuse]", "Cut [long]", "Too long [400]",
                 "Filtered prompt [filter]", "Withheld answer [filtered]"]
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"question": q} for q in questions])
    with TeacherServer(hang_s=2.0) as server:
        result = distill(config(seeds, server))
        assert server.statuses[429] == 1 and server.statuses[500] == 2
        assert server.statuses[400] == 2  # a permanent 400 is not paid for again
    answered = {r["Question"] for r in rows(tmp_path / "out.jsonl")}
    rejected = {r["Question"]: r["reason"] for r in rows(tmp_path / "out.rejects.jsonl")}
    assert answered == {"Plain question one", "Rate limited [429]", "Flaky [500x2]", "Dropped [reset]", "Slow [hang]"}
    assert rejected == {"Nothing [empty]": "empty", "Refused [refuse]": "refusal", "Cut [long]": "truncated",
                        "Too long [400]": "context_length_exceeded", "Filtered prompt [filter]": "content_filter",
                        "Withheld answer [filtered]": "content_filter"}
    assert result.pending == {"bad_response": 1}  # garbage may parse next time: left for a re-run, not rejected
    assert result.retries["rate_limit"] == 1 and result.retries["server"] == 2 and result.retries["bad_response"] == 3
    assert result.retries["timeout"] == 1 and result.retries["connection"] == 1
    summary = json.loads((tmp_path / "out.manifest.json").read_text())["metrics"]
    assert summary["rejected"] == {"empty": 1, "refusal": 1, "truncated": 1, "context_length_exceeded": 1,
                                   "content_filter": 2}
    assert summary["pending"] == {"bad_response": 1}


def test_a_seed_the_teacher_refuses_with_a_400_does_not_stop_the_run(tmp_path):
    questions = [f"Question {i} [400]" if i % 10 == 0 else f"Question {i}" for i in range(40)]
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": q} for q in questions])
    with TeacherServer() as server:
        result = distill(config(seeds, server))
        assert server.statuses[400] == 4 and server.statuses[200] == 36
    assert result.answered == 36 and result.rejected == {"context_length_exceeded": 4} and not result.pending
    assert {r["Question"] for r in rows(tmp_path / "out.jsonl")} == {q for q in questions if "[400]" not in q}
    rejects = rows(tmp_path / "out.rejects.jsonl")
    assert {r["Question"]: r["reason"] for r in rejects} == {q: "context_length_exceeded" for q in questions[::10]}
    assert all("maximum context length" in r["detail"] for r in rejects)


def test_missing_model_or_deployment_is_still_fatal(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": f"q{i}"} for i in range(10)])
    with TeacherServer(models={"teacher"}) as server:
        with pytest.raises(TeacherFailed, match="no such model or deployment"):
            distill(config(seeds, server, model="no-such-model"))
        assert server.requests == 1 and server.statuses[404] == 1


def test_transient_failures_stay_pending_and_a_rerun_answers_them(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Fine"}, {"question": "Down for a while [500x3]"}])
    with TeacherServer() as server:
        first = distill(config(seeds, server, max_retries=1))  # attempts 1-2 fail
        assert first.answered == 1 and first.pending == {"server": 1} and not first.rejected
        assert not any("Down" in r["Question"] for r in rows(tmp_path / "out.rejects.jsonl"))
        again = distill(config(seeds, server, max_retries=1))  # attempt 3 fails, attempt 4 succeeds
        assert server.attempts["Down for a while [500x3]"] == 4
    assert again.answered == 1 and again.already_done == 1 and not again.pending
    assert [r["Question"] for r in rows(tmp_path / "out.jsonl")] == ["Fine", "Down for a while [500x3]"]


def test_duplicates_are_dropped_before_asking(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Tell me about the sea and the sky and the stars"},
                                               {"question": "tell me about the sea  and the sky and the stars"},
                                               {"question": "Tell me about the sea and the sky and the stars!"},
                                               {"question": "Something else entirely"}])
    with TeacherServer() as server:
        result = distill(config(seeds, server))
        assert sum(server.statuses.values()) == 2
    assert (result.duplicates_exact, result.duplicates_near, result.answered) == (1, 1, 2)


def test_retry_rejects_asks_again_only_for_the_reasons_given(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Fine"}, {"question": "Refused [refuse]"},
                                               {"question": "Cut once [longx1]"}])
    with TeacherServer() as server:
        first = distill(config(seeds, server))
        assert first.answered == 1 and first.rejected == {"refusal": 1, "truncated": 1}
        again = distill(config(seeds, server))
        assert again.answered == 0 and again.already_done == 1 and server.requests == 3  # rejects stay rejected
        retried = distill(config(seeds, server, retry_rejects=["truncated"]))
        assert retried.answered == 1 and not retried.rejected and server.requests == 4  # the refusal is not re-paid
        everything = distill(config(seeds, server, retry_rejects=["all"]))
        assert everything.rejected == {"refusal": 1} and server.requests == 5
    assert [r["Question"] for r in rows(tmp_path / "out.jsonl")] == ["Fine", "Cut once [longx1]"]
    assert [(r["Question"], r["reason"]) for r in rows(tmp_path / "out.rejects.jsonl")] == [("Refused [refuse]",
                                                                                             "refusal")]


def test_retry_rejects_reasons_are_checked(tmp_path):
    base = dict(seeds="s.jsonl", output="o.jsonl")
    assert DistillConfig(**base).retry_rejects is None
    assert DistillConfig(**base, retry_rejects=["truncated", "client_error_413"]).retry_rejects == [
        "truncated", "client_error_413"]
    assert DistillConfig(**base, retry_rejects=["all"]).retry_rejects == ["all"]
    with pytest.raises(ValidationError, match="unknown reject reason 'truncatd'.*refusal, truncated"):
        DistillConfig(**base, retry_rejects=["truncatd"])
    with pytest.raises(ValidationError, match="server"):  # transient failures are pending, never rejects
        DistillConfig(**base, retry_rejects=["server"])
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "distill", "--seeds", "s.jsonl", "--output", "o.jsonl",
                          "--retry-rejects", "truncated,truncatd"], capture_output=True, text=True, cwd=tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "--retry-rejects" in errors[0] and "'truncatd'" in errors[0]
    with pytest.raises(ValidationError):  # the old on/off form is not silently read as "all"
        DistillConfig(**base, retry_rejects=True)


def test_config_is_strict_and_every_field_is_documented():
    with pytest.raises(ValidationError, match="retry_reject"):
        DistillConfig(seeds="s.jsonl", output="o.jsonl", retry_reject=["truncated"])
    undocumented = [name for name, f in DistillConfig.model_fields.items() if not f.description]
    assert undocumented == []


def test_wrong_key_fails_fast_without_printing_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-123456")
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": f"q{i}"} for i in range(20)])
    with TeacherServer(api_key="sk-right") as server:
        with pytest.raises(TeacherFailed) as info:
            distill(config(seeds, server, concurrency=1))
        assert sum(server.statuses.values()) <= 2
    assert "credentials" in str(info.value) and "sk-wrong" not in str(info.value)
    out = subprocess.run([sys.executable, "-m", "ftl", "distill", "--seeds", str(seeds), "--output", "o.jsonl",
                          "--teacher", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                          "--max-retries", "0"], capture_output=True, text=True)
    assert out.returncode == 1 and "sk-wrong" not in out.stderr + out.stdout


def test_azure_teacher_sends_deployment_path_and_key_header(tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-42")
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Hello?"}])
    with TeacherServer() as server:
        endpoint = server.url.removesuffix("/v1")
        result = distill(DistillConfig(seeds=str(seeds), output="az.jsonl", teacher="azure", endpoint=endpoint,
                                       model="my-deployment", api_version="2024-10-21"))
    assert result.answered == 1
    assert server.paths[0].startswith("/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21")
    assert server.auth_headers[0] == "azure-key-42"
    manifest_text = (tmp_path / "az.manifest.json").read_text()
    assert "azure-key-42" not in manifest_text and "my-deployment" in manifest_text


def test_seed_errors_name_the_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok"}, "{nope"])
    with pytest.raises(DataError, match=f"{bad}:2"):
        distill(DistillConfig(seeds=str(bad), output="o.jsonl", teacher="openai", base_url="http://x/v1", model="m"))
    missing = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}])
    with pytest.raises(DataError, match="--question-field"):
        distill(DistillConfig(seeds=str(missing), output="o.jsonl", model="m", teacher="openai", base_url="http://x/v1"))
    with pytest.raises(ConfigError, match="unknown teacher"):
        distill(DistillConfig(seeds=str(missing), output="o.jsonl", teacher="nope", question_field="text"))


def test_json_seeds_are_read_as_json_not_as_lines_of_text(tmp_path):
    questions = ["What is rain?", "Why is the sky blue?", "Name a prime."]
    (tmp_path / "array.json").write_text(json.dumps([{"question": q} for q in questions], indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    with TeacherServer() as server:
        array = distill(config(tmp_path / "array.json", server, output="array.jsonl"))
        lines = distill(config(tmp_path / "lines.json", server, output="lines.jsonl"))
    assert array.answered == lines.answered == 3
    assert sorted(r["Question"] for r in rows(tmp_path / "array.jsonl")) == sorted(questions)
    assert sorted(r["Question"] for r in rows(tmp_path / "lines.jsonl")) == sorted(questions)


def test_parquet_tsv_and_datasets_folder_seeds(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["Parquet one?", "Parquet two?"], "n": [1, 2]}), tmp_path / "s.parquet")
    (tmp_path / "s.tsv").write_text("id\tq\n1\tTab separated, with a comma?\n")
    datasets.Dataset.from_dict({"prompt": ["From a saved dataset?"]}).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "user-cache")  # ~/.cache, normally
    with TeacherServer() as server:
        parquet = distill(config(tmp_path / "s.parquet", server, output="pq.jsonl"))
        tsv = distill(config(tmp_path / "s.tsv", server, output="tsv.jsonl", question_field="q"))
        saved = distill(config(tmp_path / "saved", server, output="saved.jsonl"))
    assert parquet.answered == 2 and sorted(r["Question"] for r in rows(tmp_path / "pq.jsonl")) == [
        "Parquet one?", "Parquet two?"]
    assert tsv.answered == 1 and rows(tmp_path / "tsv.jsonl")[0]["Question"] == "Tab separated, with a comma?"
    assert saved.answered == 1 and rows(tmp_path / "saved.jsonl")[0]["Question"] == "From a saved dataset?"
    assert not (tmp_path / "user-cache").exists()  # the parquet file's arrow copy was not left in the user's cache


@pytest.mark.parametrize("name, content, message", [
    ("seeds.xlsx", b"PK\x03\x04\x14\x00\x06\x00binary workbook", "unsupported seed file"),
    ("seeds.pdf", b"%PDF-1.7\n", "unsupported seed file"),
    ("seeds.parquet.gz", b"\x1f\x8b\x08\x00", "unsupported seed file"),
    ("seeds.txt", b"a question\n\xff\xfe\x00\x81garbage\n", "not UTF-8 text"),
    ("seeds.json", b'{"question": "a"', "malformed JSON"),
])
def test_unreadable_seed_files_are_refused_before_any_request(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with TeacherServer() as server:
        with pytest.raises(DataError, match=message) as info:
            distill(config(tmp_path / name, server))
        assert server.requests == 0
    assert name in str(info.value) and "\n" not in str(info.value)
    if message == "unsupported seed file":
        assert ".jsonl" in str(info.value) and ".parquet" in str(info.value)


def test_a_missing_seed_file_is_not_taken_for_a_hub_dataset(tmp_path):
    def attempt(seeds):
        distill(DistillConfig(seeds=seeds, output="o.jsonl", teacher="openai", base_url="http://x/v1", model="m"))

    with pytest.raises(DataError, match="seed file not found"):
        attempt("nope.jsonl")
    with pytest.raises(DataError, match="cannot read seeds.*nobody/no-such-dataset"):  # a Hub name (offline here)
        attempt("nobody/no-such-dataset")


def test_testing_module_serves_from_the_command_line():
    server = subprocess.Popen([sys.executable, "-m", "ftl.testing"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    finally:
        server.terminate()
        server.wait()


def test_csv_text_and_self_instruct_seeds(tmp_path):
    (tmp_path / "s.csv").write_text("id,q,ctx\n1,Summarise this,The sea is big.\n")
    (tmp_path / "s.txt").write_text("First question\n\nSecond question\n")
    with TeacherServer() as server:
        csv_result = distill(config(tmp_path / "s.csv", server, question_field="q", context_field="ctx",
                                    prompt_template="{question}:\n{context}", output="csv.jsonl"))
        txt_result = distill(config(tmp_path / "s.txt", server, output="txt.jsonl", val_fraction=0.5))
    assert csv_result.answered == 1 and rows(tmp_path / "csv.jsonl")[0]["Question"] == "Summarise this:\nThe sea is big."
    assert txt_result.answered == 2 and sum(txt_result.split.values()) == 2
    assert (tmp_path / "txt.train.jsonl").exists() and (tmp_path / "txt.val.jsonl").exists()


@pytest.mark.skipif(not SHARED_SEEDS.is_file(), reason="../shared/datasets is not beside the checkout")
def test_local_teacher_runs_offline_on_the_shared_seed_tasks(tiny_export, tmp_path):
    result = distill(DistillConfig(seeds=str(SHARED_SEEDS), output="local.jsonl", teacher="local",
                                   model=str(tiny_export), limit=5, max_tokens=8))
    out = rows(tmp_path / "local.jsonl")
    assert result.answered + sum(result.rejected.values()) == 5
    assert all(r["teacher"] == "local" for r in out)


def test_kill_9_then_rerun_answers_every_seed_exactly_once(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": f"Question number {i}"} for i in range(60)])
    with TeacherServer(delay=0.05) as server:
        cmd = [sys.executable, "-m", "ftl", "distill", "--seeds", str(seeds), "--output", "out.jsonl",
               "--teacher", "openai", "--base-url", server.url, "--model", "m", "--concurrency", "2"]
        out = tmp_path / "out.jsonl"
        assert 10 <= kill_9_after(cmd, out, 10) < 60
        subprocess.run(cmd, check=True, capture_output=True)
    answered = [r["Question"] for r in rows(out)]
    assert sorted(answered) == sorted(f"Question number {i}" for i in range(60))
    assert len(answered) == len(set(answered)) == 60


def test_azure_without_key_and_without_an_entra_id_sign_in_is_one_line(tmp_path, monkeypatch):
    # azure-identity is installed (azureml-mlflow needs it), so DefaultAzureCredential is tried; with no
    # sign-in on this machine it finds none, and that is a one-line error naming the ways to give one.
    for name in ("AZURE_OPENAI_API_KEY", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                 "AZURE_USERNAME", "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached az CLI / VS Code sign-in
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Hello?"}])
    with pytest.raises(ConfigError, match="az login"):
        distill(DistillConfig(seeds=str(seeds), output="az.jsonl", teacher="azure",
                              endpoint="https://example.openai.azure.com", model="d"))


def test_a_dropped_connection_on_the_first_request_is_retried_not_fatal(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": q} for q in ("Dropped [reset]", "Second", "Third")])
    with TeacherServer() as server:
        result = distill(config(seeds, server))
    assert result.answered == 3 and result.retries == {"connection": 1}
