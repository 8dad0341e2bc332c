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
    """This process's peak resident set size in MiB (2^20 bytes), since it started this program.

    From /proc's VmHWM, which exec resets. ``getrusage``'s ru_maxrss does not: a child started by a
    3 GB process reports at least 3 GB whatever it loads (Linux keeps the high-water mark across exec),
    which is how every model once got the same figure."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024)


def memory_gib() -> tuple[float, str]:
    """The memory this process may use, in GiB, and what sets it: the machine's RAM, or less where a
    memory cgroup (v1 or v2, this process's group or any above it) or ``prlimit --as`` caps it."""
    found = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory")]
    found += [(limit, "memory cgroup") for limit in _cgroup_limits()]
    address = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address != resource.RLIM_INFINITY:
        found.append((address, "address-space limit (prlimit --as)"))
    have, where = min(found)
    return have / 2**30, where


def _cgroup_limits() -> list[int]:
    """The memory limits of this process's cgroup and its ancestors (none where there are none)."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return limits
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if "memory" in controllers.split(","):
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        elif controllers == "":
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        else:
            continue
        folder = root / group.lstrip("/")
        while True:
            try:
                value = (folder / name).read_text().strip()
                if value.isdigit() and int(value) < 1 << 60:  # v1 writes "no limit" as ~2^63
                    limits.append(int(value))
            except OSError:
                pass
            if folder == root:
                break
            folder = folder.parent
    return limits


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_training(flags: set[str] | None = None) -> str | None:
    """Why bf16 autocast cannot train here (None when it can): a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (without them, torch emulates bf16 and it is slower than fp32)."""
    import torch

    if flags is None and torch.cuda.is_available():
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
    flags = cpu_flags() if flags is None else flags
    if flags & {"avx512_bf16", "amx_bf16"}:
        return None
    return "this CPU has neither AVX512-BF16 nor AMX"


def run_measured(command: list[str], **popen) -> tuple[int, float, float]:
    """Run ``command`` to its end: (exit code, wall seconds, peak RSS in MiB of the process and every
    descendant it waited for). Call it from a small process: Linux starts a child's high-water mark at
    its parent's RSS (see :func:`peak_rss_mib`)."""
    import subprocess
    import time

    started = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - started, rusage_peak_mib(usage)


def rusage_peak_mib(usage) -> float:
    """The peak RSS in MiB of a ``wait4``/``getrusage`` record of waited-for children (the largest
    one's: the kernel keeps no sum)."""
    return usage.ru_maxrss / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024)
