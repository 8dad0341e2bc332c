"""A wheel install works on its own: the Olive templates (olive_configs/) and py.typed ship in it.

The wheel is built from a copy of the repo (an in-tree build would reuse a stale build/ folder),
installed with --no-deps into a fresh venv that borrows the project venv's dependencies through a
.pth file, and run from a folder outside the repo. A plain path in a .pth file does not process the
.pth files in that folder, so the project's editable install is not seen there: ``ftl`` can only
come from the wheel. A few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Never copied: at the top level, the venv, git, weights and run outputs; anywhere, build debris.
SKIP_TOP = {".git", ".venv", "build", "dist", "models", "runs", "mlruns", ".pytest_cache", ".olive-cache"}
SKIP_ANY = {"__pycache__", ".pytest_cache", ".olive-cache"}


def _ignore(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in SKIP_ANY or n.endswith(".egg-info")}
    if Path(folder).resolve() == REPO:
        skip |= SKIP_TOP & set(names)
    return skip


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_installs_and_finds_its_templates(tmp_path, tiny_model, qa_file):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    # Build.
    source = tmp_path / "src-copy"
    shutil.copytree(REPO, source, ignore=_ignore)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source],
         env=env)
    (wheel,) = wheels.glob("ftl-*.whl")

    # Every module under src/ftl, every template and py.typed are in it (the package list in
    # pyproject.toml is explicit, so a new subpackage must be added there).
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ftl/{p.relative_to(REPO / 'src/ftl').as_posix()}" for p in (REPO / "src/ftl").rglob("*.py")}
    expected |= {f"ftl/olive_configs/{p.name}" for p in (REPO / "olive_configs").glob("*.json")}
    expected |= {"ftl/py.typed", "ftl/olive_configs/finetune_lora.json", "ftl/olive_configs/export_int4.json"}
    assert not expected - names, (f"missing from the wheel: {sorted(expected - names)}; packages and "
                                  "package-data are listed under [tool.setuptools] in pyproject.toml")

    # A fresh venv with only the wheel installed; then the project's dependencies through a .pth
    # (written after the install, so pip does not see the project's editable ftl as installed).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         env=env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env)
                .stdout.strip())
    borrowed = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_ftl_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(borrowed)))

    # Outside the repo, ftl is the wheel's and has its data.
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO)
    probe = _run([python, "-c", "import ftl, importlib.resources as r; print(ftl.__file__); "
                  "print(r.files('ftl').joinpath('py.typed').is_file())"], cwd=work, env=env).stdout.split()
    assert Path(probe[0]).resolve().is_relative_to(venv.resolve()), f"ftl imported from {probe[0]}, not the wheel"
    assert probe[1] == "True", "py.typed is not installed"

    config = work / "workflow.json"
    _run([venv / "bin" / "ftl", "finetune", "--model", tiny_model, "--data", qa_file, "--output", work / "out",
          "--save-config", config], cwd=work, env=env)
    assert json.loads(config.read_text())["passes"]["lora"]["type"] == "FtlLoRA"
