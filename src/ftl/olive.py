"""Running Olive workflows the way ftl needs them: isolated, logged and checked.

Olive is run as ``olive run --config <file>`` in a child process (``python -m ftl.olive_main``:
Olive's CLI without its telemetry exporter), with:
- its cache inside the stage's output folder (Olive's default is ``./.olive-cache`` in the cwd),
  removed after success;
- telemetry off. Only ``CI=1`` stops Olive's telemetry: ``OLIVE_DISABLE_TELEMETRY`` still lets a
  heartbeat out before it is read; and Olive 0.13 still flushes its exporter on exit, waiting about
  12 s for a collector it cannot reach, which :mod:`ftl.olive_main` avoids;
- every line of output in ``olive.log`` beside the results, with a callback for progress.
Olive exits 0 even when a pass produced no model, so callers check their outputs with
:func:`require_files`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Callable

from ftl.errors import OliveRunError

CACHE_DIR = ".olive-cache"
LOG_NAME = "olive.log"
# The repo's top-level olive_configs/, installed as this package (pyproject.toml maps it), so the
# templates are found from a wheel as well as from an editable install.
TEMPLATES_PACKAGE = "ftl.olive_configs"


def load_template(name: str) -> dict:
    """A workflow template from ``olive_configs/`` (package ``ftl.olive_configs``), which ftl fills in."""
    return json.loads(resources.files(TEMPLATES_PACKAGE).joinpath(name).read_text(encoding="utf-8"))


# ftl's own passes, added to Olive's package config (``olive run --package-config``).
FTL_PASSES = {
    "FtlGenaiBuilder": {"module_path": "ftl.export.genai_pass.FtlGenaiBuilder", "supported_providers": ["*"],
                        "supported_accelerators": ["*"], "supported_precisions": ["*"], "supported_algorithms": [],
                        "supported_quantization_encodings": []},
    "FtlLoRA": {"module_path": "ftl.finetune.lora_pass.FtlLoRA", "supported_providers": ["*"],
                "supported_accelerators": ["*"], "supported_precisions": ["*"], "supported_algorithms": [],
                "supported_quantization_encodings": []},
    "FtlQLoRA": {"module_path": "ftl.finetune.lora_pass.FtlQLoRA", "supported_providers": ["*"],
                 "supported_accelerators": ["*"], "supported_precisions": ["*"], "supported_algorithms": [],
                 "supported_quantization_encodings": []},
    "FtlQScale": {"module_path": "ftl.finetune.qscale_pass.FtlQScale", "supported_providers": ["*"],
                  "supported_accelerators": ["*"], "supported_precisions": ["*"], "supported_algorithms": [],
                  "supported_quantization_encodings": []},
}


def package_config(work_dir: Path, path: Path | None = None) -> Path:
    """Olive's own package config plus ftl's passes, written into the stage's Olive cache (or to
    ``path``, beside a saved workflow, so ``olive run --config wf.json --package-config …`` runs it)."""
    # Olive's default package config is olive/olive_config.json (OlivePackageConfig.get_default_config_path);
    # found with find_spec, which locates the package without running its __init__ (which imports
    # Olive's whole CLI: 2.5-4.5 s, for one file name).
    from importlib.util import find_spec

    olive_dir = Path(find_spec("olive").submodule_search_locations[0])
    config = json.loads((olive_dir / "olive_config.json").read_text(encoding="utf-8"))
    config["passes"].update(FTL_PASSES)
    path = Path(path) if path else Path(work_dir) / CACHE_DIR / "package_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def isolated_env(work_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CI"] = "1"  # the only switch that stops Olive's telemetry (see module docstring)
    env["OLIVE_DISABLE_TELEMETRY"] = "1"
    env["OLIVE_TELEMETRY_CACHE_DIR"] = str(work_dir / CACHE_DIR / "telemetry")
    env["HF_DATASETS_CACHE"] = str(work_dir / CACHE_DIR / "hf-datasets")
    # Olive's ModelBuilder and the genai builder default to the Hub cache in the user's home.
    env["HF_HUB_CACHE"] = str(work_dir / CACHE_DIR / "hf-hub")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _child_env(work_dir: Path, extra: dict[str, str | None] | None) -> dict[str, str]:
    merged = {**isolated_env(work_dir), **(extra or {})}
    return {key: value for key, value in merged.items() if value is not None}  # None: unset for the child


def workflow(template: str, *, work_dir: Path, output_dir: Path, **sections) -> dict:
    """Fill a template: paths for cache and output, then the given top-level sections."""
    config = load_template(template)
    config.update(sections)
    config["cache_dir"] = str(Path(work_dir).resolve() / CACHE_DIR)
    config["output_dir"] = str(Path(output_dir).resolve())
    return config


def save_config(config: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def run(config: dict, work_dir: Path, on_line: Callable[[str], None] | None = None,
        env: dict[str, str | None] | None = None) -> Path:
    """Run one workflow; return the log path. Raises OliveRunError on a non-zero exit. ``env`` adds
    variables for the child (MLflow's run, see :func:`ftl.tracking.child_env`)."""
    work_dir = Path(work_dir).resolve()
    config_path = save_config(config, work_dir / "olive_config.json")
    log_path = work_dir / LOG_NAME
    tail: deque[str] = deque(maxlen=40)
    # line-buffered: a long export's log can be followed (tail -f, bench/profile_export.py) as it runs
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ftl.olive_main", "run", "--config", str(config_path),
             "--package-config", str(package_config(work_dir))],
            cwd=work_dir, env=_child_env(work_dir, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,  # text mode splits on \r too, so tqdm updates arrive as lines
        )
        try:
            for line in process.stdout:
                log.write(line)
                tail.append(line.rstrip())
                if on_line:
                    on_line(line)
        except BaseException:
            process.terminate()
            process.wait()
            raise
        code = process.wait()
    if code != 0:
        raise OliveRunError(f"Olive failed (exit {code}): {_last_error(tail)}", str(log_path),
                            "read the log for the full trace")
    return log_path


def require_files(folder: Path, names: list[str], log_path: Path) -> None:
    missing = [n for n in names if not (Path(folder) / n).exists()]
    if missing:
        raise OliveRunError(f"Olive finished but produced no {missing[0]}", str(log_path),
                            "Olive exits 0 when a pass yields no model; read the log for the pass that failed")


def clean_cache(work_dir: Path) -> None:
    shutil.rmtree(Path(work_dir) / CACHE_DIR, ignore_errors=True)


def _last_error(lines) -> str:
    for line in reversed(lines):
        if any(key in line for key in ("Error", "error", "Exception")):
            return line.strip()[:300]
    return (lines[-1].strip()[:300] if lines else "no output")
