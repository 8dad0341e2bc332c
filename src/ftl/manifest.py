"""The manifest every ftl output folder carries, and the rules for output folders.

A stage writes ``manifest.json`` with ``status: running`` before it starts and ``status: complete``
when its outputs are checked. The next stage reads it to find its inputs (chaining by path, as
Olive's ``model_config.json`` does), and a pipeline compares ``fingerprint`` to skip work whose
inputs have not changed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from ftl import __version__
from ftl.errors import OutputExistsError
from ftl.system import model_files

MANIFEST = "manifest.json"
# What marks a manifest as ftl's own: only a folder holding one is ever replaced or resumed.
WRITTEN_BY = "ftl"
SCHEMA = 1
_TRACKED_PACKAGES = ("olive-ai", "onnxruntime", "onnxruntime-genai", "transformers", "peft", "torch")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"ftl": __version__, "python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> str:
    """One line that says which CPU the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir(path: Path) -> str:
    """Hash of the files that define a model or adapter, independent of timestamps and logs."""
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read(folder: Path) -> dict[str, Any] | None:
    return read_file(Path(folder) / MANIFEST)


def read_file(path: Path) -> dict[str, Any] | None:
    """A manifest by its own path (a distilled file's sits beside it as ``<name>.manifest.json``)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write atomically, so an interrupted stage never leaves half a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def new(stage: str, *, inputs: dict, params: dict, fingerprint: str) -> dict[str, Any]:
    return {
        "written_by": WRITTEN_BY,
        "schema": SCHEMA,
        "stage": stage,
        "status": "running",
        "fingerprint": fingerprint,
        # This result's own id: MLflow finds its run by it, so `ftl runs sync` never logs it twice.
        "run_uid": uuid.uuid4().hex,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "params": params,
        "versions": versions(),
        "hardware": hardware(),
    }


def is_ftl(record: dict | None) -> bool:
    """A manifest ftl wrote: its marker, a schema version and a stage. A web app's or another tool's
    ``manifest.json`` is not one, so its folder is never replaced or resumed.

    Manifests from before the marker (schema 0) are recognised by the ftl version every ftl
    manifest recorded under ``versions``, so earlier runs can still be resumed or replaced.
    """
    if not isinstance(record, dict) or not isinstance(record.get("stage"), str):
        return False
    if record.get("written_by") == WRITTEN_BY and isinstance(record.get("schema"), int):
        return True
    versions = record.get("versions")
    return "schema" not in record and isinstance(versions, dict) and isinstance(versions.get("ftl"), str) \
        and isinstance(record.get("hardware"), str)


def is_complete(folder: Path, fingerprint: str | None = None) -> bool:
    found = read(folder)
    if not is_ftl(found) or found.get("status") != "complete":
        return False
    return fingerprint is None or found.get("fingerprint") == fingerprint


def check_output(folder: Path, *, force: bool, stage: str, resumable: bool = False) -> str:
    """Decide what may happen to ``folder`` without touching it: "new", "resume" or "replace".

    - A folder ftl did not write is never replaced, even with ``force``.
    - A finished result, or an unfinished folder of another stage, is replaced only with ``force``.
    - An unfinished folder of the same stage is resumed when the stage can resume, else restarted.
    """
    folder = Path(folder)
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return "new"
    found = read(folder)
    if not folder.is_dir() or not is_ftl(found):
        raise OutputExistsError("output folder exists and was not written by ftl", str(folder),
                                "choose a new --output path, or empty that folder yourself")
    other = found["stage"] != stage
    if found.get("status") == "complete" or other:
        if force:
            return "replace"
        what = f"a finished {found['stage']} result" if found.get("status") == "complete" else \
            f"an unfinished {found['stage']} run"
        raise OutputExistsError(f"output folder already holds {what}", str(folder),
                                "pass --force to replace it, or choose a new --output path")
    return "resume" if resumable and not force else "replace"


def prepare_output(folder: Path, *, force: bool, stage: str, resumable: bool = False) -> bool:
    """Make ``folder`` ready for a stage's outputs (see :func:`check_output`). True when resuming."""
    folder = Path(folder)
    decision = check_output(folder, force=force, stage=stage, resumable=resumable)
    if decision == "replace":
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return decision == "resume"


def staging_folder(final: Path) -> Path:
    """A fresh sibling folder to build a replacement in, so the old result survives a failure."""
    final = Path(final)
    staging = final.with_name(f".{final.name}.new-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: Path, final: Path) -> None:
    """Put a finished ``staging`` folder in place of ``final``; the old one goes last."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
