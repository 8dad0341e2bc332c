#!/usr/bin/env python
"""What each stage costs per model: wall time and peak RSS of import, finetune, int4 export and
generate, each its own `ftl` process (peak RSS is that process tree's), plus the decode rate.
The figures behind docs/models.md.

    python bench/models.py                                  # smollm2-135m and gemma3-270m
    python bench/models.py --models /path/to/Llama-3.2-1B   # any HF folder too
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ftl import manifest
from ftl.system import decode_rate, folder_size_mb, run_measured

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Question: {Question}\nAnswer: {Answer}"  # for base models without a chat template


def stage(name: str, args: list[str], env: dict) -> dict:
    code, seconds, peak = run_measured([sys.executable, "-m", "ftl", *args], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
    if code:
        raise SystemExit(f"{name} failed ({code}): ftl {' '.join(args)}")
    return {"stage": name, "seconds": seconds, "peak_mib": peak}


def measure(model: str, tmp: Path, steps: int) -> list[dict]:
    import os

    env = dict(os.environ, FTL_MODELS_DIR=str(tmp / "models"))
    name = Path(model).name
    rows = [stage("import", ["models", "import", model, "--name", name], env)]
    tokenizer = json.loads((tmp / "models" / name / "tokenizer_config.json").read_text())
    template = [] if "chat_template" in tokenizer else ["--text-template", TEMPLATE]
    rows.append(stage(f"finetune ({steps} steps × 2 rows)", [
        "finetune", "--model", name, "--data", str(ROOT / "data/quickstart/train.jsonl"), "--output",
        str(tmp / "ft"), "--max-steps", str(steps), "--batch-size", "2", "--no-track", *template], env))
    rows.append(stage("export-onnx (int4)", ["export-onnx", "--adapter", str(tmp / "ft"), "--output",
                                             str(tmp / "onnx"), "--no-track"], env))
    out = tmp / "answer.json"
    with open(out, "w") as handle:
        code, seconds, peak = run_measured([sys.executable, "-m", "ftl", "generate", str(tmp / "onnx"),
                                            "What is the capital of France?", "--max-new-tokens", "64", "--json"],
                                           env=env, stdout=handle, stderr=subprocess.DEVNULL)
    answer = json.loads(out.read_text())
    rows.append({"stage": f"generate ({answer['new_tokens']} tokens)", "seconds": seconds, "peak_mib": peak,
                 "decode": decode_rate(answer["new_tokens"], answer["ttft_s"], answer["total_s"])})
    size = folder_size_mb(tmp / "onnx")
    rows.append({"stage": f"int4 folder {size:.0f} MB", "seconds": None, "peak_mib": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    console = Console(width=140)
    console.print(f"[bold]hardware:[/] {manifest.hardware()}")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(model, Path(tmp), args.steps)
        table = Table("stage", "seconds", "peak RSS MiB", "decode", title=model)
        for row in rows:
            decode = row.get("decode")
            table.add_row(row["stage"], f"{row['seconds']:.1f}" if row["seconds"] else "",
                          f"{row['peak_mib']:.0f}" if row["peak_mib"] else "",
                          f"{decode:.1f} tok/s ({1000 / decode:.1f} ms/token)" if decode else "")
        console.print(table)


if __name__ == "__main__":
    main()
