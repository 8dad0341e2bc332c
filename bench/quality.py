#!/usr/bin/env python
"""int4 quality, one table: what the quickstart's fine-tune becomes in PyTorch and in each export.

Trains and exports through the real CLI (``ftl finetune``, ``ftl export-onnx``), then scores every
model on the same held-out rows: the self-instruct user-oriented tasks (the quickstart's domain,
never trained on) and GSM8K test rows.

Rows: the base (fp32; int4 by og's builder; int4 on its exact GGUF grid), the fp32 LoRA and its
merged int4 exports (builder, and put back on the exact grid), and qscale (PyTorch, and exported:
the offset form and, for one seed, float zero points) for every seed.

Columns: answer-only perplexity; its ratio to the fp32 LoRA (first seed); mean KL and top-1
agreement against that LoRA on the answer positions; ROUGE-L of greedy answers (--gen-rows rows);
the share of those answers that loop (a word 4-gram three times or more); MB on disk; decode tokens/s
as a ratio to today's export (the LoRA merged by og's builder, k_quant_last), measured in the same
run with the folders taking turns over --rounds rounds (the median of per-round ratios).

    python bench/quality.py                    # ~45 min on 2 cores
    python bench/quality.py --seeds 42 --si-rows 40 --gsm-rows 10 --gen-rows 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
console = Console(width=200)


def ftl(*args: str, env: dict) -> None:
    started = time.perf_counter()
    got = subprocess.run([sys.executable, "-m", "ftl", *args], env=env, capture_output=True, text=True)
    if got.returncode:
        raise SystemExit(f"ftl {' '.join(args)} failed:\n{got.stdout[-2000:]}\n{got.stderr[-2000:]}")
    console.print(f"  ftl {' '.join(args[:1])} → {args[args.index('--output') + 1] if '--output' in args else ''} "
                  f"({time.perf_counter() - started:.0f}s)")
    for line in got.stdout.splitlines():
        if "warning" in line:
            console.print(f"  [yellow]{line.strip()}[/]")


def heldout(si_rows: int, gsm_rows: int) -> list[dict]:
    rows = []
    for line in (SHARED / "self-instruct" / "user_oriented_instructions.jsonl").read_text().splitlines():
        task = json.loads(line)
        first = task["instances"][0]
        question = task["instruction"] + (f"\n\n{first['input']}" if first["input"].strip() else "")
        if len(question) + len(first["output"]) <= 1000:
            rows.append({"question": question, "reference": first["output"], "source": "self-instruct"})
    rows = rows[:si_rows]
    for line in (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[:gsm_rows]:
        row = json.loads(line)
        rows.append({"question": row["question"], "reference": row["answer"], "source": "gsm8k"})
    return rows


def score(spec: str, rows: list[dict], gen_rows: int, reference: list | None) -> tuple[dict, list]:
    from ftl.eval.models import load
    from ftl.eval.stage import _damage, _ids, rouge_scorer, rouge_scores
    from ftl.metrics import loops, perplexity, token_nll

    model = load(spec)
    nll, by_source, logits, damage = [], {}, [], []
    for i, row in enumerate(rows):
        ids, start = _ids(model, row)
        out = model.logits(ids)
        logits.append((out, start))
        point = token_nll(out, ids, start)
        nll.append(point)
        by_source.setdefault(row["source"], []).append(point)
        if reference is not None:
            ref, ref_start = reference[i]  # the answer positions' logits, as ftl eval compares them
            damage.append(_damage(out[start - 1:-1], ref[ref_start - 1:-1]))
    scorer, rouge, looping = rouge_scorer(), [], []
    for row in rows[:gen_rows]:
        answer = model.generate(model.format.conversation(row["question"]), 96).text
        rouge.append(rouge_scores(scorer, row["reference"], answer)["rougeL"])
        looping.append(loops(answer))
    positions = sum(d["damage_positions"] for d in damage)
    result = {
        "ppl": perplexity(nll), **{f"ppl {k}": perplexity(v) for k, v in by_source.items()},
        "answer_tokens": sum(c for _, c in nll),
        "kl": sum(d["kl_sum"] for d in damage) / positions if positions else None,
        "top1": sum(d["top1_agree"] for d in damage) / positions if positions else None,
        "rougeL": float(np.mean(rouge)) if rouge else None, "looping": float(np.mean(looping)) if looping else None,
        "mb": model.size_mb(),
    }
    return result, logits


def decode_ratios(folders: dict[str, Path], today: str, rounds: int, tokens: int) -> dict[str, float]:
    """Median over rounds of (tokens/s of a folder) / (tokens/s of today's export), taking turns."""
    import onnxruntime_genai as og

    from ftl.generate import kv_window, load_og_model

    models = {name: load_og_model(path)[0] for name, path in folders.items()}
    windows = {name: kv_window(path) for name, path in folders.items()}  # og refuses a cache below it (Gemma 3)
    prompt = list(range(100, 140))

    def rate(name) -> float:
        params = og.GeneratorParams(models[name])
        params.set_search_options(max_length=max(len(prompt) + tokens, windows[name]),
                                  min_length=len(prompt) + tokens)
        generator = og.Generator(models[name], params)
        generator.append_tokens(prompt)
        started, count = time.perf_counter(), 0
        while not generator.is_done() and count < tokens:
            generator.generate_next_token()
            count += 1
        return count / (time.perf_counter() - started)

    for name in models:
        rate(name)  # warm-up
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        rates = {name: rate(name) for name in models}
        for name in models:
            per_round[name].append(rates[name] / rates[today])
    return {name: statistics.median(values) for name, values in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model (gemma3-270m: a base model, "
                                                                 "trained with a text template)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quality")
    parser.add_argument("--si-rows", type=int, default=150)
    parser.add_argument("--gsm-rows", type=int, default=50)
    parser.add_argument("--gen-rows", type=int, default=16)
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FTL_MODELS_DIR": str(work / "models")}
    seeds = [int(s) for s in args.seeds.split(",")]
    data = str(ROOT / "data" / "quickstart" / "train.jsonl")
    base = work / "models" / args.model

    console.print("[bold]building[/] (kept in --work; a rerun reuses what is there)")
    if not base.is_dir():
        ftl("models", "import", args.model, env=env)
    # A base model without a chat template trains and answers with a text template; its base rows are
    # left out (the base itself has no prompt format to score answers with).
    chat = (base / "chat_template.jinja").is_file() or "chat_template" in (base / "tokenizer_config.json").read_text()
    template = [] if chat else ["--text-template", "Question: {Question}\nAnswer: {Answer}"]
    train = ["--model", args.model, "--data", data, "--max-steps", str(args.steps), "--batch-size", "4", *template]
    for seed in seeds:
        for method in ("lora", "qscale"):
            out = work / f"{method}-{seed}"
            if not (out / "manifest.json").is_file() or json.loads((out / "manifest.json").read_text())["status"] \
                    != "complete":
                ftl("finetune", *train, "--method", method, "--seed", str(seed), "--output", str(out), env=env)
    first = seeds[0]
    from ftl.quant.gguf_grid import grid_metadata

    from ftl.quant.grid import PROJECTIONS

    four_bit = all(g["bits"] == 4 and g["block"] == 32 for name, g in
                   json.loads(grid_metadata(base).get("grids", "{}")).items() if name.rsplit(".", 1)[-1] in PROJECTIONS)
    exports = {
        **({"base int4, builder": ["--model", args.model, "--grid", "builder"],
            "base int4, exact grid": ["--model", args.model]} if chat else {}),
        f"LoRA {first} merged, builder (today)": ["--adapter", str(work / f"lora-{first}"), "--grid", "builder"],
        f"LoRA {first} merged, exact grid": ["--adapter", str(work / f"lora-{first}")],
        **{f"qscale {s} exported": ["--adapter", str(work / f"qscale-{s}")] for s in seeds},
        # float zero points hold 4-bit grids in blocks of 32 only (Q4_1; not Gemma's Q5_0/Q6_K/Q8_0)
        **({f"qscale {first} exported, float-zp": ["--adapter", str(work / f"qscale-{first}"), "--grid-form",
                                                   "float-zp"]} if four_bit else {}),
    }
    folders = {}
    for name, flags in exports.items():
        out = work / "export" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        folders[name] = out
        if not (out / "manifest.json").is_file() or json.loads((out / "manifest.json").read_text())["status"] \
                != "complete":
            ftl("export-onnx", *flags, "--output", str(out), "--force", env=env)

    rows = heldout(args.si_rows, args.gsm_rows)
    console.print(f"[bold]scoring[/] {len(rows)} held-out rows ({args.si_rows} self-instruct, {args.gsm_rows} "
                  f"GSM8K), greedy answers on the first {args.gen_rows}")
    os.environ["FTL_MODELS_DIR"] = env["FTL_MODELS_DIR"]
    specs = {f"LoRA {first}, fp32": f"torch:{work / f'lora-{first}'}", **({"base, fp32": f"torch:{base}"} if chat else {})}
    specs.update({f"LoRA {s}, fp32": f"torch:{work / f'lora-{s}'}" for s in seeds[1:]})
    specs.update({f"qscale {s}, PyTorch": f"torch:{work / f'qscale-{s}'}" for s in seeds})
    specs.update({name: f"onnx:{path}" for name, path in folders.items()})
    results, reference = {}, None
    for name, spec in specs.items():
        started = time.perf_counter()
        # Greedy answers (ROUGE-L, looping) for the first seed's models; the other seeds give perplexity.
        other_seed = any(name.startswith(f"{kind} {s}") for kind in ("LoRA", "qscale") for s in seeds[1:])
        results[name], logits = score(spec, rows, 0 if other_seed else args.gen_rows, reference)
        if reference is None:
            reference = logits
        console.print(f"  {name}: ppl {results[name]['ppl']:.3f} ({time.perf_counter() - started:.0f}s)")

    console.print(f"[bold]decode[/] {args.rounds} rounds of {args.decode_tokens} tokens, folders taking turns")
    today = f"LoRA {first} merged, builder (today)"
    ratios = decode_ratios(folders, today, args.rounds, args.decode_tokens)

    lora_ppl = results[f"LoRA {first}, fp32"]["ppl"]
    table = Table("model", "answer ppl", "× LoRA fp32", "ppl self-instruct", "ppl GSM8K", "KL vs LoRA",
                  "top-1 vs LoRA", "ROUGE-L", "looping", "MB", "decode × today",
                  title=f"int4 quality: {args.model}, {len(rows)} held-out rows "
                        f"({results[today]['answer_tokens']} answer tokens), {args.steps} steps, seeds {args.seeds}")

    def fmt(value, spec=".3f"):
        return "—" if value is None else format(value, spec)

    for name, r in results.items():
        table.add_row(name, fmt(r["ppl"]), fmt(r["ppl"] / lora_ppl), fmt(r.get("ppl self-instruct")),
                      fmt(r.get("ppl gsm8k")), fmt(r["kl"], ".4f"), fmt(r["top1"]), fmt(r["rougeL"]),
                      fmt(r["looping"], ".2f"), fmt(r["mb"], ".1f"), fmt(ratios.get(name), ".2f"))
    console.print(table)
    pairs = [(s, results[f"LoRA {s}, fp32"]["ppl"], results[f"qscale {s} exported"]["ppl"]) for s in seeds]
    console.print("per seed, answer ppl: " + "; ".join(f"seed {s}: LoRA fp32 {a:.3f}, qscale int4 {b:.3f} "
                                                       f"(× {b / a:.3f})" for s, a, b in pairs))
    import onnxruntime_genai
    import torch

    from ftl.system import default_threads

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    console.print(f"machine: {cpu or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                  f"({default_threads()} threads), torch {torch.__version__}, onnxruntime-genai "
                  f"{onnxruntime_genai.__version__}, Python {platform.python_version()}")
    (work / "quality.json").write_text(json.dumps({"results": results, "decode_ratio": ratios,
                                                   "seeds": seeds, "rows": len(rows)}, indent=1))


if __name__ == "__main__":
    main()
