"""The CLI boundary: one-line errors naming file, line and fix; non-zero exit; nothing lost."""

import subprocess
import sys

import pytest

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

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so QLoRA is allowed")
    data = write_jsonl(tmp_path / "ok.jsonl", [{"Question": "a", "Answer": "b"}])
    out = ftl("finetune", "--model", tiny_model, "--data", data, "--output", tmp_path / "ft", "--method", "qlora")
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
    assert json.loads((tmp_path / "wf.json").read_text())["passes"]["builder"]["type"] == "FtlGenaiBuilder"


def error_lines(out) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def test_option_typos_and_bad_values_name_the_flag_and_list_every_problem(tmp_path):
    typo = ftl("finetune", "--model", "m", "--data", "d", "--output", tmp_path / "o", "--max-step", "5")
    assert typo.returncode == 2 and len(error_lines(typo)) == 1
    assert "--max-steps" in typo.stderr and "ftl finetune --help" in typo.stderr and "Usage:" not in typo.stderr
    bad = ftl("finetune", "--model", "m", "--data", "d", "--output", tmp_path / "o", "--lora-r", "0",
              "--lora-dropout", "2")
    [line] = error_lines(bad)
    assert bad.returncode == 1 and "2 invalid settings" in line and "--lora-r" in line and "--lora-dropout" in line
    assert " r:" not in line and "dropout:" not in line.replace("--lora-dropout:", "")


def test_unexpected_errors_are_one_line_with_a_debug_hint(tmp_path):
    # A model folder whose config.json is not JSON: nothing ftl checks for, so it is "unexpected".
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    data = write_jsonl(tmp_path / "ok.jsonl", [{"Question": "a", "Answer": "b"}])
    out = ftl("finetune", "--model", broken, "--data", data, "--output", tmp_path / "ft")
    [line] = error_lines(out)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert line.startswith("error: unexpected") and "--debug shows the traceback" in line


def test_third_party_warnings_go_to_the_log_not_the_terminal(tmp_path, tiny_model, monkeypatch):
    log = tmp_path / "ftl.log"
    monkeypatch.setenv("FTL_LOG", str(log))
    # A command that makes the same noise as bitsandbytes' CPU backend and transformers' deprecations.
    code = ("import logging, warnings, click; from ftl.cli import cli, main\n"
            "@cli.command()\n"
            "def noisy():\n"
            "    logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward')\n"
            "    warnings.warn('`foo` is deprecated', FutureWarning)\n"
            "    click.echo('done')\n"
            "main()")
    out = subprocess.run([sys.executable, "-c", code, "noisy"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "done\n", out.stderr
    assert "gemm_4bit_forward" not in out.stderr and "deprecated" not in out.stderr
    assert "gemm_4bit_forward" in log.read_text() and "deprecated" in log.read_text()


def test_error_text_is_not_read_as_markup(tmp_path):
    folder = tmp_path / "[exp]" / "[/answer]"
    out = ftl("generate", folder, "hi")
    [line] = error_lines(out)
    assert out.returncode == 1 and str(folder) in line and "Traceback" not in out.stderr


def test_bare_group_prints_its_help():
    out = ftl("models")
    assert "Commands:" in out.stdout + out.stderr and "error:" not in out.stderr


HEAVY = ("torch", "numpy", "onnxruntime", "onnxruntime_genai", "transformers", "mlflow", "olive", "azure.ai.ml",
         "datasets", "jinja2")


def test_help_loads_no_heavy_library():
    """`ftl --help` (and every subcommand's) imports only the CLI and the config models: the libraries that
    do the work load inside the functions that use them (STYLE 14; torch alone made it 2.1 s and 248 MB)."""
    code = ("import sys\nimport click\nfrom click.testing import CliRunner\nfrom ftl.cli import cli\n"
            "def paths(group, prefix):\n"
            "    for name, command in group.commands.items():\n"
            "        yield prefix + [name]\n"
            "        if isinstance(command, click.Group):\n"
            "            yield from paths(command, prefix + [name])\n"
            "for args in [[]] + list(paths(cli, [])):\n"
            "    result = CliRunner().invoke(cli, args + ['--help'])\n"
            "    assert result.exit_code == 0 and 'Usage:' in result.output, (args, result.output)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
