"""Search defaults measured on held-out prompts, written into the exported genai_config.json.

A small int4 model answering greedily tends to loop. Whether a repetition penalty or a banned
repeated n-gram helps depends on the model and the data, so the export measures it: every
candidate answers the same held-out questions, scored by ROUGE-L against the reference answers and
by the word 4-grams that repeat (ftl.metrics.repeated_ngrams). The best ROUGE-L wins; candidates
within 0.01 of it are separated by fewer repeats, then by their order (greedy first). The choice
goes into genai_config.json's "search", which og (so ``ftl generate``, ``ftl chat`` and any og
client) uses by default; the table of trials goes into the manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CANDIDATES: dict[str, dict] = {
    "greedy": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    "repetition_penalty 1.1": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 0},
    "repetition_penalty 1.2": {"repetition_penalty": 1.2, "no_repeat_ngram_size": 0},
    "no_repeat_ngram 3": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 3},
    "no_repeat_ngram 4": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 4},
}
TIE = 0.01
BATCH = 16  # held-out questions answered together as one og batch (the same answers as one by one)


@dataclass
class Trial:
    name: str
    search: dict
    rouge_l: float
    repeated_ngrams: float
    looping: float
    chosen: bool = False


def measure(folder: Path, rows: list[dict], max_new_tokens: int = 96) -> list[Trial]:
    """Every candidate's answers to the held-out questions ({"question", "reference"} rows)."""
    from ftl.eval.stage import rouge_scorer, rouge_scores
    from ftl.generate import OnnxChatModel
    from ftl.metrics import loops, repeated_ngrams

    model = OnnxChatModel(folder)
    scorer = rouge_scorer()
    trials = []
    conversations = [model.format.conversation(row["question"]) for row in rows]
    for name, search in CANDIDATES.items():
        rouge, repeats, looping = [], [], []
        answers = [g.text for start in range(0, len(rows), BATCH)
                   for g in model.generate_batch(conversations[start:start + BATCH], max_new_tokens=max_new_tokens,
                                                 search=search)]
        for row, answer in zip(rows, answers):
            rouge.append(rouge_scores(scorer, row["reference"], answer)["rougeL"])
            repeats.append(repeated_ngrams(answer))
            looping.append(loops(answer))
        n = max(1, len(rows))
        trials.append(Trial(name, search, sum(rouge) / n, sum(repeats) / n, sum(looping) / n))
    return trials


def choose(trials: list[Trial]) -> Trial:
    best = max(t.rouge_l for t in trials)
    close = [t for t in trials if t.rouge_l >= best - TIE]
    pick = min(close, key=lambda t: (t.repeated_ngrams, trials.index(t)))
    pick.chosen = True
    return pick


def write_defaults(folder: Path, search: dict) -> None:
    """Put the chosen options into genai_config.json's "search" (og's defaults for every client)."""
    path = Path(folder) / "genai_config.json"
    config = json.loads(path.read_text())
    config.setdefault("search", {}).update(search)
    path.write_text(json.dumps(config, indent=4) + "\n")


def tune(folder: Path, rows: list[dict], max_new_tokens: int = 96) -> dict:
    trials = measure(folder, rows, max_new_tokens)
    pick = choose(trials)
    write_defaults(folder, pick.search)
    return {"chosen": pick.name, "search": pick.search, "rows": len(rows), "max_new_tokens": max_new_tokens,
            "trials": [asdict(t) for t in trials]}
