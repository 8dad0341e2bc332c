import pytest

from ftl import manifest
from ftl.errors import ModelNotFoundError
from ftl.models import import_model, list_models, resolve_model


def test_import_hf_folder_writes_safetensors_and_manifest(tiny_model, tmp_path):
    result = import_model(str(tiny_model), name="tiny")
    assert result.path == tmp_path / "models" / "tiny"
    assert (result.path / "model.safetensors").is_file() and (result.path / "tokenizer.json").is_file()
    record = manifest.read(result.path)
    assert record["status"] == "complete" and record["outputs"]["sha256"] == result.sha256
    assert resolve_model("tiny") == result.path
    again = import_model(str(tiny_model), name="tiny")
    assert again.skipped and again.sha256 == result.sha256
    names = {m["name"]: m for m in list_models()}
    assert names["tiny"]["status"] == "complete" and names["smollm2-135m"]["status"] == "not imported"


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no/such/folder")
    assert "no/such/folder" in str(info.value) and "ftl models list" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="models import smollm2-135m"):
        resolve_model("smollm2-135m")
    with pytest.raises(ModelNotFoundError, match="not found"):
        import_model("./missing.gguf")
