"""Lineage: which adapter, which base model, which manifest. One module, so export, eval and the
pipeline agree on where a model came from.

A finetune folder holds ``adapter/`` and a manifest that records its base model (path and hash)
and its prompt format; an export folder's manifest records the base and the adapter it merged.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftl import manifest
from ftl.errors import AdapterMismatchError, ConfigError, DataError, ModelNotFoundError

ADAPTER = "adapter"
QSCALE = "qscale.safetensors"  # a qscale finetune's trained grid scales (ftl.quant)


def qscale_of(path: Path) -> Path | None:
    """The qscale artefact of a finetune output folder (or the file itself), else None."""
    path = Path(path)
    if path.is_file() and path.name == QSCALE:
        return path
    return path / QSCALE if (path / QSCALE).is_file() else None


def base_of_qscale(artefact: Path) -> str | None:
    """The base model a qscale artefact was trained on, from its finetune manifest."""
    record = manifest.read(Path(artefact).parent)
    if manifest.is_ftl(record) and record.get("stage") == "finetune":
        base = record.get("inputs", {}).get("base_model", {})
        return located(base["path"], base, Path(artefact).parent) if base.get("path") else None
    return None


def adapter_dir_of(path: Path) -> Path:
    """Accept a finetune output folder or the adapter folder itself."""
    path = Path(path)
    if (path / ADAPTER / "adapter_config.json").is_file():
        return path / ADAPTER
    if (path / "adapter_config.json").is_file():
        return path
    raise DataError("no LoRA adapter found", str(path), "give a finetune output folder or a folder with "
                    "adapter_config.json")


def training_record(adapter_dir: Path) -> dict:
    """The finetune manifest an adapter came with ({} for a bare peft adapter)."""
    adapter_dir = Path(adapter_dir)
    for folder in (adapter_dir, adapter_dir.parent):
        record = manifest.read(folder)
        if manifest.is_ftl(record) and record["stage"] == "finetune":
            return record
    return {}


def base_of_adapter(adapter_dir: Path, record: dict | None = None) -> str | None:
    """The base model an adapter was trained on: the finetune manifest's, else peft's own note."""
    record = training_record(adapter_dir) if record is None else record
    recorded = record.get("inputs", {}).get("base_model", {}).get("path")
    if recorded:
        return recorded
    config = Path(adapter_dir) / "adapter_config.json"
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def require_base(adapter_dir: Path, model: str | None) -> str:
    """The base model to use with an adapter: the one given, else the one it was trained on. A
    recorded path that is not on this machine (a fine-tune run as an Azure ML job names its mounted
    input) is found again by its hash among the imported models."""
    if model:
        return model
    found = base_of_adapter(adapter_dir)
    if not found:
        raise ConfigError("cannot tell which base model the adapter belongs to", str(adapter_dir),
                          "pass --model with the base model it was trained on")
    return located(found, training_record(adapter_dir).get("inputs", {}).get("base_model", {}), adapter_dir)


def located(found: str, trained_on: dict, where: Path) -> str:
    """``found`` (a base model path a finetune manifest recorded), or, when that path is not on this
    machine (an Azure ML job records its mounted input), the imported model with the same hash."""
    if not Path(found).is_absolute() or Path(found).exists() or not trained_on.get("sha256"):
        return found
    from ftl.models.store import default_models_dir

    for record_path in sorted(default_models_dir().glob(f"*/{manifest.MANIFEST}")):
        record = manifest.read(record_path.parent) or {}
        if manifest.is_complete(record_path.parent) and record.get("outputs", {}).get("sha256") == trained_on["sha256"]:
            return str(record_path.parent)
    raise ModelNotFoundError(f"the base model it was trained on ({trained_on.get('name', '?')}) is not here: {found}",
                             str(where), "import the same model (ftl models import …) or pass --model with it")


def check_adapter_base(adapter_dir: Path, base: dict) -> None:
    """Refuse an adapter trained on another base model.

    An ftl finetune folder records its base model's hash; a bare peft adapter is checked by the
    shapes of its LoRA matrices against the base model's hidden size.
    """
    adapter_dir = Path(adapter_dir)
    trained_on = training_record(adapter_dir).get("inputs", {}).get("base_model", {})
    if trained_on.get("sha256"):
        if trained_on["sha256"] != base["sha256"]:
            raise AdapterMismatchError(
                f"adapter was trained on {trained_on.get('name', '?')}, not on {base['name']}",
                str(adapter_dir), f"export with --model {trained_on.get('path', 'the base it was trained on')}")
        return
    _check_adapter_shapes(adapter_dir, base)


def export_source(record: dict) -> dict:
    """What an export was built from: base and adapter, each with path and hash (None when absent)."""
    inputs = record.get("inputs", {}) if manifest.is_ftl(record) else {}
    base, adapter = inputs.get("base_model") or {}, inputs.get("adapter") or {}
    return {"base": base.get("sha256"), "adapter": adapter.get("sha256"),
            "base_path": base.get("path"), "adapter_path": adapter.get("path")}


def prompt_format_record(folder: Path) -> dict | None:
    """The prompt format a finetune or export manifest recorded, if any."""
    record = manifest.read(folder)
    return record.get("prompt_format") if manifest.is_ftl(record) else None


def _check_adapter_shapes(adapter_dir: Path, base: dict) -> None:
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return
    with safe_open(str(weights), "pt") as handle:
        for key in handle.keys():
            if "lora_A" in key and any(m in key for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                width = handle.get_slice(key).get_shape()[1]
                if width != base["hidden_size"]:
                    raise AdapterMismatchError(
                        f"adapter expects hidden size {width}, base model {base['name']} has {base['hidden_size']}",
                        str(adapter_dir), "use the base model the adapter was trained on")
                return
