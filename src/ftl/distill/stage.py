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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ftl import manifest
from ftl.distill.budget import Budget, TokenCounter
from ftl.distill.config import DistillConfig
from ftl.distill.seeds import Seed, drop_duplicates, load_seeds
from ftl.distill.teachers import Completion, TeacherError, create
from ftl.distill.teachers.base import TRANSIENT_KINDS
from ftl.distill.teachers.openai_compat import check_key_variable
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
    requests: int = 0  # HTTP requests sent (first asks and retries)
    rate_limited: int = 0  # of them, answered 429
    ask_seconds: float = 0.0  # from the first request to the last answer
    deployments: dict = field(default_factory=dict)  # name → requests, tokens, cost, waits, settled rate
    warnings: list[str] = field(default_factory=list)

    @property
    def settled(self) -> int:
        """Seeds of this run with an outcome: answered, rejected, or left pending for a re-run."""
        return self.answered + sum(self.rejected.values()) + sum(self.pending.values())

    @property
    def rate_limited_share(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def effective_rpm(self) -> float:
        return self.requests * 60 / self.ask_seconds if self.ask_seconds else 0.0

    @property
    def effective_tpm(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) * 60 / self.ask_seconds if self.ask_seconds else 0.0


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


def distill(config: DistillConfig, on_progress=None, on_warning=None) -> DistillResult:
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

    def warn(message: str) -> None:
        result.warnings.append(message)
        if on_warning:
            on_warning(message)

    deployments = _open_deployments(config, warn)
    asking = time.perf_counter()
    try:
        asyncio.run(_run_all(deployments, pending, config, result, on_progress, warn))
    finally:  # a stopped run still records what each deployment did
        result.ask_seconds = time.perf_counter() - asking
        result.deployments = {d.name: d.record() for d in deployments}
    if config.val_fraction:
        result.split = _write_split(output, config.val_fraction)
    result.seconds = time.perf_counter() - started
    costs = [d["estimated_cost"] for d in result.deployments.values() if d["estimated_cost"] is not None]
    result.cost = sum(costs) if costs else None
    _write_manifest(config, result, deployments, len(seeds))
    return result


@dataclass
class _Job:
    key: str
    seed: Seed
    messages: list[dict]
    attempts: int = 0
    not_before: float = 0.0


@dataclass
class _Deployment:
    """One teacher endpoint of the run, its budget, and what it did (the manifest's per-deployment record)."""

    name: str
    config: DistillConfig
    teacher: object
    budget: Budget
    tokens: TokenCounter = field(default_factory=TokenCounter)
    requests: int = 0
    rate_limited: int = 0
    answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wait_budget_s: float = 0.0
    wait_teacher_s: float = 0.0
    set_aside: str | None = None
    failures: int = 0  # transient failures in a row; SET_ASIDE_AFTER of them (with others left) sets it aside
    typical: int = 256  # the tokens the budget reserves before a seed is taken (then corrected to the seed's)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self) -> dict:
        cost = None
        if self.config.price_input is not None or self.config.price_output is not None:
            cost = round((self.prompt_tokens * (self.config.price_input or 0)
                          + self.completion_tokens * (self.config.price_output or 0)) / 1e6, 6)
        return {"teacher": self.teacher.name, "model": self.teacher.model, "requests": self.requests,
                "rate_limited": self.rate_limited, "answered": self.answered, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "estimated_cost": cost,
                "wait_budget_s": round(self.wait_budget_s, 2), "wait_teacher_s": round(self.wait_teacher_s, 2),
                "set_aside": self.set_aside, "settled": self.budget.settled()}


SET_ASIDE_AFTER = 3


def _open_deployments(config: DistillConfig, warn) -> list[_Deployment]:
    """The run's deployments: --deployments, else the one teacher the flags name. Checked before any request."""
    specs = config.deployments or [None]
    subs = []
    for index, spec in enumerate(specs, 1):
        if spec is None:
            sub = config
        else:
            sub = config.model_copy(update={
                # an Azure endpoint means the azure teacher; a base URL the flag's teacher (openai if that is local)
                "teacher": spec.teacher or ("azure" if spec.endpoint else
                                            config.teacher if config.teacher != "local" else "openai"),
                "base_url": spec.base_url, "endpoint": spec.endpoint, "model": spec.model,
                "api_key_env": spec.api_key_env or config.api_key_env, "api_version": spec.api_version or config.api_version,
                "rpm": spec.rpm or config.rpm, "tpm": spec.tpm or config.tpm,
                "concurrency": spec.concurrency or config.concurrency,
                "price_input": spec.price_input if spec.price_input is not None else config.price_input,
                "price_output": spec.price_output if spec.price_output is not None else config.price_output,
                "deployments": None})
            check_key_variable(spec.api_key_env, f"--deployments entry {index} api_key_env")
            if spec.api_key_env and not os.environ.get(spec.api_key_env):
                raise ConfigError(f"deployment {index} ({_name(spec.name, sub)}): its key variable ${spec.api_key_env} "
                                  "is not set", "--deployments", f"export {spec.api_key_env}=<key>, or fix api_key_env")
        if sub.tpm and sub.max_tokens * sub.n > sub.tpm * sub.quota_window / 60:
            warn(f"--max-tokens {sub.max_tokens} × --n {sub.n} is more than one {sub.quota_window:g}-second window of "
                 f"--tpm {sub.tpm} allows ({sub.tpm * sub.quota_window / 60:.0f} tokens): an endpoint that enforces "
                 "over such windows (Azure OpenAI) refuses every request; lower --max-tokens, or pass --quota-window 60 "
                 "if it enforces per minute")
        subs.append((_name(spec.name if spec else None, sub), sub))
    seen: dict[tuple, str] = {}
    for name, sub in subs:
        where = (sub.teacher, (sub.base_url or sub.endpoint or "").rstrip("/").lower(), sub.model)
        if where in seen and sub.teacher != "local":
            warn(f"deployments {seen[where]} and {name} are the same endpoint and model: they share one quota, so "
                 "their budgets together allow more than it does")
        seen.setdefault(where, name)
    names = Counter(name for name, _ in subs)
    return [_Deployment(f"{name}#{i}" if names[name] > 1 else name, sub, create(sub),
                        Budget(sub.rpm, sub.tpm, sub.quota_window, sub.concurrency))
            for i, (name, sub) in enumerate(subs, 1)]


def _name(given: str | None, config: DistillConfig) -> str:
    if given:
        return given
    url = config.base_url or config.endpoint
    parts = urlparse(url) if url else None  # host and port only: never a user:token@ the URL may carry
    host = f"{parts.hostname}{f':{parts.port}' if parts.port else ''}" if parts and parts.hostname else None
    model = Path(config.model).name if config.teacher == "local" and config.model else config.model
    return f"{model}@{host}" if host and model else (model or config.teacher)


async def _run_all(deployments: list[_Deployment], pending, config, result, on_progress, warn) -> None:
    """Workers per deployment take seeds from one queue; a seed goes to whichever deployment's
    budget lets it through first. A retry goes back on the queue, so a healthy deployment answers
    what a failing one could not. Each deployment's first request goes alone: a wrong endpoint or key
    fails fast, before any fan-out."""
    queue: asyncio.Queue = asyncio.Queue()
    for key, seed in pending:
        queue.put_nowait(_Job(key, seed, build_messages(seed, config)))
    unsettled = len(pending)
    fatal: list[tuple[_Deployment, TeacherError]] = []
    workers: list[asyncio.Task] = []
    stop = asyncio.Event()
    crashed: list[Exception] = []
    asking: set[asyncio.Task] = set()  # workers with a request in flight
    with open(result.output, "a", encoding="utf-8") as out, open(result.rejects, "a", encoding="utf-8") as rej:
        def settle(job: _Job, outcome, dep: _Deployment) -> None:
            nonlocal unsettled
            answered = result.answered
            _record(outcome, job.key, job.seed, dep.teacher, config, result, out, rej, dep.name)
            dep.answered += result.answered - answered
            unsettled -= 1
            if on_progress:
                on_progress(result)
            if unsettled == 0:
                stop.set()

        def set_aside(dep: _Deployment, why: str) -> None:
            if dep.set_aside is None:
                dep.set_aside = why
                dep.ready.set()
                if any(d.set_aside is None for d in deployments):
                    warn(f"deployment {dep.name} set aside: {why}; the others go on")
                else:
                    stop.set()

        async def worker(dep: _Deployment, first: bool) -> None:
            try:
                await work(dep, first)
            except Exception as exc:  # an error that is not the teacher's answer (e.g. no Entra ID sign-in) stops all
                crashed.append(exc)
                stop.set()

        async def work(dep: _Deployment, first: bool) -> None:
            if not first:
                await dep.ready.wait()
            reserve = config.max_tokens * config.n  # providers charge max_tokens up front
            while dep.set_aside is None and not stop.is_set():
                # The budget first, then a seed: a deployment held by its quota keeps no seeds from the others.
                waited = time.perf_counter()
                ticket = await dep.budget.acquire(dep.typical)
                dep.wait_budget_s += time.perf_counter() - waited
                job = await queue.get()
                if job is not None and job.not_before > time.monotonic():  # a retry's back-off
                    await asyncio.sleep(job.not_before - time.monotonic())
                if job is None or dep.set_aside is not None or stop.is_set():
                    dep.budget.cancel(ticket)
                    if job is not None:
                        queue.put_nowait(job)
                    return
                dep.typical = dep.tokens.estimate(job.messages) + reserve
                dep.budget.restamp(ticket, dep.typical)
                asking.add(asyncio.current_task())
                try:
                    outcome = await _ask(dep, ticket, job.messages, config, result)
                    first = handle(dep, job, outcome, first)
                finally:
                    asking.discard(asyncio.current_task())
                if first is None:
                    return

        def handle(dep: _Deployment, job: _Job, outcome, first: bool) -> bool | None:
            """Record, retry or move the seed; None when this deployment is done for (set aside)."""
            others = any(d.set_aside is None and d is not dep for d in deployments)
            if isinstance(outcome, TeacherError) and first and outcome.kind == "connection" \
                    and job.attempts < config.max_retries:  # the first seed: retried before the endpoint is judged
                job.attempts += 1
                again(job, outcome, _delay(outcome, job.attempts - 1, config.backoff))
                return True
            if isinstance(outcome, TeacherError) and (outcome.fatal or (first and outcome.kind == "connection")):
                if not others:
                    fatal.append((dep, outcome))
                set_aside(dep, outcome.message)
                again(job, outcome, 0.0, retry=False)
                return None
            dep.ready.set()
            if isinstance(outcome, TeacherError) and outcome.transient:
                if outcome.kind != "rate_limit":
                    dep.failures += 1
                    if dep.failures >= SET_ASIDE_AFTER and others:  # the deployment's fault, not the seed's
                        set_aside(dep, f"{dep.failures} failures in a row ({outcome.message})")
                        again(job, outcome, 0.0, retry=False)
                        return None
                job.attempts += 1
                if job.attempts > config.max_retries:
                    settle(job, outcome, dep)
                else:  # a 429 waits its Retry-After, unless another deployment can take it while this one is held
                    held = dep.budget.hold_until > time.monotonic()
                    again(job, outcome, 0.0 if outcome.kind == "rate_limit" and others and held else
                          _delay(outcome, job.attempts - 1, config.backoff))
                return False
            dep.failures = 0
            settle(job, outcome, dep)
            return False

        def again(job: _Job, error: TeacherError, after: float, retry: bool = True) -> None:
            """Back on the queue for any deployment to ask. A retry is counted, not a move off a set-aside one."""
            if retry:
                result.retries[error.kind] += 1
            job.not_before = time.monotonic() + after
            queue.put_nowait(job)

        try:
            for dep in deployments:
                workers += [asyncio.create_task(worker(dep, i == 0)) for i in range(dep.config.concurrency)]
            if pending:
                await stop.wait()
            if fatal and not crashed:  # requests already sent are paid for: let them finish and be written
                for task in workers:
                    if task not in asking:
                        task.cancel()
                await asyncio.wait(workers, timeout=config.timeout * 1.5 + 1)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for dep in deployments:
                await dep.teacher.aclose()
    if crashed:
        raise crashed[0]
    if fatal:
        dep, error = fatal[0]
        raise TeacherFailed(f"teacher {dep.name} failed: {error.message}", dep.config.base_url or dep.config.endpoint
                            or dep.teacher.model, "check the endpoint, model name and key (the key is never printed); "
                            "finished answers are kept")


def _record(outcome, key: str, seed: Seed, teacher, config, result: DistillResult, out, rej, deployment: str) -> None:
    """Answered → output; permanent failure → rejects; transient → counted only, so a re-run asks again."""
    if isinstance(outcome, TeacherError):
        if outcome.transient:
            result.pending[outcome.kind] += 1
            return
        reason, detail = outcome.reason, outcome.message
    else:
        row, reason = _accept(outcome, seed, key, teacher, config)
        if reason is None:
            row["deployment"] = deployment
            _append(out, row)
            result.answered += 1
            return
        detail = outcome.choices[0].text[:200] if outcome.choices else ""
    _append(rej, {"key": key, "Question": seed.question, "where": seed.where, "reason": reason, "detail": detail})
    result.rejected[reason] += 1


async def _ask(dep: _Deployment, ticket, messages: list[dict], config: DistillConfig,
               result: DistillResult) -> Completion | TeacherError:
    """One request the deployment's budget let through; the time waiting for the teacher is timed."""
    reserve = config.max_tokens * config.n
    started = time.perf_counter()
    dep.requests += 1
    result.requests += 1
    outcome: Completion | TeacherError
    try:
        outcome = await asyncio.wait_for(
            dep.teacher.complete(messages, max_tokens=config.max_tokens, temperature=config.temperature, n=config.n),
            timeout=config.timeout * 1.5)  # a guard above the client's own timeout, for teachers without one
    except asyncio.TimeoutError:
        outcome = TeacherError("timeout", f"no answer in {config.timeout * 1.5:.0f}s")
    except TeacherError as exc:
        outcome = exc
    finally:
        dep.wait_teacher_s += time.perf_counter() - started
    if isinstance(outcome, TeacherError):
        limited = outcome.kind == "rate_limit"
        dep.rate_limited += limited
        result.rate_limited += limited
        dep.budget.done(ticket, limits=outcome.limits, rate_limited=limited, retry_after=outcome.retry_after)
        return outcome
    outcome.latency_s = time.perf_counter() - started
    dep.tokens.learn(messages, outcome.prompt_tokens)
    dep.budget.done(ticket, limits=outcome.limits, charged=outcome.prompt_tokens + reserve if outcome.prompt_tokens
                    else None)
    for holder in (result, dep):
        holder.prompt_tokens += outcome.prompt_tokens
        holder.completion_tokens += outcome.completion_tokens
    return outcome


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


def _write_manifest(config: DistillConfig, result: DistillResult, deployments, seeds: int) -> None:
    path = manifest_path(result.output)
    total_rows = sum(1 for line in open(result.output, encoding="utf-8") if line.strip())
    record = manifest.new("distill", inputs={"seeds": config.seeds}, fingerprint="",
                          params=config.model_dump(mode="json"))
    teacher = [{"name": d.teacher.name, "model": d.teacher.model, "deployment": d.name} for d in deployments]
    record.update(status="complete", teacher=teacher[0] if len(teacher) == 1 else teacher, metrics={
        "seeds_after_dedup": seeds, "rows_in_output": total_rows, "answered_this_run": result.answered,
        "already_done": result.already_done, "rejected": dict(result.rejected), "pending": dict(result.pending),
        "duplicates_exact": result.duplicates_exact, "duplicates_near": result.duplicates_near,
        "retries": dict(result.retries), "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens, "estimated_cost": result.cost, "split": result.split,
        "requests": result.requests, "rate_limited": result.rate_limited,
        "rate_limited_share": round(result.rate_limited_share, 4), "effective_rpm": round(result.effective_rpm, 1),
        "effective_tpm": round(result.effective_tpm, 1), "deployments": result.deployments,
        "warnings": result.warnings},
        timings={"seconds": round(result.seconds, 2), "asking_seconds": round(result.ask_seconds, 2)})
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
