#!/usr/bin/env python
"""The quickstart's quality bar, measured with ftl eval in one run: int4 ONNX vs PyTorch fp32.

On the first 100 shared user-oriented instructions (or GSM8K test with --gsm8k), with the
quickstart fine-tune: the perplexity ratio (target <= 1.05), top-1 agreement (>= 0.9), the
ROUGE-L difference (<= 0.02 absolute) and the decode speed ratio (>= 7x).

    python bench/eval_quickstart.py --workdir runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ftl.eval import EvalConfig, evaluate

console = Console(width=140)
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def qa_file(source: Path, limit: int, out: Path) -> Path:
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "instruction" in row:
            inst = row["instances"][0]
            question = row["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
            row = {"Question": question, "Answer": inst["output"]}
        else:
            row = {"Question": row["question"], "Answer": row["answer"]}
        if row["Answer"].strip():
            rows.append(row)
        if len(rows) >= limit:
            break
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gsm8k", action="store_true", help="GSM8K test instead of user-oriented instructions")
    args = parser.parse_args()
    source = SHARED / ("gsm8k/test.jsonl" if args.gsm8k else "self-instruct/user_oriented_instructions.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        data = qa_file(source, args.limit, Path(tmp) / "test.jsonl")
        onnx, torch_model = f"onnx:{args.workdir / 'export'}", f"torch:{args.workdir / 'finetune'}"
        result = evaluate(EvalConfig(models=[onnx, torch_model], data=str(data), output=Path(tmp) / "eval",
                                     max_new_tokens=args.max_new_tokens, memory=False))
    o, t = result.summary["models"][onnx], result.summary["models"][torch_model]
    table = Table("measure", "int4 ONNX", "PyTorch fp32", "ratio / diff", "target", "met",
                  title=f"bench/eval_quickstart.py — {result.summary['samples']} samples of {source.name}")
    checks = [
        ("answer perplexity", o["perplexity_answer"], t["perplexity_answer"],
         o["perplexity_answer"] / t["perplexity_answer"], "<= 1.05", lambda v: v <= 1.05),
        ("top-1 agreement", o["top1_agreement"], None, o["top1_agreement"], ">= 0.9", lambda v: v >= 0.9),
        ("ROUGE-L", o["rougeL"], t["rougeL"], o["rougeL"] - t["rougeL"], "|diff| <= 0.02", lambda v: abs(v) <= 0.02),
        ("decode tok/s", o["decode_tokens_per_s"], t["decode_tokens_per_s"],
         o["decode_tokens_per_s"] / t["decode_tokens_per_s"], ">= 7", lambda v: v >= 7),
    ]
    for name, a, b, value, target, ok in checks:
        table.add_row(name, f"{a:.4f}", "—" if b is None else f"{b:.4f}", f"{value:.3f}", target,
                      "yes" if ok(value) else "no")
    console.print(f"[bold]hardware:[/] {result.summary['hardware']}; threads onnx {o['threads']}, torch {t['threads']}; "
                  f"KL {o['kl_divergence']:.4f}; {args.max_new_tokens} new tokens per answer")
    console.print(table)


if __name__ == "__main__":
    main()
