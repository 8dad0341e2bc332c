"""The eval recipe: load the test set → load the models → score every sample with every model →
latency and footprint → write detailed results, the summary, and a report people want to read.

Perplexity comes from each model's own logits on identical token ids (when the tokenizers agree;
otherwise NLL per byte is the comparable number). Quantization damage is the KL divergence and
top-1 agreement of the next-token distributions of an ONNX model and its PyTorch source, on the
answer positions.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftl import manifest
from ftl.chat import answer_start
from ftl.errors import ConfigError, DataError
from ftl.eval.config import EvalConfig
from ftl.eval.models import EvalModel, Timed, TorchEvalModel, check_spec, load
from ftl.metrics import token_nll
from ftl.system import decode_rate

NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


@dataclass
class EvalResult:
    output: Path
    summary: dict
    comparison: list[dict] = field(default_factory=list)


def load_test_set(config: EvalConfig) -> list[dict]:
    path = Path(config.data)
    if path.is_file():
        from ftl.data import read_jsonl

        raw = read_jsonl(path)
        rows = [(f"{path}:{n}", r) for n, r in raw]
    else:
        try:
            import datasets

            data = datasets.load_dataset(config.data, split="test")
        except Exception as exc:
            raise DataError(f"cannot read the test set: {str(exc).splitlines()[0][:200]}", config.data,
                            "give a JSONL file or a local dataset") from None
        rows = [(f"{config.data}[{i}]", dict(r)) for i, r in enumerate(data)]
    samples = []
    for where, row in rows:
        for name, option in ((config.question_field, "--question-field"), (config.answer_field, "--answer-field")):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise DataError(f"missing field {name!r} (the {'reference' if option == '--answer-field' else 'question'})",
                                where, f"fields present: {', '.join(sorted(row))}; map it with {option}")
        samples.append({"where": where, "question": row[config.question_field], "reference": row[config.answer_field]})
        if config.limit and len(samples) >= config.limit:
            break
    if not samples:
        raise DataError("the test set is empty", config.data, "add Q/A rows")
    return samples


def evaluate(config: EvalConfig, on_progress=None, fingerprint: str = "") -> EvalResult:
    """Validate everything first (output, test set, model specs), score into a staging folder beside
    the output, and swap it in last: a typo or a crash never costs the previous report."""
    started = time.perf_counter()
    out = Path(config.output)
    manifest.check_output(out, force=config.force, stage="eval")
    samples = load_test_set(config)
    for spec in config.models:
        check_spec(spec)
    if config.compare and not Path(config.compare).is_file():
        raise ConfigError("nothing to compare with", str(config.compare), "give an earlier metrics_summary.json")
    models = [load(spec) for spec in config.models]
    staging = manifest.staging_folder(out)
    try:
        result = _evaluate(config, samples, models, staging, fingerprint, on_progress, started)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.swap_in(staging, out)
    result.output = out
    return result


def _evaluate(config, samples, models, out: Path, fingerprint: str, on_progress, started: float) -> EvalResult:
    record = manifest.new("eval", inputs={"data": config.data, "models": config.models},
                          params=config.model_dump(mode="json", exclude={"force"}), fingerprint=fingerprint)
    manifest.write(out, record)
    sources = _quantization_sources(models)
    same_tokens = _tokenizers_agree(models)
    numeric = config.numeric if config.numeric is not None else all("####" in s["reference"] for s in samples)

    scorer = rouge_scorer()
    # First the timed part: warm-up (untimed), then the first --latency-samples answers one at a time.
    singles = {}
    for model in models:
        for _ in range(config.warmup):
            model.generate(model.format.conversation(samples[0]["question"]), min(16, config.max_new_tokens))
        singles[model.label] = [model.generate(model.format.conversation(s["question"]), config.max_new_tokens)
                                for s in samples[:config.latency_samples]]
    details = _score_all(config, samples, models, sources, scorer, numeric, singles, on_progress)
    # Each model's peak memory in a process of its own, two at a time (after the scoring: beside it, the
    # CPU contention cost more than it saved, 69 s against 49 s for the quickstart's eval).
    memory = {}
    if config.memory:
        with ThreadPoolExecutor(max_workers=2) as pool:
            memory = dict(zip([m.label for m in models], pool.map(_peak_rss, [m.label for m in models])))

    summary = _summarise(models, details, sources, same_tokens, numeric, config, memory)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    comparison = _compare(summary, config.compare) if config.compare else []
    _write_outputs(out, details, summary, comparison)
    record.update(status="complete", metrics=summary["models"], timings={"seconds": summary["seconds"]})
    manifest.write(out, record)
    return EvalResult(out, summary, comparison)


def _score_all(config, samples, models, sources, scorer, numeric, singles, on_progress) -> list[dict]:
    """Samples go in chunks: each model scores a chunk's perplexity in one batch and answers the chunk's
    samples that have no timed answer in one batch. Only a chunk's logits are held at once."""
    details = []
    for first in range(0, len(samples), config.batch_size):
        chunk = samples[first:first + config.batch_size]
        # Per model and sample: the two NLLs, and the answer positions' logits where the damage needs them
        # (ONNX models and their sources); the whole chunk's logits are never held at once.
        scored: dict[str, list[tuple[tuple, np.ndarray | None]]] = {}
        answers: dict[str, list] = {}
        kept = set(sources) | {s.label for s in sources.values()}
        for model in models:
            ids = [_ids(model, sample) for sample in chunk]
            scored[model.label] = []
            for logits, (seq, start) in zip(model.logits_batch([i for i, _ in ids]), ids):
                scored[model.label].append(((token_nll(logits, seq, start), token_nll(logits, seq, 1)),
                                            logits[start - 1:-1].copy() if model.label in kept else None))
            answers[model.label] = _answers(model, chunk, singles[model.label][first:first + len(chunk)], config)
        for offset, sample in enumerate(chunk):
            entry = {"where": sample["where"], "question": sample["question"], "reference": sample["reference"],
                     "models": {}}
            for model in models:
                nlls, _ = scored[model.label][offset]
                entry["models"][model.label] = _score(sample, scorer, numeric, nlls, answers[model.label][offset])
            for onnx_label, source in sources.items():
                _, onnx_logits = scored[onnx_label][offset]
                if source.label in scored:
                    ref_logits = scored[source.label][offset][1]
                else:  # a source loaded only for the damage (not one of the compared models)
                    logits, source_start = _logits_for(source, sample)
                    ref_logits = logits[source_start - 1:-1]
                entry["models"][onnx_label].update(_damage(onnx_logits, ref_logits))
            details.append(entry)
            if on_progress:
                on_progress(len(details), len(samples))
    return details


# -- per sample ------------------------------------------------------------------------------------
def _ids(model: EvalModel, sample: dict) -> tuple[list[int], int]:
    """Token ids of prompt + reference answer, and where the answer starts."""
    tokenizer = _tokenizer(model)
    messages = model.format.conversation(sample["question"], sample["reference"])
    prompt = tokenizer(model.format.render_prompt(messages[:-1]), add_special_tokens=False)["input_ids"]
    full = tokenizer(model.format.render_example(messages), add_special_tokens=False)["input_ids"]
    return full, answer_start(full, prompt)


def _logits_for(model: EvalModel, sample: dict) -> tuple[np.ndarray, int]:
    ids, start = _ids(model, sample)
    return model.logits(ids), start


def _answers(model: EvalModel, chunk: list[dict], timed: list[Timed], config: EvalConfig) -> list[Timed]:
    """A chunk's answers: the timed ones given, the rest generated as one batch (untimed)."""
    out = list(timed)
    rest = chunk[len(timed):]
    if rest:
        texts = model.generate_batch([model.format.conversation(s["question"]) for s in rest], config.max_new_tokens)
        out += [Timed(text, 0, None, None) for text in texts]
    return out


def _score(sample: dict, scorer, numeric: bool, nlls: tuple, timed: Timed) -> dict:
    (nll_answer, n_answer), (nll_full, n_full) = nlls
    rouge = rouge_scores(scorer, sample["reference"], timed.text)
    answer_bytes = max(1, len(sample["reference"].encode("utf-8")))
    scores = {
        "answer": timed.text, "nll_answer": nll_answer, "answer_tokens": n_answer, "nll_full": nll_full,
        "full_tokens": n_full, "nll_per_byte": nll_answer / answer_bytes,
        **rouge,
        "exact_match": float(timed.text.strip() == sample["reference"].strip()),
        "timed": timed.ttft_s is not None,
    }
    if timed.ttft_s is not None:  # only the one-at-a-time answers have a latency
        scores.update(ttft_s=timed.ttft_s, latency_s=timed.total_s, new_tokens=timed.new_tokens,
                      decode_tokens_per_s=decode_rate(timed.new_tokens, timed.ttft_s, timed.total_s))
    if numeric:
        scores["numeric_correct"] = float(_final_number(timed.text) == _final_number(sample["reference"]))
    return scores


def rouge_scorer():
    """ROUGE as the field computes it (Google's rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer as rs

    return rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_scores(scorer, reference: str, prediction: str) -> dict[str, float]:
    """F-measures of ``prediction`` against ``reference`` (rouge-score takes the target first)."""
    scores = scorer.score(reference, prediction)
    return {key: scores[key].fmeasure for key in ("rouge1", "rouge2", "rougeL")}


def _damage(onnx: np.ndarray, reference: np.ndarray) -> dict:
    """Mean KL(reference || onnx) and top-1 agreement over the positions that predict answer tokens
    (both arrays are those positions' logits)."""
    p_log = _log_softmax(reference.astype(np.float64))
    q_log = _log_softmax(onnx.astype(np.float64))
    kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)
    agree = (p_log.argmax(-1) == q_log.argmax(-1))
    return {"kl_sum": float(kl.sum()), "top1_agree": int(agree.sum()), "damage_positions": int(len(kl))}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _final_number(text: str) -> str | None:
    if "####" in text:
        text = text.split("####")[-1]
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


# -- models ------------------------------------------------------------------------------------------
_TOKENIZERS: dict = {}


def _tokenizer(model: EvalModel):
    key = str(model.tokenizer_dir)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(model.tokenizer_dir)
    return _TOKENIZERS[key]


def _tokenizers_agree(models: list[EvalModel]) -> bool:
    vocabularies = {json.dumps(_tokenizer(m).get_vocab(), sort_keys=True) for m in models}
    return len(vocabularies) == 1


def _quantization_sources(models: list[EvalModel]) -> dict[str, EvalModel]:
    """For each ONNX model, the PyTorch model it was exported from: one in the comparison if it
    matches the export manifest's base and adapter hashes, else loaded from the manifest's paths."""
    sources = {}
    for model in models:
        if model.kind != "onnx" or not model.lineage.get("base"):
            continue
        match = next((m for m in models if m.kind == "torch" and m.lineage["base"] == model.lineage["base"]
                      and m.lineage["adapter"] == model.lineage["adapter"]), None)
        if match is None:
            source_path = Path(model.lineage["adapter_path"]).parent if model.lineage.get("adapter_path") else \
                Path(model.lineage["base_path"])
            match = TorchEvalModel(source_path)
        sources[model.label] = match
    return sources


# -- summary -----------------------------------------------------------------------------------------
def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def pick(q):
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"mean": statistics.fmean(ordered), "p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99)}


def _summarise(models, details, sources, same_tokens, numeric, config, memory: dict) -> dict:
    summary = {"hardware": manifest.hardware(), "versions": manifest.versions(), "samples": len(details),
               "data": config.data, "tokenizers_agree": same_tokens, "models": {}}
    for model in models:
        rows = [d["models"][model.label] for d in details]
        timed = [r for r in rows if r.get("timed", True)]
        answer_tokens = sum(r["answer_tokens"] for r in rows)
        stats = {
            "kind": model.kind, "threads": model.threads, "size_mb": model.size_mb(),
            # False: the untimed answers were computed one at a time, as og cannot batch this model
            "batched_answers": model.can_batch,
            "perplexity_answer": math.exp(sum(r["nll_answer"] for r in rows) / answer_tokens) if same_tokens else None,
            "perplexity_full": math.exp(sum(r["nll_full"] for r in rows) / sum(r["full_tokens"] for r in rows))
            if same_tokens else None,
            "nll_per_byte": statistics.fmean(r["nll_per_byte"] for r in rows),
            **{k: statistics.fmean(r[k] for r in rows) for k in ("rouge1", "rouge2", "rougeL", "exact_match")},
            "timed_samples": len(timed),
            "ttft_ms": {k: 1000 * v for k, v in _percentiles([r["ttft_s"] for r in timed]).items()},
            "latency_ms": {k: 1000 * v for k, v in _percentiles([r["latency_s"] for r in timed]).items()},
            "decode_tokens_per_s": statistics.fmean(r["decode_tokens_per_s"] for r in timed
                                                    if r["decode_tokens_per_s"]) if any(
                r["decode_tokens_per_s"] for r in timed) else None,
        }
        if numeric:
            stats["numeric_accuracy"] = statistics.fmean(r["numeric_correct"] for r in rows)
        if model.label in sources:
            positions = sum(r["damage_positions"] for r in rows)
            stats["quantization_source"] = sources[model.label].label
            stats["kl_divergence"] = sum(r["kl_sum"] for r in rows) / positions
            stats["top1_agreement"] = sum(r["top1_agree"] for r in rows) / positions
        if config.memory:
            stats.update(memory[model.label])
        summary["models"][model.label] = stats
    return summary


def _peak_rss(spec: str) -> dict:
    """The model's peak RSS in a fresh process of its own (ftl.eval.probe): the whole process, the
    interpreter's baseline (ftl and the model's runtime imported), and the model's share."""
    run = subprocess.run([sys.executable, "-m", "ftl.eval.probe", spec], capture_output=True, text=True)
    try:
        found = json.loads(run.stdout.strip().splitlines()[-1])
        peak, baseline = found["peak_rss_mib"], found["baseline_mib"]
    except (IndexError, KeyError, json.JSONDecodeError):
        return {"peak_rss_mib": None}
    return {"peak_rss_mib": round(peak, 1), "rss_baseline_mib": round(baseline, 1),
            "model_rss_mib": round(peak - baseline, 1)}


def _compare(summary: dict, old_path: Path) -> list[dict]:
    old = json.loads(old_path.read_text()).get("models", {})
    rows = []
    for label, now in summary["models"].items():
        before = old.get(label)
        if not before:
            continue
        for key in ("perplexity_answer", "kl_divergence", "top1_agreement", "rougeL", "decode_tokens_per_s"):
            if now.get(key) is not None and before.get(key) is not None:
                rows.append({"model": label, "metric": key, "before": before[key], "now": now[key],
                             "change": now[key] - before[key]})
    return rows


def _write_outputs(out: Path, details, summary, comparison) -> None:
    from ftl.eval.report import write_report

    (out / "detailed_results.json").write_text(json.dumps(
        {"hardware": summary["hardware"], "versions": summary["versions"], "samples": details}, indent=2) + "\n")
    (out / "metrics_summary.json").write_text(json.dumps({**summary, "comparison": comparison}, indent=2) + "\n")
    write_report(out, summary, comparison)
