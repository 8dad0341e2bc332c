"""The ftl command line: parse options, call the library, print a result. Nothing else lives here.

Library errors (:class:`ftl.errors.FtlError`) are turned into one line here, and only here:
``error: <what> (<where>) — <fix>``. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from pydantic import ValidationError
from rich.table import Table

from ftl.errors import FtlError
from ftl.progress import console, run_with_progress, task_progress

_DEBUG = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="ftl")
def cli(debug: bool) -> None:
    """ftl: distil → fine-tune (Olive LoRA) → int4 ONNX → fast CPU inference (onnxruntime-genai)."""
    _DEBUG["on"] = debug


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@cli.group()
def models() -> None:
    """Import and list base models (local HF safetensors folders under models/)."""


@models.command("import")
@click.argument("source")
@click.option("--name", help="Folder name under the models dir (default: derived from SOURCE).")
@click.option("--models-dir", type=click.Path(path_type=Path), help="Default: ./models or $FTL_MODELS_DIR.")
@click.option("--force", is_flag=True, help="Replace an existing import.")
def models_import(source: str, name: str | None, models_dir: Path | None, force: bool) -> None:
    """Import SOURCE: a built-in name (smollm2-135m), a .gguf file, an HF folder, or an HF Hub id."""
    from ftl.models import import_model

    with task_progress(f"importing {source}"):
        result = import_model(source, name=name, models_dir=models_dir, force=force)
    verb = "already imported" if result.skipped else f"imported in {result.seconds:.1f}s"
    console.print(f"[green]✓[/] {result.name} {verb} → {result.path} "
                  f"({result.parameters / 1e6:.0f}M parameters, sha256 {result.sha256[:12]})")


@models.command("list")
@click.option("--models-dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(models_dir: Path | None, as_json: bool) -> None:
    """Show imported models and the built-in ones that can be imported offline."""
    from ftl.models import list_models

    found = list_models(models_dir)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table = Table("name", "status", "size (MB)", "parameters", "source")
    for m in found:
        params = f"{m['parameters'] / 1e6:.0f}M" if m["parameters"] else "—"
        table.add_row(m["name"], m["status"], str(m["size_mb"] or "—"), params, m["source"])
    console.print(table)


# ---------------------------------------------------------------------------------------------
# distill
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--seeds", required=True, help="JSONL/CSV/text file of seed questions, or a datasets folder/name.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Q/A JSONL (appended, resumable).")
@click.option("--teacher", default="local", show_default=True,
              help="openai (any OpenAI-compatible endpoint), azure, or local.")
@click.option("--model", help="Teacher model / Azure deployment / local model folder.")
@click.option("--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1. Key: $OPENAI_API_KEY.")
@click.option("--endpoint", help="Azure OpenAI endpoint. Key: $AZURE_OPENAI_API_KEY, else Entra ID.")
@click.option("--api-version", default="2024-10-21", show_default=True)
@click.option("--question-field", help="Seed column with the question (default: guessed).")
@click.option("--context-field", help="Seed column with context to add to the prompt.")
@click.option("--reference-field", help="Seed column with a reference answer (kept as 'reference').")
@click.option("--dataset-split", help="datasets split when --seeds is a dataset (default: train).")
@click.option("--system-prompt")
@click.option("--prompt-template", default="{question}", show_default=True, help="Placeholders {question}, {context}.")
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--n", type=int, default=1, show_default=True, help="Answers per seed; the best is kept.")
@click.option("--concurrency", type=int, default=8, show_default=True)
@click.option("--rpm", type=int, help="Requests-per-minute budget.")
@click.option("--tpm", type=int, help="Tokens-per-minute budget.")
@click.option("--max-retries", type=int, default=5, show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--limit", type=int, help="Only the first N seeds.")
@click.option("--split", "val_fraction", type=float, help="Also write <output>.train/.val.jsonl with this val fraction.")
@click.option("--price-input", type=float, help="Price per 1M prompt tokens (cost estimate).")
@click.option("--price-output", type=float, help="Price per 1M completion tokens.")
@click.option("--retry-rejects", is_flag=True, help="Ask again for the seeds in <output>.rejects.jsonl.")
@click.option("--json", "as_json", is_flag=True)
def distill(as_json: bool, **options) -> None:
    """A teacher answers seed questions into Q/A JSONL that ftl finetune takes as it is."""
    from ftl.distill import DistillConfig
    from ftl.distill import distill as run_distill

    config = DistillConfig(**options)
    with task_progress("distilling", total=None) as (progress, task):
        def on_progress(result):
            done = result.answered + sum(result.rejected.values())
            progress.update(task, completed=done, info=f"{result.answered} ok, {sum(result.rejected.values())} "
                            f"rejected, {result.completion_tokens} tokens, {sum(result.retries.values())} retries")
        result = run_distill(config, on_progress=on_progress)
    summary = {"answered": result.answered, "already_done": result.already_done, "rejected": dict(result.rejected),
               "duplicates_exact": result.duplicates_exact, "duplicates_near": result.duplicates_near,
               "retries": dict(result.retries), "prompt_tokens": result.prompt_tokens,
               "completion_tokens": result.completion_tokens, "estimated_cost": result.cost,
               "seconds": round(result.seconds, 2), "output": str(result.output), "rejects": str(result.rejects),
               "split": result.split}
    if as_json:
        click.echo(json.dumps(summary))
        return
    table = Table("answered", "already done", "rejected", "duplicates", "retries", "tokens (in/out)", "time",
                  title="distill")
    rejected = ", ".join(f"{k} {v}" for k, v in result.rejected.items()) or "0"
    retries = ", ".join(f"{k} {v}" for k, v in result.retries.items()) or "0"
    table.add_row(str(result.answered), str(result.already_done), rejected,
                  f"{result.duplicates_exact} exact, {result.duplicates_near} near", retries,
                  f"{result.prompt_tokens}/{result.completion_tokens}", f"{result.seconds:.1f}s")
    console.print(table)
    cost = f", estimated cost {result.cost:.4f}" if result.cost is not None else ""
    console.print(f"[green]✓[/] {result.output} (rejects: {result.rejects}){cost}")


# ---------------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--model", required=True, help="Base model folder, or a name under models/.")
@click.option("--data", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Q/A JSONL or chat messages JSONL; repeat to train on several files.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--question-field", default="Question", show_default=True)
@click.option("--answer-field", default="Answer", show_default=True)
@click.option("--messages-field", default="messages", show_default=True)
@click.option("--system-prompt", help="System message added to every conversation.")
@click.option("--text-template", help="e.g. '### Q: {Question}\\n### A: {Answer}' instead of the chat template.")
@click.option("--method", type=click.Choice(["lora", "qlora"]), default="lora", show_default=True)
@click.option("--lora-r", "r", type=int, default=16, show_default=True)
@click.option("--lora-alpha", "alpha", type=float, default=32, show_default=True)
@click.option("--lora-dropout", "dropout", type=float, default=0.05, show_default=True)
@click.option("--target-modules", help="Comma-separated module names (default: peft's for the model type).")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, help="Overrides --epochs.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--learning-rate", type=float, default=2e-4, show_default=True)
@click.option("--max-seq-len", type=int, default=1024, show_default=True)
@click.option("--logging-steps", type=int)
@click.option("--save-steps", type=int, default=10, show_default=True, help="Checkpoint interval for resume.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--save-config", type=click.Path(path_type=Path), help="Write the Olive workflow and stop.")
@click.option("--force", is_flag=True, help="Replace a finished result in --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def finetune(save_config: Path | None, as_json: bool, target_modules: str | None, **options) -> None:
    """LoRA fine-tuning through Olive. Every row is used; the loss goes to the manifest."""
    from ftl.finetune import FinetuneConfig
    from ftl.finetune import finetune as run_finetune

    options["data"] = list(options["data"]) if len(options["data"]) > 1 else options["data"][0]
    config = FinetuneConfig(**options, target_modules=target_modules.split(",") if target_modules else None)
    result = run_with_progress("fine-tuning", lambda cb: run_finetune(config, save_config=save_config,
                                                                        on_progress=cb))
    print_finetune(result, as_json)


def print_finetune(result, as_json: bool = False) -> None:
    if result.config_only:
        console.print(f"[green]✓[/] Olive workflow written ({result.rows} rows, {result.tokens} tokens, "
                      f"{result.steps} steps); nothing was trained")
        return
    if as_json:
        click.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}))
        return
    table = Table("rows", "tokens", "steps", "first loss", "final loss", "time", title="finetune")
    first = f"{result.loss_curve[0]['loss']:.4f}" if result.loss_curve else "—"
    final = f"{result.final_loss:.4f}" if result.final_loss is not None else "—"
    note = " (unchanged, skipped)" if result.skipped else " (resumed)" if result.resumed else ""
    table.add_row(str(result.rows), str(result.tokens), str(result.steps), first, final,
                  f"{result.seconds:.0f}s{note}")
    console.print(table)
    console.print(f"[green]✓[/] adapter → {result.adapter}")


# ---------------------------------------------------------------------------------------------
# export-onnx
# ---------------------------------------------------------------------------------------------
@cli.command("export-onnx")
@click.option("--adapter", type=click.Path(path_type=Path), help="Finetune output folder or peft adapter folder.")
@click.option("--model", help="Base model (default: the one the adapter was trained on).")
@click.option("--output", required=True, type=click.Path(path_type=Path))
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 block size.")
@click.option("--op-types", default="MatMul,Gather", show_default=True, help="Ops quantized to int4.")
@click.option("--int4-algo", type=click.Choice(["default", "rtn", "k_quant", "k_quant_mixed", "k_quant_last"]),
              default="k_quant", show_default=True,
              help="ModelBuilder int4 algorithm; 'default' is smallest (~105 MB for SmolLM2), k_quant more accurate.")
@click.option("--accuracy-level", type=int, help="MatMulNBits accuracy level (1 fp32 … 4 int8).")
@click.option("--keep-adapter-separate", is_flag=True,
              help="Export base + .onnx_adapter for multi-LoRA serving (decode ~7x slower).")
@click.option("--save-config", type=click.Path(path_type=Path), help="Write the Olive workflow and stop.")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def export_onnx(op_types: str, save_config: Path | None, as_json: bool, **options) -> None:
    """Merge the adapter and build an int4 onnxruntime-genai folder for CPU, through Olive."""
    from ftl.export import ExportConfig
    from ftl.export import export_onnx as run_export

    config = ExportConfig(**options, op_types=op_types.split(","))
    with task_progress("exporting int4 ONNX (Olive)"):
        result = run_export(config, save_config=save_config)
    print_export(result, as_json)


def print_export(result, as_json: bool = False) -> None:
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    if result.config_only:
        console.print("[green]✓[/] Olive workflow written; nothing was exported")
        return
    if as_json:
        click.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}))
        return
    note = " (unchanged, skipped)" if result.skipped else ""
    console.print(f"[green]✓[/] int4 model → {result.output} ({result.size_mb} MB, {result.seconds:.0f}s{note})")


# ---------------------------------------------------------------------------------------------
# generate / chat
# ---------------------------------------------------------------------------------------------
def _sampling(f):
    f = click.option("--max-new-tokens", type=int, default=256, show_default=True)(f)
    f = click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")(f)
    f = click.option("--top-p", type=float, default=1.0, show_default=True)(f)
    f = click.option("--system-prompt", help="Override the system prompt.")(f)
    f = click.option("--adapter", type=click.Path(exists=True, path_type=Path),
                     help="A separately exported .onnx_adapter file.")(f)
    f = click.option("--threads", type=int, help="Intra-op threads (default: the cores available).")(f)
    return f


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("prompt")
@_sampling
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
def generate(model_dir: Path, prompt: str, adapter, system_prompt, threads, as_json: bool, **sampling) -> None:
    """Answer PROMPT with an exported model, streaming tokens as they come."""
    from ftl.generate import OnnxChatModel

    model = OnnxChatModel(model_dir, adapter=adapter, system_prompt=system_prompt, threads=threads)
    messages = model.format.conversation(prompt)
    if as_json:
        result = model.generate(messages, **sampling)
        click.echo(json.dumps(vars(result) | {"decode_tokens_per_s": result.decode_tokens_per_s,
                                              "threads": model.threads}))
        return
    stats: dict = {}
    for piece in model.stream(messages, stats=stats, **sampling):
        click.echo(piece, nl=False)
    click.echo()
    _print_speed(stats)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@_sampling
def chat(model_dir: Path, adapter, system_prompt, threads, **sampling) -> None:
    """A multi-turn chat in the terminal. /reset clears the history, /exit or Ctrl-D quits."""
    from ftl.generate import OnnxChatModel

    model = OnnxChatModel(model_dir, adapter=adapter, system_prompt=system_prompt, threads=threads)
    history = model.format.conversation("")[:-1]
    console.print(f"[dim]chatting with {model_dir} — /reset, /exit[/]")
    while True:
        try:
            line = click.prompt(click.style("you", bold=True), prompt_suffix="> ")
        except (EOFError, click.Abort):
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = model.format.conversation("")[:-1]
            continue
        history.append({"role": "user", "content": line})
        click.echo(click.style("model> ", bold=True), nl=False)
        stats: dict = {}
        answer = ""
        for piece in model.stream(history, stats=stats, **sampling):
            answer += piece
            click.echo(piece, nl=False)
        click.echo()
        history.append({"role": "assistant", "content": answer})


def _print_speed(stats: dict) -> None:
    from ftl.generate import Generation

    if stats.get("new_tokens"):
        rate = Generation(text="", **stats).decode_tokens_per_s
        console.print(f"[dim]{stats['new_tokens']} tokens, first after {stats['ttft_s'] * 1000:.0f} ms, "
                      f"{rate:.0f} tok/s[/]")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
@cli.command("eval")
@click.option("--model", "models", multiple=True, required=True,
              help="onnx:PATH (export folder) or torch:PATH (HF folder, finetune folder or adapter); repeat.")
@click.option("--data", required=True, help="Q/A JSONL with reference answers, or a datasets folder/name.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Folder for every output file.")
@click.option("--question-field", default="Question", show_default=True)
@click.option("--answer-field", default="Answer", show_default=True, help="The reference answer.")
@click.option("--limit", type=int, help="First N samples only.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--numeric/--no-numeric", default=None, help="GSM8K '#### n' check (default: when references have it).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-RSS probe (one child process per model).")
@click.option("--compare", type=click.Path(exists=True, path_type=Path), help="An earlier metrics_summary.json.")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def eval_command(models, no_memory: bool, as_json: bool, **options) -> None:
    """Compare models on perplexity, quantization damage (KL, top-1), ROUGE and latency."""
    from ftl.eval import EvalConfig, evaluate
    from ftl.eval.report import table_rows

    config = EvalConfig(models=list(models), memory=not no_memory, **options)
    with task_progress("evaluating", total=None) as (progress, task):
        result = evaluate(config, on_progress=lambda i, n: progress.update(task, completed=i, total=n))
    if as_json:
        click.echo(json.dumps(result.summary))
        return
    header, rows = table_rows(result.summary)
    keep = [0, 1, 3, 6, 7, 10, 12, 13, 14]  # a terminal-width subset; the report has every column
    table = Table(*[header[i] for i in keep], title=f"eval — {result.summary['samples']} samples")
    for row in rows:
        table.add_row(*[row[i] for i in keep])
    console.print(table)
    for change in result.comparison:
        console.print(f"  {change['model']} {change['metric']}: {change['before']:.4f} → {change['now']:.4f} "
                      f"({change['change']:+.4f})")
    console.print(f"[green]✓[/] {result.output}/report.html, report.md, metrics_summary.json, detailed_results.json")


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------
@cli.command("run")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--force", is_flag=True, help="Replace the results of stages whose inputs changed.")
@click.option("--dry-run", is_flag=True, help="Validate the pipeline and write each stage's Olive workflow only.")
def run_pipeline(pipeline: Path, overrides: tuple[str, ...], force: bool, dry_run: bool) -> None:
    """Run a pipeline YAML (import → finetune → export → generate). key=value overrides, e.g. finetune.max_steps=5."""
    from ftl.pipeline import load_pipeline, run

    spec = load_pipeline(pipeline, overrides)
    run(spec, force=force, dry_run=dry_run)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except FtlError as exc:
        _fail(exc, exc.one_line())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        _fail(exc, f"invalid setting: {first['msg']} ({where}) — fix that option and run again")
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail(None, "aborted")
    except KeyboardInterrupt:
        _fail(None, "interrupted — finished work is kept; run the same command again to resume", code=130)


def _fail(exc: BaseException | None, line: str, code: int = 1) -> None:
    if _DEBUG["on"] and exc is not None:
        console.print_exception()
    console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
