"""Seed questions from a file, a ``datasets`` folder or a Hub dataset; checked row by row.

The format is taken from the file's suffix (and, for .json, its content), never guessed from
lines of text: a misread file would otherwise be sent to a paid teacher line by line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftl.data import json_object, parse_jsonl, read_text, text_lines
from ftl.errors import DataError

QUESTION_GUESSES = ("Question", "question", "instruction", "prompt", "input")
ACCEPTED = (".jsonl, .json (an array of objects, or JSON lines), .csv, .tsv, .parquet, .txt or no suffix "
            "(a question a line), a datasets folder, or a Hub dataset name")


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
    if path.is_dir():
        return _folder_rows(path, config.dataset_split or "train")
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"unsupported seed file format {path.suffix!r}", str(path), f"accepted: {ACCEPTED}")
        return reader(path)
    if path.is_absolute() or config.seeds.startswith(".") or (path.suffix and path.suffix.lower() in _READERS):
        raise DataError("seed file not found", config.seeds, "check the path")
    return _hub_rows(config.seeds, config.dataset_split or "train")  # only works online


def _decoded(path: Path) -> str:
    return read_text(path, f"one of: {ACCEPTED}")


def _jsonl(path: Path) -> list[tuple[str, dict]]:
    return [(f"{path}:{n}", row) for n, row in parse_jsonl(_decoded(path), path)]


def _json(path: Path) -> list[tuple[str, dict]]:
    """A JSON array of objects (or one object); JSON lines saved as .json are common too, told apart by content."""
    text = _decoded(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [(f"{path}:{n}", row) for n, row in parse_jsonl(text, path)]
    items = data if isinstance(data, list) else [data]
    return [(f"{path}[{i}]", json_object(item, f"{path}[{i}]")) for i, item in enumerate(items)]


def _delimited(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(_decoded(path), newline=""), delimiter=delimiter, restkey="(extra columns)")
    try:
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    except csv.Error as exc:
        raise DataError(f"malformed {path.suffix[1:]}: {exc}", f"{path}:{reader.line_num}",
                        "fix the quoting on that line") from None


def _text(path: Path) -> list[tuple[str, dict]]:
    return [(f"{path}:{n}", {"question": line.strip()}) for n, line in enumerate(text_lines(_decoded(path)), 1)
            if line.strip()]


def _parquet(path: Path) -> list[tuple[str, dict]]:
    return _datasets_rows(str(path), "parquet", data_files=str(path), split="train")


def _folder_rows(folder: Path, split: str) -> list[tuple[str, dict]]:
    """A folder from ``save_to_disk``, or data files ``load_dataset`` recognises."""
    if not ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        return _datasets_rows(str(folder), str(folder), split=split)
    datasets = _datasets()
    data = _call(str(folder), datasets.load_from_disk, str(folder))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"no split {split!r}", str(folder), f"choose one of {', '.join(data)} with --dataset-split")
        data = data[split]
    return [(f"{folder}[{i}]", dict(row)) for i, row in enumerate(data)]


def _hub_rows(name: str, split: str) -> list[tuple[str, dict]]:
    """A Hub dataset goes to the user's usual datasets cache: it is a download worth keeping."""
    datasets = _datasets()
    with _no_progress_bars(datasets):
        data = _call(name, datasets.load_dataset, name, split=split)
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(data)]


def _datasets_rows(where: str, *args, **kwargs) -> list[tuple[str, dict]]:
    """``load_dataset`` on local files, its arrow copy in a temp dir: the user's cache is not filled
    with a copy of every seed file (nor the output's folder with stray files)."""
    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="ftl-seeds-", ignore_cleanup_errors=True) as cache, \
            _no_progress_bars(datasets):
        data = _call(where, datasets.load_dataset, *args, cache_dir=cache, **kwargs)
        return [(f"{where}[{i}]", dict(row)) for i, row in enumerate(data)]


def _call(where: str, function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception as exc:  # FileNotFoundError, DatasetNotFoundError, ConnectionError, ArrowInvalid, …
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"cannot read seeds: {first}", where, f"give one of: {ACCEPTED} (a Hub name only when "
                        "online)") from None


def _datasets():
    import datasets

    return datasets


@contextlib.contextmanager
def _no_progress_bars(datasets):
    """datasets' own bars would tear through the CLI's progress line."""
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


_READERS = {".jsonl": _jsonl, ".json": _json, ".csv": lambda p: _delimited(p, ","),
            ".tsv": lambda p: _delimited(p, "\t"), ".parquet": _parquet, ".txt": _text, "": _text}


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
