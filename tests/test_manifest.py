import pytest

from ftl import manifest
from ftl.errors import OutputExistsError


def _finished(folder):
    manifest.write(folder, {**manifest.new("finetune", inputs={}, params={}, fingerprint="f"), "status": "complete"})
    (folder / "result.txt").write_text("precious")


def test_finished_output_is_never_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    _finished(out)
    with pytest.raises(OutputExistsError, match="--force"):
        manifest.prepare_output(out, force=False, stage="finetune")
    assert (out / "result.txt").read_text() == "precious"
    manifest.prepare_output(out, force=True, stage="finetune")
    assert not (out / "result.txt").exists()


def test_folder_ftl_did_not_write_is_never_deleted(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not written by ftl"):
        manifest.prepare_output(out, force=True, stage="export")
    assert (out / "thesis.tex").exists()


def test_unfinished_output_is_resumed(tmp_path):
    out = tmp_path / "out"
    manifest.write(out, manifest.new("finetune", inputs={}, params={}, fingerprint="f"))
    (out / "checkpoint").write_text("half")
    assert manifest.prepare_output(out, force=False, stage="finetune", resumable=True) is True
    assert (out / "checkpoint").exists()


def test_manifest_records_versions_and_hardware(tmp_path):
    record = manifest.new("x", inputs={}, params={}, fingerprint="f")
    assert record["versions"]["olive-ai"] == "0.13.0" and record["versions"]["onnxruntime-genai"] == "0.14.1"
    assert "cores" in record["hardware"]


def test_dir_hash_ignores_manifest_and_logs(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    first = manifest.sha256_dir(tmp_path)
    (tmp_path / "olive.log").write_text("noise")
    manifest.write(tmp_path, {"status": "running"})
    assert manifest.sha256_dir(tmp_path) == first
    (tmp_path / "w.safetensors").write_bytes(b"other")
    assert manifest.sha256_dir(tmp_path) != first
