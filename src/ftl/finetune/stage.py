"""The finetune recipe, top to bottom: validate → prepare data → Olive (LoRA or qscale) → check → manifest.

Olive's own ``finetune`` command caps data at 256 samples and joins rows into 1024-token windows,
so small data can become one sample. ftl renders each row itself (chat template by default, so
the training prompt is exactly the prompt ``ftl generate`` sends) and hands Olive a ``text`` column
with the line-by-line strategy, no sample cap and no padding to max length: every row is one
training sample, and a row too long for ``max_seq_len`` is an error rather than a silent cut.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftl import manifest, olive, tracking
from ftl.chat import PromptFormat, answer_start, prompt_format_for
from ftl.data import Example, Fields, load_examples
from ftl.errors import ConfigError, DataError, DeviceError, OutputExistsError
from ftl.finetune import distributed
from ftl.finetune.config import FinetuneConfig
from ftl.lineage import ADAPTER, QSCALE
from ftl.models import model_identity, resolve_model

PREPARED = "train.prepared.jsonl"
VAL_PREPARED = "val.prepared.jsonl"
SUMMARY = "training_summary.json"
CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"(\d+)/(\d+) \[")
_LOSS = re.compile(r"'loss': '?([0-9.]+(?:e-?\d+)?)")
_QSCALE_STEP = re.compile(r"qscale step (\d+)/(\d+) loss ([0-9.]+)")


@dataclass
class FinetuneResult:
    output: Path
    adapter: Path
    rows: int
    tokens: int
    steps: int
    final_loss: float | None
    loss_curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed: bool = False
    skipped: bool = False
    config_only: bool = False
    answer_tokens: int = 0
    rank: int = 0  # > 0: a worker of a distributed run, which wrote nothing of its own
    warnings: list[str] = field(default_factory=list)
    train_tokens_per_s: float | None = None  # real tokens per second of training alone (no load, no save)


@dataclass
class _Plan:
    """Everything decided before training starts."""

    model_dir: Path
    base: dict
    fmt: PromptFormat
    examples: list[Example]
    val_examples: list[Example]
    token_counts: list[int]
    answer_tokens: int
    steps: int
    logging_steps: int
    data_hashes: list[str]
    fingerprint: str
    parameters: int = 0


def plan(config: FinetuneConfig) -> _Plan:
    """Validate inputs and render the data. Cheap: loads the tokenizer, never the weights."""
    if config.method == "qlora":
        _require_cuda()
    model_dir = resolve_model(config.model)
    parameters = _check_target_modules(model_dir, config)
    examples, val_examples = split_rows(config, load_training_rows(config))
    fmt = prompt_format_for(model_dir, text_template=config.text_template, question_field=config.question_field,
                            answer_field=config.answer_field, system_prompt=config.system_prompt)
    for example in examples + val_examples:
        fmt.check_messages(example.messages, f"{example.source}:{example.line}")
    counts, answers = _count_tokens(model_dir, fmt, examples + val_examples, config)
    # the validation rows are checked for length, not counted
    token_counts, answer_tokens = counts[:len(examples)], sum(answers[:len(examples)])
    world = distributed.current().world_size
    steps, logging_steps = steps_for(config, len(examples), world)
    base = model_identity(model_dir)
    params = config.model_dump(mode="json", exclude={"force", "output"})
    if world > 1:  # the steps and the data each process sees depend on it
        params["world_size"] = world
    data_hashes = [manifest.sha256_file(f) for f in config.data_files + list(config.val_data or [])]
    fingerprint = manifest.sha256_json({"base": base["sha256"], "data": data_hashes,
                                        "params": params, "format": fmt.model_dump()})
    return _Plan(model_dir, base, fmt, examples, val_examples, token_counts, answer_tokens, steps, logging_steps, data_hashes,
                 fingerprint, parameters)


def load_training_rows(config: FinetuneConfig) -> list[Example]:
    """Every row of every data file, checked; needs no model, so a dry run can call it first."""
    fields = Fields(config.question_field, config.answer_field, config.messages_field)
    return [e for path in config.data_files for e in load_examples(path, fields, config.system_prompt)]


def split_rows(config: FinetuneConfig, rows: list[Example]) -> tuple[list[Example], list[Example]]:
    """(training rows, validation rows): a seeded split, or the --val-data files."""
    if config.val_data:
        fields = Fields(config.question_field, config.answer_field, config.messages_field)
        val = [e for path in config.val_data for e in load_examples(path, fields, config.system_prompt)]
        return rows, val
    if not config.val_split:
        return rows, []
    held = max(1, round(len(rows) * config.val_split))
    if held >= len(rows):
        where = ", ".join(str(f) for f in config.data_files)
        raise DataError(f"--val-split {config.val_split} of {len(rows)} rows leaves no training rows", where,
                        "lower --val-split, add rows, or pass --val-data FILE")
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    val = set(order[:held])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def build_olive_config(config: FinetuneConfig, p: _Plan, out: Path, *, report_to: str = "none",
                       checkpoints: Path | None = None, resume: Path | None = None, world_size: int = 1) -> dict:
    return olive_workflow(config, out, model_dir=p.model_dir, max_seq_len=max(p.token_counts), steps=p.steps,
                          logging_steps=p.logging_steps, report_to=report_to, checkpoints=checkpoints, resume=resume,
                          world_size=world_size)


def steps_for(config: FinetuneConfig, rows: int, world_size: int = 1) -> tuple[int, int]:
    """Training steps and the logging interval (about 100 loss points per run). In a data-parallel run
    each step takes a batch from every process."""
    per_step = config.batch_size * config.grad_accum * world_size
    steps = config.max_steps or max(1, math.ceil(math.ceil(rows / per_step) * config.epochs))
    return steps, config.logging_steps or max(1, steps // 100)


def olive_workflow(config: FinetuneConfig, out: Path, *, model_dir: Path, max_seq_len: int, steps: int,
                   logging_steps: int, report_to: str = "none", checkpoints: Path | None = None,
                   resume: Path | None = None, world_size: int = 1) -> dict:
    """The Olive workflow for these settings; a dry run builds it before the base model exists. ``out`` is
    where Olive works and the prepared data is; ``checkpoints`` (default ``out/checkpoints``) is the
    Trainer's folder, which every rank of a distributed run shares; ``resume`` is the checkpoint to go on
    from (ftl chooses it, so that Olive's own guess never differs between ranks)."""
    checkpoints = Path(checkpoints or out / CHECKPOINTS).resolve()
    if config.method == "qscale":
        workflow = olive.workflow("finetune_qscale.json", work_dir=out, output_dir=out / "olive-output")
        workflow["input_model"]["model_path"] = str(Path(model_dir).resolve())
        workflow["passes"]["qscale"].update(
            train_data_file=str((out / PREPARED).resolve()), checkpoint_dir=str((out / CHECKPOINTS).resolve()),
            steps=steps, batch_size=config.batch_size, learning_rate=config.lr, seed=config.seed,
            logging_steps=logging_steps, save_steps=config.save_steps, answer_only=not config.train_on_prompt,
            bf16=bf16_used(config), packing=config.packing)
        if config.validates:
            workflow["passes"]["qscale"].update(val_data_file=str((out / VAL_PREPARED).resolve()),
                                                eval_steps=config.eval_steps or config.save_steps,
                                                early_stopping_patience=config.early_stopping_patience)
        return workflow
    workflow = olive.workflow("finetune_lora.json", work_dir=out, output_dir=out / "olive-output")
    workflow["input_model"]["model_path"] = str(Path(model_dir).resolve())
    data = workflow["data_configs"][0]
    data["load_dataset_config"]["data_files"] = str((out / PREPARED).resolve())
    data["pre_process_data_config"]["max_seq_len"] = max_seq_len
    if not config.train_on_prompt:
        # Answer-only labels: ftl's Olive pre-process component (ftl.finetune.olive_data), loaded as a user script.
        from ftl.finetune import olive_data

        data["user_script"] = olive_data.__file__
        data["pre_process_data_config"] = {"type": "ftl_answer_only", "answer_only": True}
    lora = workflow["passes"]["lora"]
    lora["summary_path"] = str(checkpoints / SUMMARY)
    lora["packing"] = config.packing
    if config.validates:
        val = json.loads(json.dumps(data))
        val["name"] = "val_data"
        val["load_dataset_config"]["data_files"] = str((out / VAL_PREPARED).resolve())
        workflow["data_configs"].append(val)
        lora["eval_data_config"] = "val_data"
        lora["early_stopping_patience"] = config.early_stopping_patience
    lora.update(r=config.r, alpha=config.alpha, lora_dropout=config.dropout)
    if config.target_modules:
        lora["target_modules"] = config.target_modules
    if config.method == "qlora":
        lora.update(torch_dtype="bfloat16")
    lora["training_args"] = {
        "output_dir": str(checkpoints),
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.lr,
        "max_steps": steps,
        "logging_steps": logging_steps,
        "save_steps": config.save_steps,
        "save_total_limit": 2,
        "seed": config.seed,
        "data_seed": config.seed,
        # A 135M model fits easily; recomputing activations only slows a CPU down.
        "gradient_checkpointing": config.method == "qlora",
        "lr_scheduler_type": "cosine",
        # transformers 5 has no warmup_ratio (Olive 0.13 drops it without a word, so there was no warm-up);
        # a float warmup_steps below 1 is the ratio of the steps.
        "warmup_steps": 0.05,
        "dataloader_num_workers": 0,
        "bf16": bf16_used(config),  # autocast, fp32 master weights (--precision, ftl.system.bf16_training)
        # "mlflow" when the stage is tracked: the Trainer logs loss (and eval_loss) per step into the
        # stage's run, found through the environment ftl gives Olive (ftl.tracking.child_env).
        "report_to": report_to,
        # Olive would look for a checkpoint itself; ftl has chosen (see ``resume``).
        "overwrite_output_dir": True,
    }
    if lora["training_args"]["bf16"]:
        import torch

        if not torch.cuda.is_available():  # the Trainer refuses bf16 on a CPU unless told it is one
            lora["training_args"]["use_cpu"] = True
    if resume:
        lora["training_args"]["resume_from_checkpoint"] = str(Path(resume).resolve())
    if world_size > 1:
        # DDP (the pass puts each process on its own device, ftl.finetune.lora_pass): only LoRA weights
        # train, and every one of them is used, so DDP need not search the graph for unused ones.
        lora["training_args"]["ddp_find_unused_parameters"] = False
    if config.validates:
        # A checkpoint at every evaluation, so the best one can be restored and is the adapter written.
        eval_steps = config.eval_steps or config.save_steps
        lora["training_args"].update(eval_strategy="steps", eval_steps=eval_steps, save_steps=eval_steps,
                                     per_device_eval_batch_size=config.batch_size, load_best_model_at_end=True,
                                     metric_for_best_model="eval_loss", greater_is_better=False)
    if config.method == "qlora":
        lora["type"] = "FtlQLoRA"  # Olive's QLoRA with the same early stopping and summary (lora_pass)
    return workflow


def bf16_used(config: FinetuneConfig) -> bool:
    """--precision bf16 where this machine trains faster in it (else fp32: see finetune's warning)."""
    from ftl.system import bf16_training

    return config.precision == "bf16" and bf16_training() is None


def _precision_warnings(config: FinetuneConfig) -> list[str]:
    from ftl.system import bf16_training

    reason = bf16_training() if config.precision == "bf16" else None
    return [f"--precision bf16: {reason}; training in fp32"] if reason else []


def _check_target_modules(model_dir: Path, config: FinetuneConfig) -> int:
    """The target modules exist (peft would fail much later, inside Olive); the parameter count, for the
    memory check. The model is built on the meta device: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model_dir)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"transformers cannot build {model_config.model_type} as a causal LM: "
                          f"{str(exc).splitlines()[0][:200]}", str(model_dir),
                          "fine-tune a text model (see the README's families table)") from None
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in config.target_modules or [] if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--target-modules {', '.join(missing)}: no such module in {model.config.model_type}",
                          str(model_dir), f"its linear layers are: {', '.join(linear)}")
    return sum(p.numel() for p in model.parameters())


def _check_memory(parameters: int, config: FinetuneConfig, model_dir: Path) -> None:
    """Before training here (not for --save-config, a finished run, or an Azure ML job): the model fits."""
    need, (have, where) = training_memory_gib(parameters, config.method), _memory_gib()
    if need > have:
        raise ConfigError(f"{parameters / 1e9:.1f}B parameters need about {need:.0f} GiB to train with --method "
                          f"{config.method} (estimated), and this machine's {where} has {have:.0f} GiB",
                          str(model_dir), "use a smaller model, or --method qlora on a CUDA GPU (4-bit weights)")


def training_memory_gib(params: int, method: str) -> float:
    """An estimate: the frozen weights as they are loaded (fp32; 4-bit for QLoRA; --precision bf16 is
    autocast and keeps fp32 weights), plus half again for activations, the vocabulary's logits, the
    trained weights' gradients and optimiser state, plus the runtime (1 GiB; qscale 1.5: its grids
    are computed while the float weights are still loaded). Within 20% of every measured peak in
    docs/models.md (2 steps of 2 rows, SmolLM2-135M to Phi-4-mini's shape: LoRA ×0.85-1.16,
    qscale ×0.89-1.12)."""
    per_param = 0.6 if method == "qlora" else 4
    return params * per_param * 1.5 / 2**30 + (1.5 if method == "qscale" else 1.0)


def _memory_gib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30, "GPU"
    from ftl.system import memory_gib

    return memory_gib()


def finetune(config: FinetuneConfig, *, save_config: Path | None = None, on_progress=None) -> FinetuneResult:
    started = time.perf_counter()
    out = Path(config.output)
    rank = distributed.current()
    if rank.distributed and config.method == "qscale":
        raise ConfigError("--method qscale trains in one process; it cannot run under torchrun "
                          f"(WORLD_SIZE={rank.world_size})", "--method", "use --method lora or qlora, or one process")
    p = plan(config)
    if save_config:
        olive.save_config(build_olive_config(config, p, out), save_config)
        # ftl's passes (FtlLoRA, FtlQScale) are in this package config: olive run --config … --package-config …
        olive.package_config(out, Path(save_config).with_suffix(".package_config.json"))
        return FinetuneResult(out, out / ADAPTER, len(p.examples), sum(p.token_counts), p.steps, None,
                              config_only=True, answer_tokens=p.answer_tokens)
    if manifest.is_complete(out, p.fingerprint) and not config.force:
        return _result_from_manifest(out, skipped=True)
    _check_memory(p.parameters, config, p.model_dir)
    if not rank.main:
        # rank 0's own checks, read-only: a worker must not train when rank 0 refuses the folder
        if manifest.check_output(out, force=config.force, stage="finetune", resumable=True) == "resume" and \
                (manifest.read(out) or {}).get("fingerprint") not in (None, p.fingerprint):
            raise OutputExistsError("output folder holds an unfinished finetune with other inputs or settings",
                                    str(out), "pass --force to start over, or choose a new --output path")
        return _train_as_worker(config, p, out, rank, on_progress)
    resumed = manifest.prepare_output(out, force=config.force, stage="finetune", resumable=True)
    if resumed and (manifest.read(out) or {}).get("fingerprint") != p.fingerprint:
        raise OutputExistsError("output folder holds an unfinished finetune with other inputs or settings",
                                str(out), "pass --force to start over, or choose a new --output path")
    _drop_partial_checkpoints(out / CHECKPOINTS)
    _write_prepared(out / PREPARED, p)
    warnings = _precision_warnings(config)
    record = manifest.new("finetune", inputs=_inputs(config, p), params=_params(config, p), fingerprint=p.fingerprint)
    record["params"]["precision_used"] = "bf16" if bf16_used(config) else "fp32"
    record["prompt_format"] = p.fmt.model_dump()
    if rank.distributed:
        record["distributed"] = {"world_size": rank.world_size,
                                 "rows_per_step": config.batch_size * config.grad_accum * rank.world_size}
    resume = _resume_point(config, out)
    if resume:
        record["resumed_from"] = resume.name
    manifest.write(out, record)

    env = tracking.child_env()  # empty when nothing is tracked
    workflow = build_olive_config(config, p, out, report_to="mlflow" if tracking.tracks(env) else "none",
                                  resume=resume, world_size=rank.world_size)
    log = olive.run(workflow, out, on_line=_progress_parser(p.steps, on_progress), env=env)
    if config.method == "qscale":
        produced = out / "olive-output" / "model"  # the pass's small HF folder (ftl.finetune.qscale_pass)
        olive.require_files(produced, [QSCALE, "trainer_log.json"], log)
        shutil.move(str(produced / QSCALE), out / QSCALE)
        summary = json.loads((produced / "trainer_log.json").read_text())
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        curve = summary["loss_curve"]
        outputs = {"qscale": QSCALE, "qscale_sha256": manifest.sha256_file(out / QSCALE)}
    else:
        produced = out / "olive-output" / ADAPTER
        olive.require_files(produced, ["adapter_config.json", "adapter_model.safetensors"], log)
        shutil.rmtree(out / ADAPTER, ignore_errors=True)
        shutil.move(str(produced), out / ADAPTER)
        summary = _training_summary(out / CHECKPOINTS)
        if summary:
            shutil.copy2(out / CHECKPOINTS / SUMMARY, out / SUMMARY)
        curve = summary.get("loss_curve") or _loss_curve(out / CHECKPOINTS)
        outputs = {"adapter": ADAPTER, "adapter_sha256": manifest.sha256_dir(out / ADAPTER)}
    shutil.rmtree(out / "olive-output", ignore_errors=True)
    olive.clean_cache(out)

    seconds = time.perf_counter() - started
    metrics = {"rows": len(p.examples), "tokens": sum(p.token_counts), "answer_tokens": p.answer_tokens,
               "steps": p.steps, "final_loss": curve[-1]["loss"] if curve else None, "loss_curve": curve,
               "resumed": resumed}
    if summary.get("train_seconds"):  # training alone: the rate bench/finetune.py compares
        metrics.update(train_seconds=summary["train_seconds"], train_tokens=summary.get("train_tokens"),
                       train_tokens_per_s=round(summary["train_tokens"] / summary["train_seconds"], 1)
                       if summary.get("train_tokens") else None)
    if p.val_examples:
        metrics.update(val_rows=len(p.val_examples), steps_run=summary.get("global_step"),
                       stop_reason=summary.get("stop_reason"), best_step=summary.get("best_step"),
                       best_eval_loss=summary.get("best_eval_loss"), best_checkpoint=summary.get("best_checkpoint"),
                       eval_curve=summary.get("eval_curve", []))
    record.update(status="complete", timings={"seconds": round(seconds, 1)}, metrics=metrics)
    record["outputs"] = outputs
    manifest.write(out, record)
    return FinetuneResult(out, out / (QSCALE if config.method == "qscale" else ADAPTER), len(p.examples),
                          sum(p.token_counts), p.steps, record["metrics"]["final_loss"], curve, seconds, resumed,
                          answer_tokens=p.answer_tokens, warnings=warnings,
                          train_tokens_per_s=metrics.get("train_tokens_per_s"))


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing (it writes trainer_state.json last)."""
    done = [c for c in Path(checkpoints).glob("checkpoint-*")
            if c.name.split("-")[-1].isdigit() and (c / "trainer_state.json").is_file()]
    return max(done, key=lambda c: int(c.name.split("-")[-1]), default=None)


def _resume_point(config: FinetuneConfig, out: Path) -> Path | None:
    if config.force or config.method == "qscale":  # --force starts over; qscale resumes by itself
        return None
    return last_complete_checkpoint(out / CHECKPOINTS)


def _train_as_worker(config: FinetuneConfig, p: _Plan, out: Path, rank: distributed.Rank,
                     on_progress) -> FinetuneResult:
    """Rank > 0 of a distributed run: the same training in a scratch folder, sharing only the Trainer's
    checkpoint folder with rank 0 (which writes the manifest and the adapter; see ftl.finetune.distributed)."""
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f"ftl-finetune-rank{rank.rank}-"))
    _write_prepared(scratch / PREPARED, p)
    workflow = build_olive_config(config, p, scratch, checkpoints=out / CHECKPOINTS,
                                  resume=_resume_point(config, out), world_size=rank.world_size)
    olive.run(workflow, scratch, on_line=_progress_parser(p.steps, on_progress), env=tracking.child_env())
    shutil.rmtree(scratch, ignore_errors=True)  # kept when Olive fails: its olive.log is what the error names
    return FinetuneResult(out, out / ADAPTER, len(p.examples), sum(p.token_counts), p.steps, None,
                          seconds=time.perf_counter() - started, answer_tokens=p.answer_tokens, rank=rank.rank)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise DeviceError("--method qlora needs a CUDA GPU (bitsandbytes 4-bit), and none is available",
                          "torch.cuda.is_available() is False", "use --method lora on this machine")


def _count_tokens(model_dir: Path, fmt: PromptFormat, examples: list[Example],
                  config: FinetuneConfig) -> tuple[list[int], list[int]]:
    """Tokens per row, and per row the answer tokens the loss covers (all of them with --train-on-prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [fmt.render_example(e.messages) for e in examples]
    full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    counts = [len(ids) for ids in full]
    if config.train_on_prompt:
        answers = counts
    else:
        prompts = tokenizer([fmt.render_prompt(e.messages[:-1]) for e in examples], add_special_tokens=False)["input_ids"]
        answers = [len(ids) - answer_start(ids, prompt) for ids, prompt in zip(full, prompts)]
    for example, count in zip(examples, counts):
        if count > config.max_seq_len:
            raise DataError(f"row has {count} tokens, more than --max-seq-len {config.max_seq_len}",
                            f"{example.source}:{example.line}", "raise --max-seq-len or shorten the row; "
                            "ftl never truncates training rows silently")
    return counts, answers


def _drop_partial_checkpoints(checkpoints: Path) -> None:
    """A kill during a save leaves a checkpoint without trainer_state.json; the Trainer would pick it
    as the latest and fail to resume, so it goes and the previous complete one is used."""
    for folder in checkpoints.glob("checkpoint-*"):
        if not (folder / "trainer_state.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # Olive refuses a non-empty output_dir without checkpoints; an empty one is fine


def _write_prepared(path: Path, p: _Plan) -> None:
    _write_rows(path, p, p.examples)
    if p.val_examples:
        _write_rows(path.with_name(VAL_PREPARED), p, p.val_examples)


def _write_rows(path: Path, p: _Plan, examples: list[Example]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            # "prompt": what answer-only training masks (everything before the last answer).
            handle.write(json.dumps({"text": p.fmt.render_example(example.messages),
                                     "prompt": p.fmt.render_prompt(example.messages[:-1])},
                                    ensure_ascii=False) + "\n")


def _inputs(config: FinetuneConfig, p: _Plan) -> dict:
    files = config.data_files + list(config.val_data or [])
    data = [{"path": str(Path(f).resolve()), "sha256": h} for f, h in zip(files, p.data_hashes)]
    train, val = data[:len(config.data_files)], data[len(config.data_files):]
    inputs = {"base_model": p.base, "data": train[0] if len(train) == 1 else train}
    if val:
        inputs["val_data"] = val
    return inputs


def _params(config: FinetuneConfig, p: _Plan) -> dict:
    params = config.model_dump(mode="json", exclude={"force"})
    params.update(learning_rate=config.lr, steps=p.steps, logging_steps=p.logging_steps, rows=len(p.examples),
                  tokens=sum(p.token_counts), answer_tokens=p.answer_tokens, longest_row_tokens=max(p.token_counts),
                  val_rows=len(p.val_examples))
    return params


def _progress_parser(total: int, on_progress):
    state = {"loss": None}

    def handle(line: str) -> None:
        if on_progress is None:
            return
        qscale = _QSCALE_STEP.search(line)
        if qscale:
            on_progress(int(qscale.group(1)), total, float(qscale.group(3)))
            return
        loss = _LOSS.search(line)
        if loss:
            state["loss"] = float(loss.group(1))
        step = _STEP.search(line)
        if step and int(step.group(2)) == total:
            on_progress(int(step.group(1)), total, state["loss"])
        elif loss:
            on_progress(None, total, state["loss"])

    return handle


def _training_summary(checkpoints: Path) -> dict:
    """What FtlLoRA wrote about the run (ftl.finetune.lora_pass); empty for Olive's QLoRA pass."""
    path = checkpoints / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


def history_curves(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """(loss curve, eval_loss curve) from an HF Trainer's log_history. eval_loss keeps full precision:
    the best step is chosen on it, and two evaluations 1e-5 apart must not tie in the manifest."""
    return ([{"step": h["step"], "loss": round(float(h["loss"]), 4), "epoch": round(float(h.get("epoch", 0)), 3)}
             for h in history if "loss" in h],
            [{"step": h["step"], "eval_loss": float(h["eval_loss"])} for h in history if "eval_loss" in h])


def _loss_curve(checkpoints: Path) -> list[dict]:
    states = sorted(checkpoints.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return []
    return history_curves(json.loads(states[-1].read_text()).get("log_history", []))[0]


def _result_from_manifest(out: Path, skipped: bool) -> FinetuneResult:
    record = manifest.read(out)
    metrics = record["metrics"]
    produced = record.get("outputs", {}).get("qscale") or ADAPTER
    return FinetuneResult(out, out / produced, metrics["rows"], metrics["tokens"], metrics["steps"],
                          metrics["final_loss"], metrics["loss_curve"], record["timings"]["seconds"],
                          skipped=skipped, answer_tokens=metrics.get("answer_tokens", 0),
                          train_tokens_per_s=metrics.get("train_tokens_per_s"))
