"""The distil recipe: load seeds → drop duplicates → skip what is already answered → ask the
teacher concurrently within the rate budgets → append each answer the moment it arrives.

Nothing paid for is lost: every accepted answer is one complete JSON line, flushed, before the
next is written; a torn last line (kill -9 mid-write) is cut off on the next run.

Each seed ends a run answered, rejected or pending. Rejected is permanent (an empty, refused or
truncated answer, or a 4xx such as context_length_exceeded): written to ``<output>.rejects.jsonl``
with the reason, not asked again unless ``retry_rejects`` names that reason. Pending is a transient
failure that outlasted the retries (429, 5xx, timeout, dropped connection, malformed body): written
nowhere, so re-running the same command asks again. Only a refused key or a missing model stops the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from ftl import manifest
from ftl.distill.config import DistillConfig
from ftl.distill.seeds import Seed, drop_duplicates, load_seeds
from ftl.distill.teachers import Completion, TeacherError, create
from ftl.distill.teachers.base import TRANSIENT_KINDS
from ftl.errors import ConfigError, FtlError

REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|i cannot|i can'?t|as an ai\b|i'?m unable|i am unable)", re.I)


class TeacherFailed(FtlError):
    """The teacher refused the credentials or has no such model: every request would fail alike."""


@dataclass
class DistillResult:
    output: Path
    rejects: Path
    answered: int = 0
    already_done: int = 0
    rejected: Counter = field(default_factory=Counter)  # by reason, this run; written to the rejects file
    pending: Counter = field(default_factory=Counter)  # by failure kind, this run; a re-run asks again
    duplicates_exact: int = 0
    duplicates_near: int = 0
    retries: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float | None = None
    split: dict | None = None
    to_ask: int = 0  # the seeds this run asks the teacher about (not answered or rejected before)

    @property
    def settled(self) -> int:
        """Seeds of this run with an outcome: answered, rejected, or left pending for a re-run."""
        return self.answered + sum(self.rejected.values()) + sum(self.pending.values())


def rejects_path(output: Path) -> Path:
    return output.with_name(output.stem + ".rejects.jsonl")


def manifest_path(output: Path) -> Path:
    return output.with_name(output.stem + ".manifest.json")


def seed_key(seed: Seed, config: DistillConfig) -> str:
    """Same seed + same prompt settings = same key, whatever the run or the teacher's speed."""
    return manifest.sha256_json({"messages": build_messages(seed, config), "max_tokens": config.max_tokens,
                                 "temperature": config.temperature, "n": config.n})[:16]


def build_messages(seed: Seed, config: DistillConfig) -> list[dict]:
    try:
        prompt = config.prompt_template.format(question=seed.question, context=seed.context)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"--prompt-template has an unknown placeholder: {exc}", "--prompt-template",
                          "use only {question} and {context}") from None
    if "{context}" not in config.prompt_template and seed.context:
        prompt = f"{prompt}\n\n{seed.context}"
    messages = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def distill(config: DistillConfig, on_progress=None) -> DistillResult:
    started = time.perf_counter()
    output = Path(config.output)
    result = DistillResult(output, rejects_path(output))
    seeds = load_seeds(config)
    seeds, result.duplicates_exact, result.duplicates_near = drop_duplicates(seeds, config.dedup_threshold)
    keyed = [(seed_key(s, config), s) for s in seeds]
    done = _read_keys(output, repair=True)
    rejected = _settle_rejects(result.rejects, {k for k, _ in keyed}, config.retry_rejects)
    pending = [(k, s) for k, s in keyed if k not in done and k not in rejected]
    result.already_done = sum(1 for k, _ in keyed if k in done)
    result.to_ask = len(pending)
    output.parent.mkdir(parents=True, exist_ok=True)
    teacher = create(config)
    asyncio.run(_run_all(teacher, pending, config, result, on_progress))
    if config.val_fraction:
        result.split = _write_split(output, config.val_fraction)
    result.seconds = time.perf_counter() - started
    if config.price_input is not None or config.price_output is not None:
        result.cost = (result.prompt_tokens * (config.price_input or 0)
                       + result.completion_tokens * (config.price_output or 0)) / 1e6
    _write_manifest(config, result, teacher, len(seeds))
    return result


async def _run_all(teacher, pending, config, result, on_progress) -> None:
    limiter = RateLimiter(config.rpm, config.tpm)
    semaphore = asyncio.Semaphore(config.concurrency)
    fatal: list[TeacherError] = []
    with open(result.output, "a", encoding="utf-8") as out, open(result.rejects, "a", encoding="utf-8") as rej:
        async def one(key: str, seed: Seed, first: bool = False) -> None:
            async with semaphore:
                if fatal:
                    return
                outcome = await _ask(teacher, seed, config, limiter, result)
            if isinstance(outcome, TeacherError) and (outcome.fatal or (first and outcome.kind == "connection")):
                fatal.append(outcome)
                return
            _record(outcome, key, seed, teacher, config, result, out, rej)
            if on_progress:
                on_progress(result)

        tasks = []
        try:
            if pending:  # the first call alone: a wrong endpoint or key fails fast, before any fan-out
                await one(*pending[0], first=True)
            tasks = [asyncio.create_task(one(k, s)) for k, s in pending[1:]]
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await teacher.aclose()
    if fatal:
        error = fatal[0]
        raise TeacherFailed(f"teacher {teacher.name} failed: {error.message}", config.base_url or config.endpoint
                            or teacher.model, "check the endpoint, model name and key (the key is never printed); "
                            "finished answers are kept")


def _record(outcome, key: str, seed: Seed, teacher, config, result: DistillResult, out, rej) -> None:
    """Answered → output; permanent failure → rejects; transient → counted only, so a re-run asks again."""
    if isinstance(outcome, TeacherError):
        if outcome.transient:
            result.pending[outcome.kind] += 1
            return
        reason, detail = outcome.reason, outcome.message
    else:
        row, reason = _accept(outcome, seed, key, teacher, config)
        if reason is None:
            _append(out, row)
            result.answered += 1
            return
        detail = outcome.choices[0].text[:200] if outcome.choices else ""
    _append(rej, {"key": key, "Question": seed.question, "where": seed.where, "reason": reason, "detail": detail})
    result.rejected[reason] += 1


async def _ask(teacher, seed: Seed, config: DistillConfig, limiter, result) -> Completion | TeacherError:
    messages = build_messages(seed, config)
    estimate = sum(len(m["content"]) for m in messages) // 4 + config.max_tokens * config.n
    last: TeacherError | None = None
    for attempt in range(config.max_retries + 1):
        await limiter.acquire(estimate)
        started = time.perf_counter()
        try:
            completion = await asyncio.wait_for(
                teacher.complete(messages, max_tokens=config.max_tokens, temperature=config.temperature, n=config.n),
                timeout=config.timeout * 1.5)  # a guard above the client's own timeout, for teachers without one
            completion.latency_s = time.perf_counter() - started
            result.prompt_tokens += completion.prompt_tokens
            result.completion_tokens += completion.completion_tokens
            return completion
        except asyncio.TimeoutError:
            last = TeacherError("timeout", f"no answer in {config.timeout * 1.5:.0f}s")
        except TeacherError as exc:
            last = exc
            if not exc.transient:  # the same request would fail the same way: do not pay for it again
                return exc
        if attempt < config.max_retries:
            result.retries[last.kind] += 1
            await asyncio.sleep(_delay(last, attempt, config.backoff))
    return last


def _delay(error: TeacherError, attempt: int, backoff: float) -> float:
    """Honour Retry-After on 429 (and 5xx that send it); otherwise exponential back-off with jitter."""
    if error.retry_after is not None:
        return error.retry_after + random.uniform(0, 0.1 * backoff)
    return backoff * (2 ** attempt) * random.uniform(0.5, 1.5)


def _accept(completion: Completion, seed: Seed, key: str, teacher, config) -> tuple[dict | None, str | None]:
    """Keep the best usable choice: finished, non-empty, not a refusal, not filtered; the longest of those."""
    reasons = []
    usable = []
    for choice in completion.choices:
        text = choice.text.strip()
        if choice.finish_reason == "content_filter":  # withheld or cut by the filter, even if some text came
            reasons.append("content_filter")
        elif not text:
            reasons.append("empty")
        elif REFUSAL.match(text):
            reasons.append("refusal")
        elif choice.finish_reason == "length":
            reasons.append("truncated")
        else:
            usable.append(choice)
    if not usable:
        return None, (reasons[0] if reasons else "empty")
    best = max(usable, key=lambda c: len(c.text))
    question = config.prompt_template.format(question=seed.question, context=seed.context) \
        if seed.context and "{context}" in config.prompt_template else \
        (f"{seed.question}\n\n{seed.context}" if seed.context else seed.question)
    row = {"Question": question, "Answer": best.text.strip(), "key": key, "teacher": teacher.name,
           "model": teacher.model, "prompt_tokens": completion.prompt_tokens,
           "completion_tokens": completion.completion_tokens,
           "latency_s": round(getattr(completion, "latency_s", 0.0), 3), "finish_reason": best.finish_reason}
    if seed.reference is not None:
        row["reference"] = seed.reference
    return row, None


def _append(handle, row: dict) -> None:
    # flush, not fsync: the line reaches the OS at once, so a killed process loses nothing. fsync
    # would also survive power loss, but it waits for the disk on every answer.
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()


def _read_keys(path: Path, repair: bool) -> set[str]:
    return {row["key"] for row in _read_rows(path, repair)}


def _settle_rejects(path: Path, keys: set[str], retry: list[str] | None) -> set[str]:
    """Keys that stay rejected. Lines to ask again are dropped first: the reasons in ``retry`` (or
    all), and transient failures an older ftl wrote there, which are pending now, not rejects."""
    rows = _read_rows(path, repair=True)
    again = {row["key"] for row in rows if row["key"] in keys and _ask_again(row.get("reason"), retry)}
    if again:
        _drop_lines(path, again)
    return {row["key"] for row in rows} - again


def _ask_again(reason: str | None, retry: list[str] | None) -> bool:
    return reason in TRANSIENT_KINDS or (bool(retry) and ("all" in retry or reason in retry))


def _read_rows(path: Path, repair: bool) -> list[dict]:
    """Complete lines. A torn last line (killed mid-write) is cut off so appends stay valid."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as handle:
                handle.truncate(cut)
        data = data[:cut]
    rows = []
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            rows.append(_own_line(line, f"{path}:{number}"))
    return rows


def _own_line(line: bytes, where: str) -> dict:
    """A line ftl wrote: a JSON object with a key. Anything else means --output names someone else's file."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        row = None
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        raise ConfigError("existing output has a line ftl did not write", where, "distil into a new --output file")
    return row


def _drop_lines(path: Path, keys: set[str]) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line).get("key") not in keys]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _write_split(output: Path, fraction: float) -> dict:
    """Deterministic by key, so the split does not move when a run is resumed or extended."""
    train, val = [], []
    for line in output.read_text(encoding="utf-8").splitlines(keepends=True):
        key = json.loads(line)["key"]
        (val if int(key[:8], 16) / 0xFFFFFFFF < fraction else train).append(line)
    paths = {"train": output.with_name(output.stem + ".train.jsonl"), "val": output.with_name(output.stem + ".val.jsonl")}
    paths["train"].write_text("".join(train), encoding="utf-8")
    paths["val"].write_text("".join(val), encoding="utf-8")
    return {"train": len(train), "val": len(val)}


def _write_manifest(config: DistillConfig, result: DistillResult, teacher, seeds: int) -> None:
    path = manifest_path(result.output)
    total_rows = sum(1 for line in open(result.output, encoding="utf-8") if line.strip())
    record = manifest.new("distill", inputs={"seeds": config.seeds}, fingerprint="",
                          params=config.model_dump(mode="json"))
    record.update(status="complete", teacher={"name": teacher.name, "model": teacher.model}, metrics={
        "seeds_after_dedup": seeds, "rows_in_output": total_rows, "answered_this_run": result.answered,
        "already_done": result.already_done, "rejected": dict(result.rejected), "pending": dict(result.pending),
        "duplicates_exact": result.duplicates_exact, "duplicates_near": result.duplicates_near,
        "retries": dict(result.retries), "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens, "estimated_cost": result.cost, "split": result.split},
        timings={"seconds": round(result.seconds, 2)})
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets over a sliding 60-second window."""

    def __init__(self, rpm: int | None, tpm: int | None):
        self.rpm, self.tpm = rpm, tpm
        self.events: deque[tuple[float, int]] = deque()
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                while self.events and now - self.events[0][0] >= 60:
                    self.events.popleft()
                used = sum(t for _, t in self.events)
                if (not self.rpm or len(self.events) < self.rpm) and (not self.tpm or used + tokens <= self.tpm
                                                                      or not self.events):
                    self.events.append((now, tokens))
                    return
                await asyncio.sleep(max(0.01, 60 - (now - self.events[0][0])))
