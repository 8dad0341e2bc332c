import json

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
    assert record["versions"]["olive-ai"] == "0.13.0" and record["versions"]["onnxruntime-genai"] == "0.18.0"
    assert "cores" in record["hardware"]


def test_dir_hash_ignores_manifest_and_logs(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    first = manifest.sha256_dir(tmp_path)
    (tmp_path / "olive.log").write_text("noise")
    manifest.write(tmp_path, {"status": "running"})
    assert manifest.sha256_dir(tmp_path) == first
    (tmp_path / "w.safetensors").write_bytes(b"other")
    assert manifest.sha256_dir(tmp_path) != first


def test_a_manifest_ftl_did_not_write_is_not_ftls(tmp_path):
    # A web app's folder: its own manifest.json (even one with status "running") plus its files.
    for foreign in ({"name": "app", "icons": []}, {"status": "running"}, {"stage": "export", "status": "failed"}):
        site = tmp_path / f"site{len(list(tmp_path.iterdir()))}"
        site.mkdir()
        (site / "manifest.json").write_text(json.dumps(foreign))
        (site / "index.html").write_text("<html></html>")
        for force in (False, True):
            with pytest.raises(OutputExistsError, match="not written by ftl"):
                manifest.prepare_output(site, force=force, stage="export")
        assert (site / "index.html").exists()


def test_unfinished_folder_of_another_stage_needs_force(tmp_path):
    out = tmp_path / "out"
    manifest.write(out, manifest.new("finetune", inputs={}, params={}, fingerprint="f"))  # running, unfinished
    (out / "checkpoint").write_text("half a training run")
    with pytest.raises(OutputExistsError, match="unfinished finetune"):
        manifest.prepare_output(out, force=False, stage="export")
    assert (out / "checkpoint").exists()
    manifest.prepare_output(out, force=True, stage="export")
    assert not (out / "checkpoint").exists()


def test_written_manifest_carries_the_marker(tmp_path):
    record = manifest.new("export", inputs={}, params={}, fingerprint="f")
    assert manifest.is_ftl(record) and record["schema"] == manifest.SCHEMA
    assert not manifest.is_ftl({k: v for k, v in record.items() if k != "written_by"})


def test_swap_in_replaces_last(tmp_path):
    final = tmp_path / "report"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = manifest.staging_folder(final)
    assert staging.parent == final.parent and (final / "old.txt").exists()
    (staging / "new.txt").write_text("new")
    manifest.swap_in(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_manifests_from_before_the_marker_are_still_ftls(tmp_path):
    out = tmp_path / "old-run"
    old = {k: v for k, v in manifest.new("finetune", inputs={}, params={}, fingerprint="f").items()
           if k not in ("written_by", "schema")}
    manifest.write(out, {**old, "status": "complete"})
    with pytest.raises(OutputExistsError, match="finished finetune"):
        manifest.prepare_output(out, force=False, stage="finetune")
    assert manifest.prepare_output(out, force=True, stage="finetune") is False
    assert not manifest.is_ftl(["not", "a", "dict"])
