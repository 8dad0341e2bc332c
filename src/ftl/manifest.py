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
from importlib import metadata
from pathlib import Path
from typing import Any

from ftl import __version__
from ftl.errors import OutputExistsError

MANIFEST = "manifest.json"
_TRACKED_PACKAGES = ("olive-ai", "onnxruntime", "onnxruntime-genai", "transformers", "peft", "torch")
# Files that define a model's behaviour; logs and manifests are left out of its hash.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".data", ".onnx_adapter", ".gguf", ".json", ".jinja", ".model")


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
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST and p.suffix in _WEIGHT_SUFFIXES
    )
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_dir(path) if path.is_dir() else sha256_file(path)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
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
        "stage": stage,
        "status": "running",
        "fingerprint": fingerprint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "params": params,
        "versions": versions(),
        "hardware": hardware(),
    }


def is_complete(folder: Path, fingerprint: str | None = None) -> bool:
    found = read(folder)
    if not found or found.get("status") != "complete":
        return False
    return fingerprint is None or found.get("fingerprint") == fingerprint


def prepare_output(folder: Path, *, force: bool, stage: str, resumable: bool = False) -> bool:
    """Make ``folder`` ready for a stage's outputs. Returns True when an unfinished run is resumed.

    Finished results are never overwritten without ``force``; a folder ftl did not write is never
    deleted, even with ``force``.
    """
    folder = Path(folder)
    if not folder.exists() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        return False
    found = read(folder)
    if found is None:
        raise OutputExistsError(
            "output folder exists and was not written by ftl",
            str(folder),
            "choose a new --output path, or empty that folder yourself",
        )
    if found.get("status") == "complete" and not force:
        raise OutputExistsError(
            f"output folder already holds a finished {found.get('stage', stage)} result",
            str(folder),
            "pass --force to replace it, or choose a new --output path",
        )
    if found.get("status") != "complete" and resumable and not force:
        return True
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return False
