"""One home for the facts several stages report about the machine and the files: a folder's size,
the thread count, the decode rate and peak memory. Two helpers that disagree make a reader
distrust every table, so every stage, report and benchmark calls these.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

# Files that make up a model (weights, graphs, configs, tokenizer); logs, manifests and caches don't.
MODEL_SUFFIXES = (".safetensors", ".bin", ".onnx", ".data", ".onnx_adapter", ".gguf", ".json", ".jinja", ".model",
                  ".txt")
_NOT_MODEL = {"manifest.json", "olive_config.json", "olive.log"}


def model_files(folder: Path) -> list[Path]:
    """The files that define a model or adapter in ``folder``, recursively, in a stable order."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES
                  and p.name not in _NOT_MODEL and ".olive-cache" not in p.parts and "checkpoints" not in p.parts)


def folder_size_mb(*folders: Path) -> float:
    """Size on disk of the model files in ``folders``, in MB (10^6 bytes), one decimal."""
    return round(sum(f.stat().st_size for folder in folders if folder for f in model_files(folder)) / 1e6, 1)


def default_threads() -> int:
    """The CPU cores this process may use, container and affinity limits included.

    onnxruntime-genai left alone uses the physical cores (1 on some VMs) and torch picks its own;
    both get this number, so a side-by-side comparison runs on the same cores.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def decode_rate(tokens: int, first_token_s: float, last_token_s: float) -> float | None:
    """Tokens per second after the first one: (tokens - 1) / (time of the last - time of the first).

    ``tokens`` counts the answer's tokens only; the end-of-sequence step is not a token of the
    answer, for any backend.
    """
    if tokens < 2 or last_token_s <= first_token_s:
        return None
    return (tokens - 1) / (last_token_s - first_token_s)


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (2^20 bytes; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
