import json
from pathlib import Path

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
            # one token: an answer too short to have a decode rate must not break the stage
            "generate": {"questions": ["What is 2 + 3?", "Name a colour."], "max_new_tokens": 1},
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


@pytest.mark.parametrize("imported", [True, False], ids=["after-import", "fresh"])
def test_dry_run_plans_every_stage_and_writes_both_olive_workflows(tmp_path, tiny_model, qa_file, imported):
    from ftl.models import import_model

    path = _pipeline(tmp_path, tiny_model, qa_file)
    if imported:
        import_model(str(tiny_model), name="tiny")
    reports = run(load_pipeline(path), dry_run=True)
    work = tmp_path / "runs" / "tiny"
    assert [(r.stage, r.status) for r in reports] == [
        ("import", "planned"), ("finetune", "planned"), ("export", "planned"), ("generate", "planned"),
        ("eval", "planned")]
    finetune_flow = json.loads((work / "finetune.olive_config.json").read_text())
    assert finetune_flow["passes"]["lora"]["type"] == "FtlLoRA"
    assert finetune_flow["passes"]["lora"]["training_args"]["max_steps"] == 2
    export_flow = json.loads((work / "export.olive_config.json").read_text())
    assert list(export_flow["passes"]) == ["merge", "builder"]
    assert export_flow["input_model"]["adapter_path"] == str((work / "finetune" / "adapter").resolve())
    assert sorted(p.name for p in work.iterdir()) == [
        "export.olive_config.json", "export.olive_config.package_config.json", "finetune.olive_config.json",
        "finetune.olive_config.package_config.json"]


def test_typos_in_any_stage_are_all_reported_before_anything_runs(tmp_path, tiny_model, qa_file):
    path = _pipeline(tmp_path, tiny_model, qa_file)
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["finetune"]["max_step"] = 5
    spec["stages"]["export"]["blocksize"] = 64
    spec["stages"]["eval"]["limt"] = 2
    spec["stages"]["generate"]["max_new_token"] = 4
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="unknown model 'exprot' \\(did you mean export\\?\\)"):
        load_pipeline(_pipeline(tmp_path, tiny_model, qa_file), ["eval.models=[exprot, base]"])
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    for key, hint in (("stages.finetune.max_step", "max_steps"), ("stages.export.blocksize", "block_size"),
                      ("stages.eval.limt", "limit"), ("stages.generate.max_new_token", "max_new_tokens")):
        assert f"{key}: unknown key (did you mean {hint}?)" in message
    assert "4 invalid settings" in message and str(path) in message
    assert not (tmp_path / "runs").exists()


def test_bad_values_and_missing_files_in_late_stages_fail_before_the_first_stage(tmp_path, tiny_model, qa_file):
    path = _pipeline(tmp_path, tiny_model, qa_file)
    with pytest.raises(ConfigError, match="stages.export.block_size"):
        load_pipeline(path, ["export.block_size=33"])
    with pytest.raises(ConfigError, match="stages.finetune"):
        load_pipeline(path, ["finetune.question_field=Answer"])
    from ftl.errors import DataError

    with pytest.raises(DataError, match="no-such-test.jsonl"):
        run(load_pipeline(path, [f"eval.data={tmp_path / 'no-such-test.jsonl'}"]))
    assert not (tmp_path / "runs" / "tiny" / "finetune").exists()
    assert not (tmp_path / "models").exists()  # not even the import ran


def test_a_distil_stage_can_be_the_only_training_data(tmp_path, tiny_model, qa_file):
    spec = yaml.safe_load(_pipeline(tmp_path, tiny_model, qa_file).read_text())
    del spec["stages"]["finetune"]["data"]
    spec["stages"]["distill"] = {"seeds": str(qa_file), "question_field": "Question", "teacher": "local"}
    path = tmp_path / "distil-only.yaml"
    path.write_text(yaml.safe_dump(spec))
    plan = load_pipeline(path)
    assert plan.finetune.data_files == [plan.distill.output]
    del spec["stages"]["distill"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="stages.finetune.data"):
        load_pipeline(path)


def test_override_must_be_key_value(tmp_path, tiny_model, qa_file):
    with pytest.raises(ConfigError, match="key=value"):
        load_pipeline(_pipeline(tmp_path, tiny_model, qa_file), ["finetune.max_steps"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages:\n  finetune: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert str(path) in str(info.value)


def test_quickstart_pipeline_is_valid(monkeypatch):
    """Every stage config of the shipped quickstart is built and checked: a typo there fails here."""
    from ftl.pipeline import check

    monkeypatch.chdir(REPO)
    plan = load_pipeline(REPO / "pipelines" / "quickstart.yaml")
    assert plan.spec.stages.import_.source == "smollm2-135m"
    assert plan.finetune.max_steps == 30 and plan.export.int4_algo == "k_quant_last" and plan.eval.limit == 8
    reports = check(plan)
    assert [r.stage for r in reports] == ["import", "distill", "finetune", "export", "generate", "eval"]
    assert all(r.status == "planned" for r in reports)


def test_library_modules_never_import_the_cli():
    """Arrows point down: only ftl.cli (and ``python -m ftl``) may import ftl.cli. A job gets a stage's
    settings as the typed config itself (finetune.json), never as flags rebuilt from click options."""
    import ast

    package = REPO / "src" / "ftl"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.parts[0] == "cli" or relative == Path("__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{relative}:{node.lineno} {n}" for n in names if n == "ftl.cli" or n.startswith("ftl.cli.")]
    assert not offenders
