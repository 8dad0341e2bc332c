"""Seed questions from JSONL, CSV, plain text or a ``datasets`` dataset; checked row by row."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from ftl.errors import DataError

QUESTION_GUESSES = ("Question", "question", "instruction", "prompt", "input")


@dataclass
class Seed:
    where: str
    question: str
    context: str = ""
    reference: str | None = None


def load_seeds(config) -> list[Seed]:
    rows = _rows(config)
    if not rows:
        raise DataError("no seeds", config.seeds, "add at least one question")
    seeds = [_seed(where, row, config) for where, row in rows]
    return seeds[: config.limit] if config.limit else seeds


def _rows(config) -> list[tuple[str, dict]]:
    path = Path(config.seeds)
    if path.is_file() and path.suffix == ".jsonl":
        from ftl.data import read_jsonl

        return [(f"{path}:{n}", row) for n, row in read_jsonl(path)]
    if path.is_file() and path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return [(f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(handle), start=2)]
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        return [(f"{path}:{n}", {"question": line.strip()}) for n, line in enumerate(lines, 1) if line.strip()]
    try:
        import datasets

        data = datasets.load_dataset(str(path) if path.exists() else config.seeds, split=config.dataset_split or "train")
    except Exception as exc:  # FileNotFoundError, DatasetNotFoundError, ConnectionError, …
        raise DataError(f"cannot read seeds: {str(exc).splitlines()[0][:200]}", config.seeds,
                        "give a .jsonl/.csv/.txt file, a local dataset folder, or a Hub dataset when online") from None
    return [(f"{config.seeds}[{i}]", dict(row)) for i, row in enumerate(data)]


def _seed(where: str, row: dict, config) -> Seed:
    if "instruction" in row and isinstance(row.get("instances"), list) and not config.question_field:
        instance = row["instances"][0] if row["instances"] else {}  # self-instruct task
        return Seed(where, str(row["instruction"]).strip(), str(instance.get("input", "")).strip(),
                    instance.get("output"))
    field = config.question_field or next((f for f in QUESTION_GUESSES if f in row), None)
    if field is None or field not in row:
        present = ", ".join(sorted(row)) or "none"
        raise DataError(f"missing question column {field or '(none of ' + '/'.join(QUESTION_GUESSES) + ')'}",
                        where, f"columns present: {present}; choose one with --question-field")
    question = row[field]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"question column {field!r} is empty or not text", where, "fix or remove that row")
    context = ""
    if config.context_field:
        if config.context_field not in row:
            raise DataError(f"missing context column {config.context_field!r}", where, "check --context-field")
        context = str(row[config.context_field] or "").strip()
    reference = None
    if config.reference_field:
        if config.reference_field not in row:
            raise DataError(f"missing reference column {config.reference_field!r}", where,
                            "check --reference-field")
        reference = row[config.reference_field]
    return Seed(where, question.strip(), context, reference)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def shingles(text: str, size: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + size]) for i in range(max(1, len(words) - size + 1))}


def drop_duplicates(seeds: list[Seed], threshold: float) -> tuple[list[Seed], int, int]:
    """Exact (after normalising case and spaces) and near duplicates (shingle Jaccard >= threshold).

    Done before any request, so the teacher's quota is not spent twice on one question.
    """
    kept: list[Seed] = []
    seen_exact: set[str] = set()
    kept_shingles: list[set] = []
    exact = near = 0
    for seed in seeds:
        key = normalise(seed.question + " " + seed.context)
        if key in seen_exact:
            exact += 1
            continue
        grams = shingles(seed.question + " " + seed.context)
        if any(len(grams & other) / len(grams | other) >= threshold for other in kept_shingles):
            near += 1
            continue
        seen_exact.add(key)
        kept_shingles.append(grams)
        kept.append(seed)
    return kept, exact, near
