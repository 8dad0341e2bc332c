#!/usr/bin/env python
"""Where `ftl export-onnx`'s memory goes: the process tree's RSS sampled every 0.5 s, cut into the
phases that the builder's and Olive's log lines mark, beside onnxruntime-genai's builder alone on
the same folder with the options ftl passes.

    python bench/profile_export.py --model /path/to/hf-folder [--adapter ft-out] [--runs og,ftl,ftl-adapter]

Each run is its own process tree in a memory cgroup (bench/models.py's run_limited), one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import GIB, count_parameters, machine, run_limited  # noqa: E402  (bench/models.py)

# (regex on a log line, the phase that starts there), in the order they happen
MARKERS = [
    (r"Running pass merge", "Olive: MergeAdapterWeights (load HF + adapter, merge, save)"),
    (r"Running pass builder", "og: config, tokenizer"),
    (r"GroupQueryAttention|Reading embedding layer", "og: load the HF model (from_pretrained)"),
    (r"Reading layer 0\b", "og: torch -> ONNX graph (lazy fp32 initializers)"),
    (r"Saving ONNX model in", "og: quantise (to_nbits: ir.to_proto + MatMulNBitsQuantizer + from_proto)"),
    (r"Saving \S+ \(", "og: write model.onnx + .data"),
    (r"Pass builder:\S+ finished", "ftl: after the builder (grid record, Olive copy, verify)"),
]


def og_command(model: Path, out: Path) -> list[str]:
    from ftl.export.builder import BuildOptions

    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out), "-p", "int4",
            "-e", "cpu", "-c", str(out / "cache"), "--extra_options", *BuildOptions().extra_options()]


def ftl_command(model: Path, out: Path, adapter: Path | None) -> list[str]:
    source = ["--adapter", str(adapter), "--model", str(model)] if adapter else ["--model", str(model)]
    return [sys.executable, "-m", "ftl", "export-onnx", *source, "--output", str(out), "--grid", "builder",
            "--no-track", "--force"]


def phases(run) -> list[dict]:
    """Peak RSS and seconds of each marked phase (from its mark to the next one)."""
    bounds = [(0.0, "start (imports, plan)")] + sorted(run.marks) + [(run.seconds, "end")]
    rows = []
    for (start, name), (end, _) in zip(bounds, bounds[1:]):
        inside = [rss for t, rss in run.samples if start <= t <= end] or [0.0]
        rows.append({"phase": name, "from_s": round(start, 1), "seconds": round(end - start, 1),
                     "peak_gib": round(max(inside) / 1024, 2), "enter_gib": round(inside[0] / 1024, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an HF folder (e.g. bench/models.py's shapes)")
    parser.add_argument("--adapter", type=Path, help="a LoRA finetune output, for the ftl-adapter run")
    parser.add_argument("--runs", default="og,ftl", help="og, ftl, ftl-adapter (comma-separated, run in turn)")
    parser.add_argument("--work", type=Path, default=Path("profile-export"))
    parser.add_argument("--limit-gib", type=float, default=18.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    params = count_parameters(args.model)
    print(f"machine: {machine()}; {args.model.name}: {params / 1e9:.3f} B parameters; limit {args.limit_gib:g} GiB")
    report = {"machine": machine(), "model": str(args.model), "params": params, "runs": {}}
    for name in args.runs.split(","):
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        command = og_command(args.model, out) if name == "og" else \
            ftl_command(args.model, out, args.adapter if name == "ftl-adapter" else None)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        run = run_limited(command, args.limit_gib, env=env, log=args.work / f"{name}.log",
                          watch=[out / "olive.log"], markers=MARKERS, interval=0.5)
        rows = phases(run)
        status = "ok" if run.code == 0 else f"over {args.limit_gib:g} GiB" if run.over_limit else f"exit {run.code}"
        print(f"\n{name}: {status}, {run.seconds:.0f} s, peak {run.peak_mib / 1024:.2f} GiB "
              f"({run.peak_mib * 2 ** 20 / params:.1f} B/param)")
        print(f"  {'phase':<78} {'from s':>7} {'s':>6} {'peak GiB':>9} {'at entry':>9}")
        for row in rows:
            print(f"  {row['phase']:<78} {row['from_s']:>7} {row['seconds']:>6} {row['peak_gib']:>9} "
                  f"{row['enter_gib']:>9}")
        report["runs"][name] = {"status": status, "seconds": run.seconds, "peak_gib": run.peak_mib / 1024,
                                "phases": rows, "samples": run.samples}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
