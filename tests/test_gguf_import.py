"""GGUF import one tensor at a time, and an HF folder import by copying: the same model as
transformers' full load, with every quantised matrix's grid beside it."""

from __future__ import annotations

import json

import pytest
import torch

from ftl import manifest
from ftl.errors import OutputExistsError
from ftl.models import import_model


def _full_load(name: str):
    """transformers' own GGUF load of a built-in model, fp32, as the import used to save it."""
    from transformers import AutoModelForCausalLM

    from ftl.models.store import builtin_gguf

    path = builtin_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    model.hf_quantizer = None  # as the import did before it streamed: save_pretrained then writes plain fp32
    del model.config.quantization_config
    return model


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_streamed_gguf_import_is_transformers_full_load_and_keeps_every_grid(name, tmp_path):
    from gguf import GGML_QUANT_SIZES, GGUFReader
    from transformers import AutoModelForCausalLM

    from ftl.models.store import builtin_gguf
    from ftl.quant.gguf_grid import grid_metadata, load_grids, matches

    imported = import_model(name, models_dir=tmp_path / "models")
    streamed = AutoModelForCausalLM.from_pretrained(imported.path, dtype="float32")
    full = _full_load(name)
    ours, theirs = streamed.state_dict(), full.state_dict()
    assert set(ours) == set(theirs)
    different = [key for key in theirs if not torch.equal(ours[key], theirs[key])]
    assert not different, different[:5]
    assert streamed.lm_head.weight.data_ptr() == streamed.model.embed_tokens.weight.data_ptr()  # tied, as saved
    saved = json.loads((imported.path / "config.json").read_text())
    full.save_pretrained(tmp_path / "full")
    assert saved == json.loads((tmp_path / "full" / "config.json").read_text())
    assert imported.parameters == sum(p.numel() for p in full.parameters())

    quantised = [t for t in GGUFReader(builtin_gguf(name)).tensors
                 if len(t.shape) == 2 and GGML_QUANT_SIZES[t.tensor_type][0] > 1]
    grids = load_grids(imported.path)
    assert imported.grids == len(grids) == len(quantised) and imported.warnings == []
    assert {g.kind for g in grids.values()} == {t.tensor_type.name for t in quantised}
    for module, grid in grids.items():
        assert matches(grid, theirs[f"{module}.weight"]), module  # q/k rows in transformers' order too
    record = manifest.read(imported.path)["outputs"]
    assert record["grids"] == len(grids) and record["without_grid"] == []
    assert grid_metadata(imported.path)["source"] == builtin_gguf(name).name


def test_an_import_made_before_the_grids_is_refused_with_what_to_do(tmp_path):
    """A finished GGUF import whose fingerprint predates the grid file is not taken for finished,
    and is not replaced without --force."""
    from ftl.models.store import _locate

    origin, gguf_file = _locate("smollm2-135m")
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    old = manifest.new("import", inputs={}, params={}, fingerprint=manifest.sha256_json(
        {"source": str(origin), "gguf": gguf_file}))
    old.update(status="complete", outputs={"sha256": "x", "parameters": 1})
    manifest.write(target, old)
    with pytest.raises(OutputExistsError, match="--force") as info:
        import_model("smollm2-135m")
    assert "ftl models import smollm2-135m --force" in str(info.value)


def test_an_hf_folder_is_copied_without_loading_the_model(tiny_model, tmp_path, monkeypatch):
    import transformers
    from safetensors.torch import load_file

    def no_load(*_, **__):
        raise AssertionError("the HF folder import loaded the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    result = import_model(str(tiny_model), name="copied")
    source, copied = load_file(tiny_model / "model.safetensors"), load_file(result.path / "model.safetensors")
    assert source.keys() == copied.keys() and all(torch.equal(source[k], copied[k]) for k in source)
    assert result.parameters == sum(t.numel() for t in source.values())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (result.path / name).read_bytes() == (tiny_model / name).read_bytes()
    assert manifest.read(result.path)["outputs"]["parameters"] == result.parameters
