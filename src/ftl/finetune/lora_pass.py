"""``FtlLoRA`` and ``FtlQLoRA``: Olive's LoRA and QLoRA passes plus early stopping, a training
summary, and one device per process in a distributed run.

Olive 0.13's passes build their ``transformers.Trainer`` inside ``train_and_save_new_model`` with no
callbacks and return nothing about the run. These subclasses give that Trainer HF's own
``EarlyStoppingCallback`` (with ``load_best_model_at_end``, so the adapter Olive saves is the best
checkpoint's) and write ``training_summary.json`` (rank 0 only): the best step, its eval_loss, why
training stopped, and the loss and eval_loss history.

Under torchrun (RANK/LOCAL_RANK/WORLD_SIZE set, see :mod:`ftl.finetune.distributed`) on GPUs, Olive
would load the base with ``device_map="auto"``, spreading it over every GPU in every process. Here the
process first takes ``cuda:LOCAL_RANK`` and loads onto it alone; the Trainer's DDP does the rest.

Everything else (data, PEFT set-up, checkpoints, resume) is Olive's. Imported only inside Olive's
child process (``olive run``), which runs this one workflow, so swapping the Trainer class for the
length of the pass touches nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from olive.hardware.accelerator import AcceleratorSpec
from olive.passes.olive_pass import PassConfigParam
from olive.passes.pytorch.lora import LoRA, QLoRA

from ftl.finetune import distributed, packing
from ftl.tracking import live_logger


class _FtlTraining:
    """The additions, for any of Olive's LoRA-family passes (mixed in before the Olive class)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        config = super()._default_config(accelerator_spec)
        config["early_stopping_patience"] = PassConfigParam(
            type_=int, default_value=None,
            description="Stop after this many evaluations without a better eval_loss (needs eval_data_config)")
        config["summary_path"] = PassConfigParam(type_=str, default_value=None,
                                                 description="Where to write training_summary.json")
        config["packing"] = PassConfigParam(
            type_=bool, default_value=True,
            description="Pack each batch's rows into one sequence (no padding, no attention across rows) and "
                        "score only the labelled positions (ftl.finetune.packing)")
        return config

    def _run_for_config(self, model, config, output_model_path: str):
        patience, summary_path, packed = config.early_stopping_patience, config.summary_path, config.packing
        _one_device_per_process(config)
        original = transformers.Trainer

        class Trainer(original):
            def __init__(self, *args, **kwargs):
                if packed:
                    kwargs["data_collator"] = packing.pack
                super().__init__(*args, **kwargs)
                self.ftl_tokens = 0  # real tokens trained on, for the summary's tokens/s
                self.add_callback(_ToJobRun(live_logger(own_run=False)))
                if patience:
                    self.add_callback(transformers.EarlyStoppingCallback(early_stopping_patience=patience))

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if model.training:
                    self.ftl_tokens += packing.tokens_in(inputs)
                if not packed:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                loss, outputs = packing.labelled_loss(model, inputs, num_items_in_batch)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * self.accelerator.num_processes  # as the Trainer's own compute_loss does
                return (loss, outputs) if return_outputs else loss

            def train(self, *args, **kwargs):
                result = super().train(*args, **kwargs)
                tokens = self.ftl_tokens
                if self.args.world_size > 1:  # every rank's tokens, not rank 0's alone (all ranks reach here)
                    import torch

                    tokens = int(self.accelerator.reduce(torch.tensor([tokens], device=self.args.device),
                                                         reduction="sum").item())
                if summary_path and self.is_world_process_zero():
                    write_summary(self.state, Path(summary_path), patience,
                                  {"train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
                                   "train_tokens": tokens, "packing": packed})
                return result

        transformers.Trainer = Trainer
        try:
            return super()._run_for_config(model, config, output_model_path)
        finally:
            transformers.Trainer = original


class _ToJobRun(transformers.TrainerCallback):
    """loss and eval_loss into an Azure ML job's own run as they are logged: a sweep's Bandit policy
    and its choice of the best trial read them there (ftl.tracking.live_logger; a no-op elsewhere)."""

    def __init__(self, log):
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.log(logs, state.global_step)


class FtlLoRA(_FtlTraining, LoRA):
    """Olive's LoRA with early stopping on eval_loss and a summary file."""


class FtlQLoRA(_FtlTraining, QLoRA):
    """Olive's QLoRA (bitsandbytes 4-bit base, CUDA) with the same additions."""


def _one_device_per_process(config) -> None:
    rank = distributed.current()
    if not rank.distributed:
        return
    import torch
    from olive.passes.pytorch.lora import DeviceMap

    if torch.cuda.is_available():
        torch.cuda.set_device(rank.local_rank)
        config.device_map = DeviceMap.CURRENT_DEVICE
    else:
        # CPU processes: the whole model in each, and DDP over gloo. Without use_cpu, accelerate sees no GPU,
        # initialises the process group but trains each process alone (transformers 5.23, accelerate 1.x).
        config.device_map = None
        if config.training_args is not None:
            config.training_args.extra_args.update(use_cpu=True, ddp_backend="gloo")


def write_summary(state, path: Path, patience: int | None, extra: dict | None = None) -> None:
    """What the manifest records about a training run, from the Trainer's final state."""
    from ftl.finetune.stage import history_curves

    loss_curve, eval_curve = history_curves(state.log_history)
    stopped_early = bool(patience) and state.global_step < state.max_steps
    summary = {
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "stop_reason": "early_stopping" if stopped_early else "max_steps",
        "best_step": state.best_global_step,
        "best_eval_loss": state.best_metric,
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "loss_curve": loss_curve,
        "eval_curve": eval_curve,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
