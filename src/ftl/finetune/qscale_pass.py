"""``FtlQScale``: ftl's Olive pass that fine-tunes an int4 model's grid scales (:mod:`ftl.quant.qscale`).

Olive runs it like its own LoRA pass, from the package config ftl passes to ``olive run``
(:func:`ftl.olive.package_config`). Its output is a small folder: ``qscale.safetensors`` (an fp16
scale and minimum per block of every decoder projection), the training log, and the base's config
and tokenizer so Olive can treat it as an HF model folder. Imported only inside Olive's process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import HfModelHandler
from olive.passes import Pass
from olive.passes.olive_pass import PassConfigParam

from ftl.quant.qscale import TrainSettings, run
from ftl.tracking import live_logger

_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


class FtlQScale(Pass):
    """Train the per-block scales and minimums of an int4 grid, codes fixed (PEQA on the exact grid)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        d = TrainSettings(steps=1)
        return {
            "train_data_file": PassConfigParam(type_=str, required=True,
                                               description="ftl's prepared JSONL ({text, prompt} per row)"),
            "steps": PassConfigParam(type_=int, required=True, description="optimiser steps"),
            "batch_size": PassConfigParam(type_=int, default_value=d.batch_size, description="rows per step"),
            "learning_rate": PassConfigParam(type_=float, default_value=d.learning_rate, description="peak lr"),
            "warmup_ratio": PassConfigParam(type_=float, default_value=d.warmup_ratio, description="warm-up"),
            "seed": PassConfigParam(type_=int, default_value=d.seed, description="data order"),
            "logging_steps": PassConfigParam(type_=int, default_value=d.logging_steps, description="loss points"),
            "save_steps": PassConfigParam(type_=int, default_value=d.save_steps, description="checkpoint interval"),
            "grid_form": PassConfigParam(type_=str, default_value=d.form, description="float-min or int-zp"),
            "answer_only": PassConfigParam(type_=bool, default_value=True, description="loss on answers only"),
            "checkpoint_dir": PassConfigParam(type_=str, required=True,
                                              description="where an interrupted run resumes from"),
            "val_data_file": PassConfigParam(type_=str, default_value=None,
                                             description="validation rows, prepared as the training rows"),
            "eval_steps": PassConfigParam(type_=int, default_value=d.eval_steps, description="eval_loss interval"),
            "early_stopping_patience": PassConfigParam(type_=int, default_value=None,
                                                       description="evaluations without a better eval_loss"),
            "packing": PassConfigParam(type_=bool, default_value=d.packing,
                                       description="pack each step's rows into one sequence (ftl.finetune.packing)"),
            "bf16": PassConfigParam(type_=bool, default_value=d.bf16, description="bf16 autocast"),
        }

    @staticmethod
    def is_accelerator_agnostic(accelerator_spec: AcceleratorSpec) -> bool:
        return True

    def _run_for_config(self, model: HfModelHandler, config, output_model_path: str) -> HfModelHandler:
        if not isinstance(model, HfModelHandler) or model.adapter_path:
            raise ValueError("FtlQScale trains a plain HF model's grid (no adapter)")
        base = Path(model.model_name_or_path)
        settings = TrainSettings(steps=config.steps, batch_size=config.batch_size,
                                 learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio,
                                 seed=config.seed, logging_steps=config.logging_steps, save_steps=config.save_steps,
                                 form=config.grid_form, eval_steps=config.eval_steps,
                                 patience=config.early_stopping_patience, packing=config.packing, bf16=config.bf16)
        checkpoints = Path(config.checkpoint_dir)
        to_mlflow = live_logger()  # the stage's MLflow run, when ftl tracks it

        def log(point: dict) -> None:  # one line per logging step; ftl's progress parser reads it
            if "loss" in point:
                print(f"qscale step {point['step']}/{config.steps} loss {point['loss']}", flush=True)
            else:
                print(f"qscale eval step {point['step']} eval_loss {point['eval_loss']}", flush=True)
            to_mlflow({k: v for k, v in point.items() if k != "step"}, point["step"])

        run(base, Path(config.train_data_file), checkpoints, settings, answer_only=config.answer_only, on_log=log,
            val_prepared=Path(config.val_data_file) if config.val_data_file else None)
        out = Path(output_model_path)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("qscale.safetensors", "trainer_log.json"):
            shutil.move(str(checkpoints / name), out / name)
        for name in _SMALL_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, out / name)
        (out / "qscale_base.json").write_text(json.dumps({"base_model": str(base.resolve())}))
        return HfModelHandler(model_path=str(out))
