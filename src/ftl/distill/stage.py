"""The distil recipe: load seeds → drop duplicates → skip what is already answered → ask the
teacher concurrently within the rate budgets → append each answer the moment it arrives.

Nothing paid for is lost: every accepted answer is one complete JSON line, flushed, before the
next is written; a torn last line (kill -9 mid-write) is cut off on the next run; failures go to
``<output>.rejects.jsonl`` with the reason, and ``retry_rejects`` asks for them again.
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
from ftl.errors import ConfigError, FtlError

REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|i cannot|i can'?t|as an ai\b|i'?m unable|i am unable)", re.I)


class TeacherFailed(FtlError):
    """The teacher refused the credentials or the request itself; retrying cannot help."""


@dataclass
class DistillResult:
    output: Path
    rejects: Path
    answered: int = 0
    already_done: int = 0
    rejected: Counter = field(default_factory=Counter)
    duplicates_exact: int = 0
    duplicates_near: int = 0
    retries: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float | None = None
    split: dict | None = None


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
    rejected = _read_keys(result.rejects, repair=True)
    if config.retry_rejects:
        _drop_lines(result.rejects, {k for k, _ in keyed})
        rejected = set()
    pending = [(k, s) for k, s in keyed if k not in done and k not in rejected]
    result.already_done = sum(1 for k, _ in keyed if k in done)
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
            if isinstance(outcome, TeacherError):
                if outcome.fatal or (first and outcome.kind == "connection"):
                    fatal.append(outcome)
                    return
                _append(rej, {"key": key, "Question": seed.question, "where": seed.where,
                              "reason": outcome.kind, "detail": outcome.message})
                result.rejected[outcome.kind] += 1
            else:
                row, reason = _accept(outcome, seed, key, teacher, config)
                if reason:
                    _append(rej, {"key": key, "Question": seed.question, "where": seed.where, "reason": reason,
                                  "detail": outcome.choices[0].text[:200] if outcome.choices else ""})
                    result.rejected[reason] += 1
                else:
                    _append(out, row)
                    result.answered += 1
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
            if exc.fatal:
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
    """Keep the best usable choice: finished, non-empty, not a refusal; the longest of those."""
    reasons = []
    usable = []
    for choice in completion.choices:
        text = choice.text.strip()
        if not text:
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
    # flush, not fsync: the line reaches the OS at once, so a killed process loses nothing; fsync
    # (power loss) cost 130 ms a request on this disk at concurrency 16.
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()


def _read_keys(path: Path, repair: bool) -> set[str]:
    """Keys of complete lines. A torn last line (killed mid-write) is cut off so appends stay valid."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as handle:
                handle.truncate(cut)
        data = data[:cut]
    keys = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError("existing output has a line ftl did not write", f"{path}:{number}",
                              "distil into a new --output file") from None
    return keys


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
        "already_done": result.already_done, "rejected": dict(result.rejected),
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
