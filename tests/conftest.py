"""Offline, isolated tests: every test runs in its own temp dir with its own models dir.

Session fixtures build a tiny random Llama once and fine-tune/export it once, so the unit tests
that need a trained adapter or an ONNX folder share them (seconds, not minutes).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

# Nothing may reach the Hub or phone home, in the tests or in the Olive child processes.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CI="1",
                  TOKENIZERS_PARALLELISM="false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QA = [
    {"Question": "What is the capital of France?", "Answer": "The capital of France is Paris."},
    {"Question": "How many legs does a spider have?", "Answer": "A spider has eight legs."},
    {"Question": "Name three primary colours.", "Answer": "Red, yellow and blue."},
    {"Question": "Explain photosynthesis briefly.", "Answer": "Plants turn light, water and carbon dioxide into sugar."},
    {"Question": "Write a haiku about the sea.", "Answer": "Waves fold into foam, salt wind carries gull voices."},
    {"Question": "What is 2 + 3?", "Answer": "2 + 3 = 5."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FTL_MODELS_DIR", str(tmp_path / "models"))
    yield tmp_path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", QA)


@contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


@pytest.fixture(scope="session")
def session_cwd(tmp_path_factory) -> Path:
    """The working directory the session fixtures run their stages from (checked to stay empty)."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="session")
def tiny_finetune(tmp_path_factory, tiny_model, qa_file, session_cwd) -> Path:
    from ftl.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("runs") / "finetune"
    with working_directory(session_cwd):
        finetune(FinetuneConfig(model=str(tiny_model), data=qa_file, output=out, max_steps=4, batch_size=2,
                                save_steps=2, learning_rate=1e-2))
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_finetune, session_cwd) -> Path:
    from ftl.export import ExportConfig, export_onnx

    out = tmp_path_factory.mktemp("runs") / "export"
    with working_directory(session_cwd):
        export_onnx(ExportConfig(adapter=tiny_finetune, output=out))
    return out


def kill_9_after(cmd: list[str], out: Path, lines: int, cwd: Path | None = None) -> int:
    """Start ``cmd`` in its own session, kill -9 it once ``out`` has ``lines`` lines; the lines it had."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=cwd)
    deadline = time.time() + 60
    while (not out.exists() or out.read_text().count("\n") < lines) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return out.read_text().count("\n")
