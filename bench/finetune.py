#!/usr/bin/env python
"""CPU training throughput: ftl's finetune against a plain HF Trainer + PEFT baseline, side by side.

Every variant trains the same rows (ftl's prepared answer-only rows of the quickstart data), the same
LoRA (rank, alpha, dropout, target modules: the ones ftl's run used), the same batch, steps, learning
rate, schedule and seed, fp32 master weights, each in a process of its own (peak RSS is that process
tree's). Tokens/s counts the real (not padding) tokens trained on, over the Trainer's own train()
time, so model loading, Olive's start-up and saving are not in it. Printed: tokens/s, steps/s, peak
RSS, the ratio to the baseline, the final loss, and the loss curves.

    python bench/finetune.py                       # SmolLM2-135M, 16 steps of 4 rows
    python bench/finetune.py --steps 24 --variants baseline,ftl --repeats 3

Variants: baseline (plain Trainer + PEFT, padded batches: what a user writes), ftl (ftl finetune
--method lora: packed rows, the head only on answer positions), ftl-no-packing (ftl with
--no-packing: the levers' share), ftl-bf16 (--precision bf16: autocast on this CPU), qscale (ftl's
QAT mode, --method qscale: the int4 grid's scales, a different computation, reported separately).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("baseline", "ftl", "ftl-no-packing", "ftl-bf16", "qscale")
FLAGS = {"ftl": [], "ftl-no-packing": ["--no-packing"], "ftl-bf16": ["--precision", "bf16"],
         "qscale": ["--method", "qscale"]}


def ftl_run(variant: str, args, out: Path) -> dict:
    from ftl.system import run_measured

    command = [sys.executable, "-m", "ftl", "finetune", "--model", str(args.model), "--data", str(args.data),
               "--output", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--logging-steps", "1", "--save-steps", str(args.steps), "--no-track", *FLAGS[variant]]
    code, wall, peak = run_measured(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if code:
        raise SystemExit(f"{variant}: ftl finetune failed (exit {code}); see {out / 'olive.log'}")
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    return {"tokens": metrics["train_tokens"], "seconds": metrics["train_seconds"], "steps": metrics["steps"],
            "curve": [p["loss"] for p in metrics["loss_curve"]], "peak_mib": peak, "wall": wall}


def baseline_run(args, prepared: Path, targets: list[str], out: Path) -> dict:
    from ftl.system import run_measured

    command = [sys.executable, __file__, "--child-baseline", str(prepared), "--model", str(args.model),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--targets", ",".join(targets),
               "--child-out", str(out)]
    with open(out.with_suffix(".log"), "w") as log:
        code, wall, peak = run_measured(command, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"baseline failed (exit {code}); see {out.with_suffix('.log')}")
    return {**json.loads(out.read_text()), "peak_mib": peak, "wall": wall}


def child_baseline(args) -> None:
    """The plain recipe: transformers' Trainer, peft's LoRA, padded batches, the model's own loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, \
        TrainingArguments

    from ftl.quant.qscale import tokenize_rows
    from ftl.system import default_threads

    torch.set_num_threads(default_threads())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = tokenize_rows(tokenizer, Path(args.child_baseline))
    data = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * start + ids[start:]}
            for ids, start in zip(rows.ids, rows.prompt_lengths)]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=args.targets.split(",")))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    tokens = [0]

    class Counting(Trainer):  # counts the real tokens of the batches trained on (the loader reads one ahead)
        def compute_loss(self, model, inputs, *rest, **kwargs):
            if model.training:
                tokens[0] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *rest, **kwargs)

    tokenizer.pad_token_id = pad
    training = TrainingArguments(
        output_dir=str(Path(args.child_out).with_suffix(".trainer")), per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4, max_steps=args.steps, logging_steps=1, save_strategy="no", seed=42, data_seed=42,
        lr_scheduler_type="cosine", warmup_steps=0.05, dataloader_num_workers=0, report_to="none", use_cpu=True,
        remove_unused_columns=False)
    trainer = Counting(model=model, args=training, train_dataset=data, data_collator=collate)
    result = trainer.train()
    curve = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(args.child_out).write_text(json.dumps({"tokens": tokens[0], "seconds": result.metrics["train_runtime"],
                                                "steps": trainer.state.global_step, "curve": curve}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--data", default=str(ROOT / "data" / "quickstart" / "train.jsonl"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each variant's median run is shown")
    parser.add_argument("--child-baseline", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_baseline:
        return child_baseline(args)

    from rich.console import Console
    from rich.table import Table

    from ftl.manifest import hardware
    from ftl.system import default_threads

    console = Console(width=150)
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"no model at {args.model}: run `ftl models import smollm2-135m` first")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    work = Path(tempfile.mkdtemp(prefix="ftl-bench-finetune-"))
    runs: dict[str, list[dict]] = {}
    # ftl's LoRA run first: its prepared rows and its adapter's target modules are what the baseline uses.
    runs["ftl"] = [ftl_run("ftl", args, work / "ftl")]
    first = runs["ftl"][0]
    console.print(f"  ftl (round 1): {first['tokens'] / first['seconds']:.0f} tokens/s", highlight=False)
    targets = json.loads((work / "ftl" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    # --repeats: the variants take turns, round after round, so a VM's drift reaches them all alike.
    for round_ in range(args.repeats):
        for variant in variants:
            if variant == "ftl" and round_ == 0:
                continue
            if variant == "baseline":
                run = baseline_run(args, work / "ftl" / "train.prepared.jsonl", sorted(targets),
                                   work / f"baseline-{round_}.json")
            else:
                run = ftl_run(variant, args, work / f"{variant}-{round_}")
            runs.setdefault(variant, []).append(run)
            console.print(f"  {variant} (round {round_ + 1}): {run['tokens'] / run['seconds']:.0f} tokens/s",
                          highlight=False)
    # each variant's median run by tokens/s
    results = {v: sorted(r, key=lambda x: x["tokens"] / x["seconds"])[(len(r) - 1) // 2] for v, r in runs.items()}

    base = results.get("baseline")
    base_rate = base["tokens"] / base["seconds"] if base else None
    table = Table(title=f"bench/finetune.py: {args.steps} steps × {args.batch_size} rows, LoRA r=16 on "
                        f"{Path(args.model).name}, targets {','.join(sorted(targets))}; median of "
                        f"{args.repeats} round(s)")
    for column in ("variant", "tokens", "train s", "tokens/s", "steps/s", "× baseline", "peak RSS MiB",
                   "first loss", "final loss (mean of last 4)", "wall s"):
        table.add_column(column)
    for variant in ["baseline", *[v for v in VARIANTS if v != "baseline"]]:
        if variant not in results or (variant not in variants and variant != "ftl"):
            continue
        r = results[variant]
        rate = r["tokens"] / r["seconds"]
        table.add_row(variant, str(r["tokens"]), f"{r['seconds']:.1f}", f"{rate:.0f}",
                      f"{r['steps'] / r['seconds']:.3f}", f"{rate / base_rate:.2f}" if base_rate else "—",
                      f"{r['peak_mib']:.0f}", f"{r['curve'][0]:.4f}", f"{statistics.fmean(r['curve'][-4:]):.4f}",
                      f"{r['wall']:.0f}")
    console.print(table)
    console.print("loss per step:", highlight=False)
    for variant, r in results.items():
        console.print(f"  {variant:>15}: " + " ".join(f"{x:.3f}" for x in r["curve"]), highlight=False)
    console.print(f"hardware: {hardware()}; {default_threads()} threads", highlight=False)
    console.print("tokens/s: real tokens over the Trainer's train() time (the qscale loop's own step time); "
                  "qscale trains the int4 grid's scales (a different computation), shown for its cost only.",
                  highlight=False)


if __name__ == "__main__":
    main()
