"""ftl distill against a real local HTTP server (OpenAI-compatible) with scripted faults."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ftl.distill import DistillConfig, distill
from ftl.distill.stage import TeacherFailed
from ftl.distill.testserver import TeacherServer, onnx_answerer
from ftl.errors import ConfigError, DataError
from conftest import REPO, write_jsonl

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


def test_faults_are_retried_or_rejected_and_nothing_is_lost(tmp_path):
    questions = ["Plain question one", "Rate limited [429]", "Flaky [500x2]", "Dropped [reset]", "Slow [hang]",
                 "Broken [garbage]", "Nothing [empty]", "Refused [refuse]", "Cut [long]"]
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"question": q} for q in questions])
    with TeacherServer(hang_s=2.0) as server:
        result = distill(config(seeds, server))
        assert server.statuses[429] == 1 and server.statuses[500] == 2
    answered = {r["Question"] for r in rows(tmp_path / "out.jsonl")}
    rejected = {r["Question"]: r["reason"] for r in rows(tmp_path / "out.rejects.jsonl")}
    assert answered == {"Plain question one", "Rate limited [429]", "Flaky [500x2]", "Dropped [reset]", "Slow [hang]"}
    assert rejected == {"Broken [garbage]": "bad_response", "Nothing [empty]": "bad_response",
                        "Refused [refuse]": "refusal", "Cut [long]": "truncated"}
    assert result.retries["rate_limit"] == 1 and result.retries["server"] == 2
    assert result.retries["timeout"] == 1 and result.retries["connection"] == 1
    summary = json.loads((tmp_path / "out.manifest.json").read_text())["metrics"]
    assert summary["rejected"] == {"bad_response": 2, "refusal": 1, "truncated": 1}


def test_duplicates_are_dropped_before_asking(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Tell me about the sea and the sky and the stars"},
                                               {"question": "tell me about the sea  and the sky and the stars"},
                                               {"question": "Tell me about the sea and the sky and the stars!"},
                                               {"question": "Something else entirely"}])
    with TeacherServer() as server:
        result = distill(config(seeds, server))
        assert sum(server.statuses.values()) == 2
    assert (result.duplicates_exact, result.duplicates_near, result.answered) == (1, 1, 2)


def test_retry_rejects_asks_again(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Fine"}, {"question": "Down [500x5]"}])
    with TeacherServer() as server:
        first = distill(config(seeds, server, max_retries=1))
        assert first.rejected["server"] == 1 and first.answered == 1
        again = distill(config(seeds, server, max_retries=1))
        assert again.answered == 0 and again.already_done == 1  # rejects are not retried by default
        retried = distill(config(seeds, server, max_retries=5, retry_rejects=True))
    assert retried.answered == 1
    assert [r["Question"] for r in rows(tmp_path / "out.jsonl")] == ["Fine", "Down [500x5]"]
    assert rows(tmp_path / "out.rejects.jsonl") == []


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
        process = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = tmp_path / "out.jsonl"
        deadline = time.time() + 60
        while (not out.exists() or out.read_text().count("\n") < 10) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        before = out.read_text().count("\n")
        assert 10 <= before < 60
        subprocess.run(cmd, check=True, capture_output=True)
    answered = [r["Question"] for r in rows(out)]
    assert sorted(answered) == sorted(f"Question number {i}" for i in range(60))
    assert len(answered) == len(set(answered)) == 60


def test_azure_without_key_needs_entra_id(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("azure.identity") if importlib.util.find_spec("azure") else None:
        pytest.skip("azure-identity is installed: DefaultAzureCredential would be used")
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"question": "Hello?"}])
    with pytest.raises(ConfigError, match="azure-identity"):
        distill(DistillConfig(seeds=str(seeds), output="az.jsonl", teacher="azure",
                              endpoint="https://example.openai.azure.com", model="d"))
