"""qscale: fine-tune an int4 model by training its grid's scales (and minimums), codes fixed.

The PEQA idea applied to the grid the export writes (INT4.md): every decoder projection becomes
w = minimum + scale·code with the codes frozen, and only the per-block scale and minimum train
(6.6M parameters on SmolLM2-135M). The result is an int4 model by construction; the export
writes it exactly (:mod:`ftl.export.exact`). Run by Olive through ftl's pass
(:mod:`ftl.finetune.qscale_pass`); the loop is here so it is one tested function.

Two grid forms: ``float-min`` keeps the GGUF Q4_1 form (a float minimum per block, exact for an
imported GGUF model); ``int-zp`` uses MatMulNBits' own integer zero point, so the export needs no
offset correction and decodes as fast as the builder's own int4.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ftl.chat import answer_start
from ftl.quant.gguf_grid import projection_grids
from ftl.quant.grid import ARTEFACT, PROJECTIONS, Grid, grid_of, integer_form, save_scales

GRID_FORMS = ("float-min", "int-zp")


def _grid_weight(codes, scale, minimum, zero_point) -> torch.Tensor:
    """[N, K] weight of codes [N, K/block, block]: scale·(code − zero point), or scale·code + minimum."""
    q = codes.to(scale.dtype)
    w = scale[..., None] * (q - zero_point[..., None]) if zero_point is not None else \
        scale[..., None] * q + minimum[..., None]
    return w.reshape(w.shape[0], -1)


class _GridMatmul(torch.autograd.Function):
    """x·Wᵀ + b with W built from the grid again in backward, not kept: autograd alone saves W and the
    float codes of every projection until backward, 8 bytes a weight (11.7 B/param of peak RSS on
    Llama-3.2-1B's shape); this keeps the uint8 codes the module holds anyway. Same gradients as
    autograd of :func:`_grid_weight` (tests/test_int4_grid.py compares them)."""

    @staticmethod
    def forward(ctx, x, codes, scale, minimum, zero_point, bias):
        ctx.save_for_backward(x, codes, scale, minimum, zero_point)
        return nn.functional.linear(x, _grid_weight(codes, scale, minimum, zero_point).to(x.dtype),
                                    None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, codes, scale, minimum, zero_point = ctx.saved_tensors
        n, groups, block = codes.shape
        grad_x = grad_scale = grad_minimum = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ _grid_weight(codes, scale, minimum, zero_point).to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_w = (grad.reshape(-1, n).to(scale.dtype).T @ x.reshape(-1, groups * block).to(scale.dtype))
            grad_w = grad_w.view(n, groups, block)
            q = codes.to(scale.dtype)
            if zero_point is not None:
                q = q - zero_point[..., None]
            grad_scale = (grad_w * q).sum(-1) if ctx.needs_input_grad[2] else None
            grad_minimum = grad_w.sum(-1) if minimum is not None and ctx.needs_input_grad[3] else None
        return grad_x, None, grad_scale, grad_minimum, None, None


class GridLinear(nn.Module):
    """A Linear whose weight is its grid: scale·code + minimum (or scale·(code − zero point))."""

    def __init__(self, grid: Grid, bias: torch.Tensor | None):
        super().__init__()
        self.source = grid  # its bits, block, kind, and the precision its scales are kept in
        self.register_buffer("codes", grid.codes.view(grid.codes.shape[0], -1, grid.block), persistent=False)
        self.scale = nn.Parameter(grid.scale.float().clone())  # its own: the source grid stays as read
        if grid.zero_point is not None:
            self.register_buffer("zero_point", grid.zero_point.float(), persistent=False)
            self.minimum = None
        else:
            self.zero_point = None
            self.minimum = nn.Parameter(grid.minimum.float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        return _grid_weight(self.codes, self.scale, self.minimum, self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.scale.requires_grad or x.requires_grad):
            return _GridMatmul.apply(x, self.codes, self.scale, self.minimum, self.zero_point, self.bias)
        return nn.functional.linear(x, self.weight(), self.bias)

    def grid(self) -> Grid:
        """The grid as the export writes it: scale and minimum in the precision the source grid
        keeps them (fp16 for Q4_1 and the other GGUF formats with an fp16 scale, as the artefact does)."""
        codes = self.codes.reshape(self.codes.shape[0], -1)
        kept = self.source.scale.dtype
        if self.zero_point is not None:
            return replace(self.source, codes=codes, scale=self.scale.detach().to(kept), minimum=None,
                           zero_point=self.zero_point.to(torch.uint8))
        return replace(self.source, codes=codes, scale=self.scale.detach().to(kept),
                       minimum=self.minimum.detach().to(kept), zero_point=None)


def attach(model: nn.Module, form: str = "float-min", known: dict[str, Grid] | None = None) -> dict[str, bool]:
    """Swap every decoder projection for a GridLinear on its grid; {module: grid was exact}.

    ``known``: the grids a GGUF import read from its file (any GGUF type, :mod:`ftl.quant.gguf_grid`);
    a projection without one is recovered as Q4_1 from its weights, or rounded onto one."""
    if form not in GRID_FORMS:
        raise ValueError(f"unknown grid form {form!r}")
    exact = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] not in PROJECTIONS:
            continue
        if module.in_features % 32:
            continue
        if known and name in known:
            grid, was_exact = known[name], True
        else:
            grid, was_exact = grid_of(module.weight)
        if form == "int-zp":
            grid = integer_form(grid)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], GridLinear(grid, module.bias))
        exact[name] = was_exact
    return exact


def grids(model: nn.Module) -> dict[str, Grid]:
    return {name: m.grid() for name, m in model.named_modules() if isinstance(m, GridLinear)}


def round_to_artefact(model: nn.Module) -> None:
    """Round the trained scales and minimums to the precision they are saved in (fp16 for Q4_1),
    so the PyTorch model is the export's."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GridLinear):
                kept = module.source.scale.dtype
                module.scale.copy_(module.scale.to(kept).float())
                if module.minimum is not None:
                    module.minimum.copy_(module.minimum.to(kept).float())


@dataclass
class Rows:
    """Tokenised rows: ids, and how many leading tokens are prompt (not trained on)."""

    ids: list[list[int]]
    prompt_lengths: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(len(i) - p for i, p in zip(self.ids, self.prompt_lengths))


def tokenize_records(tokenizer, records: list[dict], answer_only: bool = True) -> Rows:
    """Rows of ftl's prepared form ({"text", "prompt"}): with answer_only the prompt is masked."""
    ids, prompts = [], []
    for row in records:
        full = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        prompt = row.get("prompt") if answer_only else None
        ids.append(full)
        prompts.append(answer_start(full, tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0)
    return Rows(ids, prompts)


def tokenize_rows(tokenizer, prepared: Path, answer_only: bool = True) -> Rows:
    records = [json.loads(line) for line in Path(prepared).read_text(encoding="utf-8").splitlines() if line.strip()]
    return tokenize_records(tokenizer, records, answer_only)


def batch_loss(model: nn.Module, rows: Rows, picks: list[int], pad_id: int, packed: bool = True) -> torch.Tensor:
    """Mean loss per labelled token of the rows ``picks``: packed into one sequence (ftl.finetune.packing:
    no padding, no attention across rows, the head only where a label follows), or padded with ``pad_id``."""
    from ftl.finetune.packing import IGNORE, labelled_loss, pack, pad

    batch = []
    for i in picks:
        ids = torch.tensor(rows.ids[i])
        labels = ids.clone()
        labels[: rows.prompt_lengths[i]] = IGNORE
        batch.append({"input_ids": ids, "labels": labels})
    return labelled_loss(model, pack(batch) if packed else pad(batch, pad_id))[0]


@dataclass
class TrainSettings:
    steps: int
    batch_size: int = 4
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.05
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 10
    form: str = "float-min"
    eval_steps: int = 10
    patience: int | None = None
    packing: bool = True
    bf16: bool = False  # autocast (ftl.system.bf16_training decides whether the machine can)


@dataclass
class TrainResult:
    grids: dict[str, Grid]
    exact: dict[str, bool]
    loss_curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: int = 0
    eval_curve: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_eval_loss: float | None = None
    stop_reason: str = "max_steps"
    global_step: int = 0
    train_seconds: float = 0.0  # the optimiser steps alone, this process (not evaluation, load or save)
    train_tokens: int = 0


def eval_loss(model: nn.Module, rows: Rows, pad_id: int, batch_size: int, packed: bool = True) -> float:
    """Mean loss per answer token over every row (the validation loss)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows.ids), batch_size):
            picks = list(range(start, min(start + batch_size, len(rows.ids))))
            count = sum(len(rows.ids[i]) - rows.prompt_lengths[i] for i in picks)
            total += float(batch_loss(model, rows, picks, pad_id, packed)) * count
            tokens += count
    model.train(was_training)
    return total / max(1, tokens)


def _order(rows: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """The batches of every step: a seeded shuffle per pass over the rows."""
    rng = random.Random(seed)
    batches, pool = [], []
    while len(batches) < steps:
        if len(pool) < batch:
            fresh = list(range(rows))
            rng.shuffle(fresh)
            pool += fresh
        batches.append(pool[:batch])
        pool = pool[batch:]
    return batches


def train(model: nn.Module, rows: Rows, settings: TrainSettings, *, pad_id: int, checkpoint: Path | None = None,
          on_log: Callable[[dict], None] | None = None, val: Rows | None = None) -> TrainResult:
    """Train the scales (and minimums) of a model whose projections are GridLinear (see attach).

    AdamW with a cosine schedule and linear warm-up, as the LoRA recipe; a checkpoint of the scales
    and the optimiser every ``save_steps`` lets an interrupted run resume where it stopped. With
    ``val`` rows, eval_loss every ``eval_steps``; the best scales are the ones returned, and
    ``patience`` evaluations without a better one stop the run (as HF's EarlyStoppingCallback)."""
    started = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, GridLinear) for p in (m.scale, m.minimum) if p is not None]
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, int(settings.steps * settings.warmup_ratio))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve: list[dict] = []
    start = 0
    # Validation: the eval curve, the best scales so far, evaluations since the best, and whether to stop.
    watch: dict = {"curve": [], "best": None, "best_step": None, "best_params": None, "bad": 0, "stop": False}
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, curve = state["step"], state["curve"]
        watch = state.get("watch", watch)
    model.train()
    running = []
    done = start
    trained_tokens, train_seconds = 0, 0.0
    for step, picks in enumerate(_order(len(rows.ids), settings.steps, settings.batch_size, settings.seed)):
        if step < start:
            continue
        if watch["stop"]:
            break
        step_started = time.perf_counter()
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                            enabled=settings.bf16):
            loss = batch_loss(model, rows, picks, pad_id, settings.packing)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - step_started
        trained_tokens += sum(len(rows.ids[i]) for i in picks)
        running.append(float(loss.detach()))
        done = step + 1
        if done % settings.logging_steps == 0 or done == settings.steps:
            point = {"step": done, "loss": round(sum(running) / len(running), 4),
                     "learning_rate": scheduler.get_last_lr()[0]}
            running = []
            curve.append(point)
            if on_log:
                on_log(point)
        if val is not None and (done % settings.eval_steps == 0 or done == settings.steps):
            loss_v = eval_loss(model, val, pad_id, settings.batch_size, settings.packing)
            watch["curve"].append({"step": done, "eval_loss": loss_v})  # full precision: the best is chosen on it
            if on_log:
                on_log({"step": done, "eval_loss": loss_v})
            if watch["best"] is None or loss_v < watch["best"]:
                watch.update(best=loss_v, best_step=done, bad=0,
                             best_params=[p.detach().clone() for p in params])
            else:
                watch["bad"] += 1
                watch["stop"] = bool(settings.patience) and watch["bad"] >= settings.patience
        if checkpoint is not None and (done % settings.save_steps == 0) and done < settings.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"step": done, "params": [p.detach().clone() for p in params],
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "curve": curve, "watch": watch}, tmp)
            tmp.replace(checkpoint)
    model.eval()
    if watch["best_params"] is not None:  # the best evaluation's scales, not the last step's
        with torch.no_grad():
            for p, best in zip(params, watch["best_params"]):
                p.copy_(best)
    round_to_artefact(model)
    return TrainResult(grids(model), {}, curve, time.perf_counter() - started, start, eval_curve=watch["curve"],
                       best_step=watch["best_step"], best_eval_loss=watch["best"],
                       stop_reason="early_stopping" if watch["stop"] else "max_steps", global_step=done,
                       train_seconds=train_seconds, train_tokens=trained_tokens)


def run(model_dir: Path, prepared: Path, out: Path, settings: TrainSettings, *, answer_only: bool = True,
        on_log: Callable[[dict], None] | None = None, val_prepared: Path | None = None) -> TrainResult:
    """Load the base, put it on its grid, train, and write the artefact (qscale.safetensors) to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    exact = attach(model, settings.form, projection_grids(model_dir))
    rows = tokenize_rows(tokenizer, prepared, answer_only)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    val = tokenize_rows(tokenizer, val_prepared, answer_only) if val_prepared else None
    result = train(model, rows, settings, pad_id=pad, checkpoint=out / "qscale-checkpoint.pt", on_log=on_log, val=val)
    result.exact = exact
    save_scales(out / ARTEFACT, result.grids, {
        "form": settings.form, "grid": "exact" if all(exact.values()) else "round-to-nearest",
        "answer_tokens": str(rows.answer_tokens)})
    (out / "qscale-checkpoint.pt").unlink(missing_ok=True)
    summary = {"loss_curve": result.loss_curve, "answer_tokens": rows.answer_tokens, "rows": len(rows.ids),
               "global_step": result.global_step, "max_steps": settings.steps, "stop_reason": result.stop_reason,
               "train_seconds": round(result.train_seconds, 2), "train_tokens": result.train_tokens,
               "packing": settings.packing}
    if val is not None:
        summary.update(best_step=result.best_step, best_eval_loss=result.best_eval_loss, eval_curve=result.eval_curve)
    (out / "trainer_log.json").write_text(json.dumps(summary, indent=1))
    return result


def load_model(model_dir: Path, artefact: Path):
    """The PyTorch grid model a qscale artefact describes: the base's codes with its scales."""
    from transformers import AutoModelForCausalLM

    from ftl.quant.grid import load_scales

    found, metadata = load_scales(artefact)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    attach(model, metadata.get("form", "float-min"), projection_grids(model_dir))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, GridLinear) and name in found:
                module.scale.copy_(found[name]["scale"].float())
                if module.minimum is not None:
                    module.minimum.copy_(found[name]["minimum"].float())
    materialize(model)
    return model.eval()


def materialize(model: nn.Module) -> None:
    """Replace every GridLinear by a plain Linear holding its dequantised weight: the same function,
    without rebuilding the weight on every forward pass (inference)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GridLinear):
            with torch.no_grad():
                weight = module.weight()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], linear)
