import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from ftl import manifest, metrics
from ftl.errors import AdapterMismatchError, ConfigError, OutputExistsError
from ftl.export import ExportConfig, export_onnx
from ftl.generate import OnnxChatModel
from tiny import build_tiny_llama


def test_merged_export_is_a_self_contained_genai_folder(tiny_export, tiny_finetune):
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json", "manifest.json"):
        assert (tiny_export / name).is_file(), name
    record = manifest.read(tiny_export)
    assert record["status"] == "complete" and record["metrics"]["size_mb"] > 0
    assert record["inputs"]["adapter"]["sha256"] == manifest.read(tiny_finetune)["outputs"]["adapter_sha256"]
    assert record["prompt_format"] == manifest.read(tiny_finetune)["prompt_format"]
    assert not list(tiny_export.glob("*.onnx_adapter"))  # merged: no runtime adapter input
    assert not (tiny_export / ".olive-cache").exists() and not (tiny_export / "olive-output").exists()
    workflow = json.loads((tiny_export / "olive_config.json").read_text())
    assert list(workflow["passes"]) == ["merge", "builder"]
    assert workflow["passes"]["builder"]["type"] == "FtlGenaiBuilder"
    # The default: an int8 embedding and head stored once (tied), an int4 body in blocks of 32.
    assert record["outputs"]["layout"] == {"block_size": 32, "body_bits": [4], "head_bits": 8, "embedding_bits": 8,
                                           "tied": True, "zero_points": True, "block_sizes": [32]}
    assert record["outputs"]["built_with_onnxruntime_genai"] == metadata.version("onnxruntime-genai")


def test_onnx_logits_follow_the_merged_pytorch_model(tiny_export, tiny_finetune):
    import onnxruntime_genai as og

    record = manifest.read(tiny_finetune)
    torch_model = metrics.load_merged_torch(record["inputs"]["base_model"]["path"], tiny_finetune / "adapter")
    ids = [5, 17, 42, 99, 7, 64, 3]
    onnx = metrics.onnx_logits(og.Model(str(tiny_export)), ids)
    reference = metrics.torch_logits(torch_model, ids)
    assert onnx.shape == reference.shape
    # int4 noise, but the same function: strongly correlated logits, mostly the same argmax.
    assert np.corrcoef(onnx.ravel(), reference.ravel())[0, 1] > 0.9


def test_keep_adapter_separate_exports_onnx_adapter_with_warning(tiny_finetune, tmp_path):
    result = export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "sep", keep_adapter_separate=True))
    assert result.adapter_file and result.adapter_file.suffix == ".onnx_adapter"
    assert any("slower than a merged export" in w for w in result.warnings)
    model = OnnxChatModel(tmp_path / "sep")
    assert model.adapters is not None
    answer = model.ask("What is the capital of France?", max_new_tokens=5)
    assert answer.new_tokens > 0


def test_export_refuses_existing_output_without_force(tiny_finetune, tiny_export):
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(ExportConfig(adapter=tiny_finetune, output=tiny_export, block_size=64))
    assert manifest.read(tiny_export)["status"] == "complete"


def test_save_config_only_writes_the_workflow(tiny_finetune, tmp_path):
    result = export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "x"), save_config=tmp_path / "wf.json")
    workflow = json.loads((tmp_path / "wf.json").read_text())
    assert result.config_only and workflow["passes"]["builder"]["precision"] == "int4"
    assert workflow["input_model"]["adapter_path"].endswith("adapter")
    assert not (tmp_path / "x").exists()
    # The saved workflow is plain Olive: `olive run` builds it with the package config saved beside it.
    run = subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(tmp_path / "wf.json"),
                          "--package-config", str(tmp_path / "wf.package_config.json")], capture_output=True,
                         text=True, cwd=tmp_path, env={**os.environ, "CI": "1"})
    assert run.returncode == 0, run.stdout[-500:] + run.stderr[-500:]
    assert (tmp_path / "x" / "olive-output" / "model.onnx").is_file()


def test_adapter_from_another_base_model_is_refused(tiny_finetune, tmp_path):
    other = build_tiny_llama(tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(AdapterMismatchError, match="trained on tiny-llama"):
        export_onnx(ExportConfig(adapter=tiny_finetune, model=str(other), output=tmp_path / "x"))
    narrow = build_tiny_llama(tmp_path / "narrow", hidden_size=32)
    bare = tmp_path / "bare-adapter"  # a peft adapter with no ftl manifest: caught by its shapes
    shutil.copytree(tiny_finetune / "adapter", bare)
    with pytest.raises(AdapterMismatchError, match="hidden size 64"):
        export_onnx(ExportConfig(adapter=bare, model=str(narrow), output=tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bare_adapter_needs_a_base_model(tiny_finetune, tmp_path):
    bare = tmp_path / "bare-adapter"
    shutil.copytree(tiny_finetune / "adapter", bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None  # peft's own note of the base is all a bare adapter has
    (bare / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="--model"):
        export_onnx(ExportConfig(adapter=bare, output=tmp_path / "x"))


def test_export_refuses_a_folder_ftl_did_not_write_even_with_force(tiny_finetune, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text(json.dumps({"name": "my web app", "status": "draft"}))
    (site / "index.html").write_text("<h1>hello</h1>")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="not written by ftl"):
            export_onnx(ExportConfig(adapter=tiny_finetune, output=site, force=force))
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "manifest.json"]


def test_nothing_lands_in_the_working_directory(tiny_export, session_cwd):
    # session_cwd is the directory the finetune and export fixtures ran Olive from.
    assert list(session_cwd.iterdir()) == []


@pytest.mark.parametrize("options", [{"int4_algo": "default", "symmetric": False},
                                     {"int4_algo": "k_quant", "symmetric": False, "block_size": 64}])
def test_combinations_that_build_broken_are_refused_before_anything_runs(tiny_finetune, tmp_path, options):
    with pytest.raises(ConfigError, match="use --") as info:
        export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "x", **options))
    assert "\n" not in str(info.value) and not (tmp_path / "x").exists()


def test_rtn_symmetric_block_64_is_built_as_asked(tiny_finetune, tmp_path):
    result = export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "rtn", int4_algo="rtn", block_size=64))
    layout = manifest.read(result.output)["outputs"]["layout"]
    assert layout == {"block_size": 64, "body_bits": [4], "head_bits": 4, "embedding_bits": 4, "tied": True,
                      "zero_points": False, "block_sizes": [64]}


def test_a_silently_ignored_builder_option_is_caught(tiny_model, tmp_path):
    """og 0.18 ignores options under old names without a word; the graph check is what notices."""
    from ftl.errors import OliveRunError
    from ftl.export.builder import BuildOptions, build, verify

    class OldNames(BuildOptions):  # what Olive 0.13's ModelBuilder pass sends
        def extra_options(self):
            return [option if option.startswith("filename") else "int4_" + option for option in super().extra_options()]

    asked = OldNames(algo_config="rtn", block_size=64)
    build(tiny_model, tmp_path / "out", asked, cache_dir=tmp_path / "cache")
    with pytest.raises(OliveRunError, match="block size 32 \\(asked 64\\)"):
        verify(tmp_path / "out", asked, tied_expected=True)


def test_a_folder_from_a_newer_onnxruntime_genai_is_refused_in_one_line(tiny_export, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(tiny_export, newer)
    record = manifest.read(newer)
    record["outputs"]["built_with_onnxruntime_genai"] = "99.0.0"
    manifest.write(newer, record)
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "generate", str(newer), "Hi"], capture_output=True,
                         text=True)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "99.0.0" in errors[0] and "Traceback" not in out.stderr


def test_a_folder_built_by_onnxruntime_genai_0_14_still_loads_and_generates(tiny_model, tmp_path):
    """Folders exported before the move to 0.18 keep working: build one with og 0.14.1's own builder
    (installed beside, in a folder of its own) and answer from it with the installed og."""
    old = tmp_path / "og-0.14.1"
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(old),
                          "onnxruntime-genai==0.14.1"], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"onnxruntime-genai 0.14.1 is not installable here: {got.stderr.strip()[-200:]}")
    built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_model),
                            "-o", str(tmp_path / "folder"), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(old)})
    assert built.returncode == 0, built.stderr[-500:]
    from ftl.export.builder import read_layout

    assert not read_layout(tmp_path / "folder").tied  # 0.14's builder never ties: it is the old layout
    model = OnnxChatModel(tmp_path / "folder")
    answer = model.ask("What is 2 + 3?", max_new_tokens=4)
    assert answer.prompt_tokens > 0
    ids = [5, 17, 42, 99, 7, 64, 3]
    onnx = metrics.onnx_logits(model.model, ids)
    reference = metrics.torch_logits(metrics.load_merged_torch(tiny_model), ids)
    assert np.corrcoef(onnx.ravel(), reference.ravel())[0, 1] > 0.9  # the same function, int4 noise


def test_an_untied_model_exports_with_a_float_embedding(tmp_path, qa_file):
    from ftl.export.builder import read_layout

    untied = build_tiny_llama(tmp_path / "untied", tied=False)
    result = export_onnx(ExportConfig(model=str(untied), output=tmp_path / "onnx"))
    layout = read_layout(result.output)
    assert not layout.tied and layout.embedding_bits is None and layout.head_bits == 8


@pytest.mark.parametrize("algo", ["k_quant_last", "k_quant_mixed"])
def test_every_k_quant_flavour_asymmetric_at_64_is_refused(tiny_finetune, tmp_path, algo):
    with pytest.raises(ConfigError, match="--block-size 32"):
        export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "x", int4_algo=algo, symmetric=False,
                                 block_size=64))


def test_an_export_that_would_not_fit_is_refused_before_anything_loads(tiny_model, tmp_path, monkeypatch):
    """The estimate (fitted to the rows in docs/models.md) against this machine's memory: the overhead
    is raised past what this machine has, as a 7B model's 27 GiB would exceed a 24 GiB one."""
    from ftl.export import stage
    from ftl.system import memory_gib

    monkeypatch.setattr(stage, "EXPORT_OVERHEAD_GIB", memory_gib()[0] + 1)
    with pytest.raises(ConfigError, match=r"need about \d+ GiB to export \(estimated .*\), and this machine's "
                                          r"memory has \d+ GiB") as error:
        export_onnx(ExportConfig(model=str(tiny_model), output=tmp_path / "out"))
    assert "--save-config" in error.value.fix and not (tmp_path / "out").exists()


def test_the_memory_a_check_compares_with_includes_an_address_space_limit():
    """Under `prlimit --as` (or a memory cgroup) the limit, not the machine's RAM, is what a stage has."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
            "from ftl.system import memory_gib; print(*memory_gib(), sep='|')")
    have, where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.strip().split("|")
    assert float(have) == 6.0 and "prlimit" in where
