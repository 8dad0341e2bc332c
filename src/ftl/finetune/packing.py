"""Packed training batches and a loss over the answer positions only: ftl's CPU training levers.

Measured on SmolLM2-135M, 2 cores, the quickstart's rows (bench/finetune.py): a batch of 4 rows
padded to its longest wastes 30% of the tokens it computes, and the vocabulary head (49k × 576)
scores every position although answer-only training labels fewer than half of them.

- :func:`pack` joins a batch's rows into one sequence with the position ids restarting at 0 for
  each row and no attention mask. transformers (≥ 4.53) reads restarting position ids as packed
  sequences and builds a block-diagonal causal mask, so no row attends to another (the tests probe
  this at the boundary); each row's first label is dropped (it would be predicted from the previous
  row; unpacked, nothing predicts it either).
- :func:`labelled_loss` runs the body on every position but the head only where a label follows
  (``logits_to_keep`` with the positions), and sums the cross-entropy there: the same loss as the
  model's own, on fewer logits.

The rows per step, their order and the loss are unchanged, so the loss curve is the padded one's.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

IGNORE = -100


def pack(rows: list[dict]) -> dict[str, torch.Tensor]:
    """One packed row from ``rows`` ({input_ids, labels} each; labels already -100 where not trained)."""
    ids, positions, labels = [], [], []
    for row in rows:
        row_ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        row_labels = torch.as_tensor(row.get("labels", row_ids), dtype=torch.long).clone()
        row_labels[0] = IGNORE
        ids.append(row_ids)
        labels.append(row_labels)
        positions.append(torch.arange(len(row_ids), dtype=torch.long))
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None],
            "labels": torch.cat(labels)[None]}


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens in a batch, packed or padded."""
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def pad(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The same rows as a padded batch (right padding, masked): what --no-packing trains on."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long)}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.as_tensor(row.get("labels", row["input_ids"]))
    return batch


def _keeps_logits(model) -> bool:
    """Whether the causal LM under DDP and PEFT wrappers takes ``logits_to_keep``."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def labelled_loss(model, batch: dict[str, torch.Tensor], num_items: int | torch.Tensor | None = None):
    """(loss, outputs): cross-entropy over the positions whose next token has a label, computing the head
    only there. ``num_items`` is the label count to divide by (the HF Trainer's ``num_items_in_batch``
    under gradient accumulation); the batch's own count otherwise. Works on packed and padded batches."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        # transformers reads restarting position ids as packed rows only without a cache (masking_utils)
        inputs["use_cache"] = False
    if labels.shape[0] == 1 and _keeps_logits(model):
        outputs = model(**inputs, logits_to_keep=cols)
        logits = outputs.logits[0]
    else:  # a padded batch of several rows, or a model without logits_to_keep: every position's logits
        outputs = model(**inputs)
        logits = outputs.logits[rows, cols]
    total = F.cross_entropy(logits.float(), targets[rows, cols], reduction="sum")
    count = num_items if num_items is not None else max(1, len(cols))
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count, outputs
