#!/usr/bin/env python
"""Decode speed, time to first token, size and perplexity: exported int4 ONNX vs PyTorch fp32 merged.

Same prompts, greedy, exactly --max-new-tokens new tokens for every backend, all in one run, so the
ratios compare like with like on this machine. When ``llama_cpp`` is importable, the default GGUF
is timed through it too (optional; never a dependency).

    python bench/decode.py --export runs/quickstart/export --prompts 8
    python bench/decode.py --export runs/quickstart/export --export /tmp/other-export   # compare exports
    python bench/decode.py --forms runs/quickstart/finetune --work /tmp/forms   # the exact export's forms, and GGUF

``--forms`` (issue 27) takes a qscale fine-tune of an imported GGUF model and prints, side by side in
one run: the builder's folder of the base, the exact export, and variants of it (graph forms and
onnxruntime session settings), each with its nodes per layer, MB, decode ratio to the builder's
folder (the folders taking turns over --rounds) and answer perplexity against the PyTorch qscale
model; then the same fine-tune written by ``ftl export-gguf`` and run by llama.cpp (when
``llama_cpp`` is importable): its perplexity on the same rows, and its decode against the original
GGUF's, taking turns too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ftl import manifest, metrics
from ftl.chat import PromptFormat
from ftl.generate import OnnxChatModel
from ftl.system import decode_rate, folder_size_mb

console = Console(width=160)
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "self-instruct"


def load_rows(path: Path, limit: int) -> list[dict]:
    rows = []
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        if "instruction" in row:  # self-instruct shape
            inst = row["instances"][0]
            question = row["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
            row = {"Question": question, "Answer": inst["output"]}
        if row.get("Answer", "").strip():
            rows.append(row)
        if len(rows) >= limit:
            break
    return rows


def time_onnx(folder: Path, prompts: list[list[dict]], new_tokens: int) -> dict:
    model = OnnxChatModel(folder)
    og = model._og
    ttfts, rates = [], []
    for i, messages in enumerate([prompts[0]] + prompts):  # the first is a warm-up
        ids = model.prompt_ids(messages)
        params = og.GeneratorParams(model.model)
        params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens,
                                  do_sample=False)
        started = time.perf_counter()
        generator = og.Generator(model.model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        count = 1
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        done = time.perf_counter()
        if i:
            ttfts.append(first - started)
            rates.append(decode_rate(count, first, done))
    return {"ttft_ms": 1000 * statistics.median(ttfts), "tok_s": statistics.median(rates)}


def time_torch(model, tokenizer, fmt: PromptFormat, prompts: list[list[dict]], new_tokens: int) -> dict:
    import torch

    ttfts, rates = [], []
    for i, messages in enumerate([prompts[0]] + prompts):
        ids = torch.tensor([tokenizer(fmt.render_prompt(messages), add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            started = time.perf_counter()
            out = model(ids, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            done = time.perf_counter()
        if i:
            ttfts.append(first - started)
            rates.append(decode_rate(new_tokens, first, done))
    return {"ttft_ms": 1000 * statistics.median(ttfts), "tok_s": statistics.median(rates)}


def time_llama_cpp(prompts: list[str], new_tokens: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from ftl.models.store import builtin_gguf
    from ftl.system import default_threads

    llm = Llama(model_path=str(builtin_gguf("smollm2-135m")), n_ctx=2048, n_threads=default_threads(), verbose=False)
    rates, ttfts = [], []
    for i, prompt in enumerate([prompts[0]] + prompts):
        started = time.perf_counter()
        first = None
        count = 0
        for _ in llm(prompt, max_tokens=new_tokens, temperature=0.0, stream=True):
            count += 1
            first = first or time.perf_counter()
        done = time.perf_counter()
        if i and count > 1:
            ttfts.append(first - started)
            rates.append(decode_rate(count, first, done))
    return {"ttft_ms": 1000 * statistics.median(ttfts), "tok_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, action="append",
                        help="ftl export-onnx output folder; repeat to compare several")
    parser.add_argument("--forms", type=Path, help="a qscale finetune folder: compare the exact export's forms")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftl-forms"), help="--forms: where folders go")
    parser.add_argument("--rounds", type=int, default=5, help="--forms: timing rounds, folders taking turns")
    parser.add_argument("--prompts", type=int, default=8, help="prompts timed (after one warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ppl-data", type=Path, default=SHARED / "user_oriented_instructions.jsonl",
                        help="held-out Q/A for perplexity (default: shared user-oriented instructions)")
    parser.add_argument("--ppl-samples", type=int, default=100)
    parser.add_argument("--skip-torch-timing", action="store_true")
    args = parser.parse_args()
    if args.forms:
        from forms import compare_forms  # bench/forms.py

        compare_forms(args.forms, args.work, rows=load_rows(args.ppl_data, args.ppl_samples), prompts=args.prompts,
                      new_tokens=args.max_new_tokens, rounds=args.rounds)
        return
    if not args.export:
        parser.error("--export or --forms is required")

    from transformers import AutoTokenizer

    first = manifest.read(args.export[0])
    base = Path(first["inputs"]["base_model"]["path"])
    adapter = first["inputs"].get("adapter", {}) or {}
    fmt = PromptFormat(**first["prompt_format"])
    tokenizer = AutoTokenizer.from_pretrained(args.export[0])
    ppl_rows = load_rows(args.ppl_data if args.ppl_data.exists() else Path("data/quickstart/test.jsonl"),
                         args.ppl_samples)
    sequences = [tokenizer(fmt.render_example(fmt.conversation(r["Question"], r["Answer"])),
                           add_special_tokens=False)["input_ids"] for r in ppl_rows]
    prompts = [fmt.conversation(r["Question"]) for r in ppl_rows[: args.prompts]]

    import torch

    from ftl.system import default_threads

    torch.set_num_threads(default_threads())  # the same cores as onnxruntime-genai, for a fair ratio
    console.print(f"[bold]hardware:[/] {manifest.hardware()}; threads: onnxruntime-genai {default_threads()}, "
                  f"torch {torch.get_num_threads()}")
    console.print(f"base {base}, adapter {adapter.get('path')}, {len(prompts)} prompts × "
                  f"{args.max_new_tokens} new tokens (greedy), perplexity on {len(sequences)} held-out Q/A")

    torch_model = metrics.load_merged_torch(base, adapter.get("path"))
    torch_ppl = metrics.torch_perplexity(torch_model, sequences)
    torch_speed = None if args.skip_torch_timing else time_torch(torch_model, tokenizer, fmt, prompts,
                                                                  args.max_new_tokens)
    table = Table("model", "size MB", "decode tok/s", "TTFT ms", "decode × torch", "perplexity", "ppl / torch",
                  title="bench/decode.py")
    if torch_speed:
        table.add_row("PyTorch fp32 merged", f"{sum(p.numel() for p in torch_model.parameters()) * 4 / 1e6:.0f}",
                      f"{torch_speed['tok_s']:.1f}", f"{torch_speed['ttft_ms']:.0f}", "1.00",
                      f"{torch_ppl:.3f}", "1.000")
    del torch_model
    for folder in args.export:
        speed = time_onnx(folder, prompts, args.max_new_tokens)
        ppl = metrics.onnx_perplexity(folder, sequences)
        ratio = f"{speed['tok_s'] / torch_speed['tok_s']:.2f}" if torch_speed else "—"
        table.add_row(f"ONNX {folder}", f"{folder_size_mb(folder):.1f}", f"{speed['tok_s']:.1f}",
                      f"{speed['ttft_ms']:.0f}", ratio, f"{ppl:.3f}", f"{ppl / torch_ppl:.3f}")
    llama = time_llama_cpp([fmt.render_prompt(p) for p in prompts], args.max_new_tokens)
    if llama:
        ratio = f"{llama['tok_s'] / torch_speed['tok_s']:.2f}" if torch_speed else "—"
        table.add_row("llama.cpp GGUF Q4_1", "98.4", f"{llama['tok_s']:.1f}", f"{llama['ttft_ms']:.0f}", ratio,
                      "—", "—")
    else:
        console.print("[dim]llama_cpp not importable: llama.cpp column skipped[/]")
    console.print(table)


if __name__ == "__main__":
    main()
