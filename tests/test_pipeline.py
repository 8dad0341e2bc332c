import json

import pytest
import yaml

from ftl import manifest
from ftl.errors import ConfigError, OutputExistsError
from ftl.pipeline import load_pipeline, run
from conftest import REPO


def _pipeline(tmp_path, tiny_model, qa_file):
    spec = {
        "name": "tiny",
        "workdir": str(tmp_path / "runs" / "tiny"),
        "stages": {
            "import": {"source": str(tiny_model), "name": "tiny"},
            "finetune": {"data": str(qa_file), "max_steps": 2, "batch_size": 2, "save_steps": 1},
            "export": {"int4_algo": "default"},
            "generate": {"questions": ["What is 2 + 3?", "Name a colour."], "max_new_tokens": 4},
            "eval": {"data": str(qa_file), "max_new_tokens": 4, "memory": False, "limit": 3},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_pipeline_chains_stages_and_skips_unchanged_ones(tmp_path, tiny_model, qa_file):
    path = _pipeline(tmp_path, tiny_model, qa_file)
    first = run(load_pipeline(path))
    assert [(r.stage, r.status) for r in first] == [("import", "ran"), ("finetune", "ran"), ("export", "ran"),
                                                     ("generate", "ran"), ("eval", "ran")]
    summary = json.loads((tmp_path / "runs" / "tiny" / "eval" / "metrics_summary.json").read_text())
    onnx = next(v for k, v in summary["models"].items() if k.startswith("onnx:"))
    assert onnx["quantization_source"].endswith("finetune") and onnx["top1_agreement"] > 0
    work = tmp_path / "runs" / "tiny"
    answers = [json.loads(line) for line in (work / "generate" / "answers.jsonl").read_text().splitlines()]
    assert [a["Question"] for a in answers] == ["What is 2 + 3?", "Name a colour."]
    assert manifest.read(work / "export")["inputs"]["adapter"]["path"] == str((work / "finetune" / "adapter").resolve())

    second = run(load_pipeline(path))
    assert [r.status for r in second] == ["skipped"] * 5
    summary = json.loads((work / "pipeline_summary.json").read_text())
    assert [s["status"] for s in summary] == ["skipped"] * 5

    with pytest.raises(OutputExistsError, match="--force"):
        run(load_pipeline(path, ["finetune.max_steps=3"]))
    assert manifest.read(work / "finetune")["metrics"]["steps"] == 2
    changed = run(load_pipeline(path, ["finetune.max_steps=3"]), force=True)
    assert [r.status for r in changed] == ["skipped", "ran", "ran", "ran", "ran"]
    assert manifest.read(work / "finetune")["metrics"]["steps"] == 3


def test_dry_run_validates_and_writes_the_olive_workflow_only(tmp_path, tiny_model, qa_file):
    from ftl.models import import_model

    path = _pipeline(tmp_path, tiny_model, qa_file)
    import_model(str(tiny_model), name="tiny")
    reports = run(load_pipeline(path), dry_run=True)
    work = tmp_path / "runs" / "tiny"
    assert [r.status for r in reports] == ["planned"] * 3
    assert json.loads((work / "finetune.olive_config.json").read_text())["passes"]["lora"]["type"] == "LoRA"
    assert not (work / "finetune").exists() and not (work / "pipeline_summary.json").exists()


def test_override_must_be_key_value(tmp_path, tiny_model, qa_file):
    with pytest.raises(ConfigError, match="key=value"):
        load_pipeline(_pipeline(tmp_path, tiny_model, qa_file), ["finetune.max_steps"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages:\n  finetune: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert str(path) in str(info.value)


def test_quickstart_pipeline_is_valid():
    spec = load_pipeline(REPO / "pipelines" / "quickstart.yaml")
    assert spec.import_.source == "smollm2-135m"
    assert (REPO / spec.finetune["data"]).is_file()
