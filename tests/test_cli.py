"""The CLI boundary: one-line errors naming file, line and fix; non-zero exit; nothing lost."""

import subprocess
import sys

from conftest import write_jsonl


def ftl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ftl.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_malformed_data_is_one_line_error(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"Question": "a", "Answer": "b"}, "{oops"])
    out = ftl("finetune", "--model", tiny_model, "--data", data, "--output", tmp_path / "ft")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: malformed JSON") and f"{data}:2" in errors[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "ft").exists()


def test_missing_model_is_one_line_error(tmp_path):
    data = write_jsonl(tmp_path / "ok.jsonl", [{"Question": "a", "Answer": "b"}])
    out = ftl("finetune", "--model", tmp_path / "nope", "--data", data, "--output", tmp_path / "ft")
    assert out.returncode == 1 and "error: model not found" in out.stderr and "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    data = write_jsonl(tmp_path / "ok.jsonl", [{"Question": "a", "Answer": "b"}])
    out = ftl("--debug", "finetune", "--model", tmp_path / "nope", "--data", data, "--output", tmp_path / "ft")
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_qlora_on_cpu_is_one_line_error(tmp_path, tiny_model):
    import torch

    data = write_jsonl(tmp_path / "ok.jsonl", [{"Question": "a", "Answer": "b"}])
    out = ftl("finetune", "--model", tiny_model, "--data", data, "--output", tmp_path / "ft", "--method", "qlora")
    if torch.cuda.is_available():
        return
    assert out.returncode == 1 and "needs a CUDA GPU" in out.stderr and "--method lora" in out.stderr


def test_existing_export_needs_force(tiny_finetune, tiny_export):
    out = ftl("export-onnx", "--adapter", tiny_finetune, "--output", tiny_export, "--block-size", "64")
    assert out.returncode == 1 and "--force" in out.stderr and "Traceback" not in out.stderr


def test_models_list_json_and_save_config(tmp_path, tiny_finetune):
    import json

    listed = ftl("models", "list", "--json")
    assert listed.returncode == 0 and any(m["name"] == "smollm2-135m" for m in json.loads(listed.stdout))
    saved = ftl("export-onnx", "--adapter", tiny_finetune, "--output", tmp_path / "x", "--save-config",
                tmp_path / "wf.json")
    assert saved.returncode == 0, saved.stderr
    assert json.loads((tmp_path / "wf.json").read_text())["passes"]["builder"]["type"] == "ModelBuilder"
