"""Perplexity from a model's own logits, identical token ids for every backend.

Used by the end-to-end test and ``bench/``; ``ftl eval`` builds on it. For ONNX, the logits of
every position come from one ``append_tokens`` call (``get_output("logits")``); for PyTorch, from
one forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def token_nll(logits: np.ndarray, ids: list[int], start: int = 1) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t >= start, and the number of predicted tokens."""
    shifted = np.asarray(logits[start - 1 : len(ids) - 1], dtype=np.float32)
    targets = np.asarray(ids[start:])
    peak = shifted.max(axis=-1, keepdims=True)
    # exp in float32, the sums in float64: the same figure as all-float64 to ~1e-7, several times faster
    log_z = np.log(np.exp(shifted - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
    picked = shifted[np.arange(len(targets)), targets].astype(np.float64)
    return float((log_z - picked).sum()), len(targets)


def perplexity(nll_and_counts: list[tuple[float, int]]) -> float:
    total = sum(n for n, _ in nll_and_counts)
    count = sum(c for _, c in nll_and_counts)
    return math.exp(total / count)


def onnx_logits(model, ids: list[int], min_length: int = 0) -> np.ndarray:
    """All-position logits from an ``onnxruntime_genai.Model`` for one sequence. ``min_length``: the
    folder's KV window (:func:`ftl.generate.kv_window`), below which og refuses a cache."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(ids) + 1, min_length))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    return np.asarray(generator.get_output("logits"))[0]


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def onnx_perplexity(folder: Path, sequences: list[list[int]]) -> float:
    from ftl.generate import kv_window, load_og_model

    model, _ = load_og_model(folder)
    window = kv_window(folder)
    return perplexity([token_nll(onnx_logits(model, ids, window), ids) for ids in sequences])


def torch_perplexity(model, sequences: list[list[int]]) -> float:
    return perplexity([token_nll(torch_logits(model, ids), ids) for ids in sequences])


def load_merged_torch(base_dir: Path, adapter_dir: Path | None = None):
    """The fp32 PyTorch model an export came from: base + LoRA merged with peft."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval()


def repeated_ngrams(text: str, n: int = 4) -> int:
    """Word n-grams that repeat an earlier one: 0 for a text that never says the same thing twice."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams))


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    """An answer loops when one word n-gram occurs ``times`` times or more."""
    from collections import Counter

    words = text.split()
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(counts) and max(counts.values()) >= times
