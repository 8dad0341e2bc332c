#!/usr/bin/env python
"""Export settings side by side: size, tying, embedding/head bits, quality and decode speed.

One run builds every candidate from the same base model, with the installed onnxruntime-genai
(og) builder through ftl's own builder code, plus the folder the previous release shipped (og
0.14.1's builder, k_quant, untied; installed into a folder of its own), and prints one table:

- MB on disk, tied or not, embedding and head bits, read from each graph (ftl.export.builder);
- perplexity ratio to the fp32 PyTorch model and top-1 agreement with it, on held-out text (the
  first --rows GSM8K test rows, question + answer), from each folder's own logits through og;
- decode tokens/s (greedy, exactly --new-tokens, --prompts prompts after a warm-up) as a ratio to
  the previous release's folder, measured in the same run: the folders take turns over --rounds
  rounds and the ratio is the median of the per-round ratios (a shared 2-core VM drifts by 10-20%
  between minutes, so back-to-back blocks per folder would measure the drift).

    python bench/export_matrix.py                      # SmolLM2-135M, imported into models/ first
    python bench/export_matrix.py --model models/gemma-3-270m --no-old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ftl import manifest, metrics
from ftl.export.builder import BuildOptions, build, read_layout
from ftl.system import decode_rate, default_threads, folder_size_mb

console = Console(width=180)
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "gsm8k" / "test.jsonl"
CANDIDATES = {
    "k_quant_last (default)": BuildOptions(algo_config="k_quant_last"),
    "default": BuildOptions(algo_config="default"),
    "k_quant": BuildOptions(algo_config="k_quant"),
    "rtn": BuildOptions(algo_config="rtn"),
}


def build_old(model_dir: Path, out: Path, work: Path) -> bool:
    """The previous release's folder: og 0.14.1's builder, k_quant, blocks of 32, an fp32 embedding and
    an int8 head, untied. Its own tied-embedding path builds an invalid graph (Olive's ModelBuilder
    pass patched that into an fp32 Gather), so sharing is off and the embedding stays out of the
    quantised ops here, which gives the same layout."""
    target = work / "og-0.14.1"
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          "onnxruntime-genai==0.14.1"], capture_output=True, text=True)
    if got.returncode:
        console.print(f"[yellow]no og 0.14.1 here ({got.stderr.strip()[-120:]}); skipping the old folder[/]")
        return False
    if (out / "model.onnx").is_file():
        return True
    options = ["int4_algo_config=k_quant", "int4_block_size=32", "int4_op_types_to_quantize=MatMul",
               "shared_embeddings=false"]
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o",
                          str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "cache-old"), "--extra_options",
                          *options], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)})
    if run.returncode:
        console.print(f"[yellow]og 0.14.1 build failed: {run.stderr.strip()[-200:]}[/]")
    return run.returncode == 0


def quality(folder: Path, sequences: list[list[int]], reference: list[np.ndarray]) -> tuple[float, float]:
    from ftl.generate import kv_window, load_og_model

    model, _ = load_og_model(folder)
    nll, agree, count = [], 0, 0
    for ids, ref in zip(sequences, reference):
        logits = metrics.onnx_logits(model, ids, kv_window(folder))
        nll.append(metrics.token_nll(logits, ids))
        agree += int((logits[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())
        count += len(ids) - 1
    return metrics.perplexity(nll), agree / count


def decode_speed(folder: Path, prompts: list[list[int]], new_tokens: int) -> float:
    import onnxruntime_genai as og

    from ftl.generate import kv_window, load_og_model

    model, _ = load_og_model(folder)
    rates = []
    for i, ids in enumerate([prompts[0]] + prompts):  # the first is a warm-up
        params = og.GeneratorParams(model)
        length = max(len(ids) + new_tokens, kv_window(folder))
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        started = time.perf_counter()
        generator.generate_next_token()
        first, count = time.perf_counter(), 1
        while count < new_tokens:
            generator.generate_next_token()
            count += 1
        if i:
            rates.append(decode_rate(count, first - started, time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/smollm2-135m"))
    parser.add_argument("--rows", type=int, default=50, help="held-out GSM8K rows for perplexity and top-1")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds")
    parser.add_argument("--no-old", action="store_true", help="skip the og 0.14.1 folder")
    parser.add_argument("--work", type=Path, help="keep the folders here (default: a temp dir)")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        from ftl.models import import_model

        args.model = import_model("smollm2-135m").path
    from transformers import AutoTokenizer

    import torch

    torch.set_num_threads(default_threads())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[: args.rows]]
    sequences = [tokenizer(r["question"] + "\n" + r["answer"])["input_ids"] for r in rows]
    prompts = [tokenizer(r["question"])["input_ids"] for r in rows[: args.prompts]]
    torch_model = metrics.load_merged_torch(args.model)
    reference = [metrics.torch_logits(torch_model, ids) for ids in sequences]
    fp32_ppl = metrics.perplexity([metrics.token_nll(r, ids) for r, ids in zip(reference, sequences)])
    del torch_model

    work = args.work or Path(tempfile.mkdtemp(prefix="export-matrix-"))
    folders: dict[str, Path] = {}
    if not args.no_old and build_old(args.model, work / "old", work):
        folders["og 0.14.1 k_quant (previous release)"] = work / "old"
    for name, options in CANDIDATES.items():
        out = work / name.split()[0]
        started = time.perf_counter()
        if not (out / "model.onnx").is_file():
            build(args.model, out, options, cache_dir=work / "cache")
        console.print(f"built {name} in {time.perf_counter() - started:.0f}s")
        folders[name] = out

    rows_out, usable = {}, {}
    for name, folder in folders.items():
        try:
            ppl, top1 = quality(folder, sequences, reference)
        except RuntimeError as exc:  # a folder onnxruntime refuses is a result too
            console.print(f"[red]{name}: {str(exc).splitlines()[0][:160]}[/]")
            continue
        usable[name] = folder
        rows_out[name] = [folder_size_mb(folder), read_layout(folder), ppl / fp32_ppl, top1]
    speeds: dict[str, list[float]] = {name: [] for name in usable}
    for _ in range(args.rounds):
        for name, folder in usable.items():
            speeds[name].append(decode_speed(folder, prompts, args.new_tokens))
    first = next(iter(usable))
    for name in usable:
        ratios = [mine / theirs for mine, theirs in zip(speeds[name], speeds[first])]
        rows_out[name] += [statistics.median(speeds[name]), statistics.median(ratios)]
    table = Table("build", "MB", "tied", "embedding / head bits", "ppl ÷ fp32", "top-1", "decode tok/s",
                  "decode × first row (median of rounds)", title=f"export matrix — {args.model.name}")
    for name, (size, layout, ratio, top1, speed, speed_ratio) in rows_out.items():
        embedding = layout.embedding_bits or "fp32"
        table.add_row(name, f"{size:.1f}", "yes" if layout.tied else "no", f"{embedding} / {layout.head_bits}",
                      f"{ratio:.4f}", f"{top1:.4f}", f"{speed:.1f}", f"{speed_ratio:.2f}")
    console.print(table)
    console.print(f"fp32 PyTorch perplexity {fp32_ppl:.3f} on {len(sequences)} GSM8K test rows "
                  f"({sum(map(len, sequences))} tokens); decode: {args.prompts} prompts × {args.new_tokens} new tokens, "
                  f"{args.rounds} interleaved rounds")
    console.print(f"hardware: {manifest.hardware()}; threads {default_threads()}; "
                  f"onnxruntime-genai {manifest.versions()['onnxruntime-genai']}; folders in {work}")


if __name__ == "__main__":
    main()
