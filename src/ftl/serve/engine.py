"""The serving engine: one onnxruntime-genai model, its LoRA adapters, and a scheduler thread.

**Scheduling.** onnxruntime-genai 0.18's Python API has no continuous batching: a ``Generator``
takes a fixed batch whose prompts are all appended at once, so requests that arrive at different
times cannot join it. ftl therefore runs one scheduler thread that keeps up to ``max_active``
generators alive on the shared model and steps them round-robin, one token each per turn
(iteration-level scheduling, as in Orca/vLLM, without the batched kernel). Each new request is
prefilled when it is admitted, so a long prompt delays the others once, by its prefill. Waiting
requests sit in a bounded queue; a full queue is refused at once (HTTP 429) rather than letting
latency grow without bound. ``bench/serve.py`` measures what this gives against one stream.

**Adapters.** Separately exported ``.onnx_adapter`` files are loaded into one
``onnxruntime_genai.Adapters`` and each generator activates its request's adapter, so several
LoRA fine-tunes share one base in memory.

Every request carries a deadline and a cancel flag (set when its client disconnects): the
scheduler drops it at the next token.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftl.errors import ConfigError, ModelNotFoundError
from ftl.generate.engine import OnnxChatModel


class QueueFull(Exception):
    """The bounded queue is full; the client should retry after a while."""


@dataclass
class Job:
    """One request, as the scheduler runs it. ``emit`` receives ("token", text) for each piece, then
    exactly one ("done", finish_reason) or ("error", message) event."""

    ids: list[int]
    max_tokens: int
    search: dict
    adapter: str | None
    stop: list[str]
    deadline: float
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # filled in by the scheduler
    started: float | None = None
    first_token: float | None = None
    new_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None


class _Active:
    def __init__(self, job: Job, generator, decoder):
        self.job, self.generator, self.decoder = job, generator, decoder
        self.sent = 0  # characters of job.text already emitted (held back while a stop string may be forming)


class Engine:
    """The model and its adapters. ``names`` maps a request's ``model`` field to an adapter (None = base)."""

    def __init__(self, export: Path, adapters: dict[str, Path] | None = None, threads: int | None = None,
                 name: str | None = None):
        import onnxruntime_genai as og

        self.og = og
        self.chat = OnnxChatModel(Path(export), threads=threads)
        self.name = name or Path(export).resolve().name
        self.names: dict[str, str | None] = {self.name: "default" if self.chat.adapters is not None else None}
        self.adapters = self.chat.adapters
        for adapter_name, path in (adapters or {}).items():
            path = Path(path)
            if adapter_name in self.names:
                raise ConfigError(f"adapter name {adapter_name!r} is used twice (or is the base model's name)",
                                  "--adapter", "give each adapter its own NAME=PATH")
            if not path.is_file():
                raise ModelNotFoundError("adapter file not found", str(path),
                                         "give the .onnx_adapter file ftl export-onnx --adapter-file wrote")
            if self.adapters is None:
                self.adapters = og.Adapters(self.chat.model)
            try:
                self.adapters.load(str(path), adapter_name)
            except Exception as exc:  # noqa: BLE001 — og's own message, in one line
                raise ConfigError(f"adapter {adapter_name!r} does not fit this base model: "
                                  f"{str(exc).strip().splitlines()[0][:200]}", str(path),
                                  "serve it on the export it was trained for") from None
            self.names[adapter_name] = adapter_name

    @property
    def context_length(self) -> int:
        return self.chat.context_length


class Scheduler:
    def __init__(self, engine: Engine, *, max_active: int = 4, max_queue: int = 16,
                 on_finish: Callable[[Job], None] | None = None):
        self.engine, self.max_active, self.max_queue = engine, max_active, max_queue
        self.on_finish = on_finish
        self._waiting: deque[Job] = deque()
        self._active: list[_Active] = []
        self._lock = threading.Condition()
        self._admitting = threading.Event()
        self._admitting.set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ftl-serve-scheduler", daemon=True)
        self._thread.start()

    # -- what the HTTP side calls -------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._waiting) >= self.max_queue and (len(self._active) >= self.max_active or
                                                         not self._admitting.is_set()):
                raise QueueFull()
            self._waiting.append(job)
            self._lock.notify()

    def depth(self) -> tuple[int, int]:
        """(waiting, active)"""
        with self._lock:
            return len(self._waiting), len(self._active)

    def pause_admission(self, paused: bool = True) -> None:
        """Hold new requests in the queue (the ones running go on); for draining and for tests."""
        (self._admitting.clear if paused else self._admitting.set)()
        with self._lock:
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # -- the scheduler thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._active and not (self._waiting and self._admitting.is_set()):
                    self._lock.wait(timeout=0.5)
                if self._stop:
                    break
                admit = []
                while self._admitting.is_set() and self._waiting and len(self._active) + len(admit) < self.max_active:
                    admit.append(self._waiting.popleft())
            for job in admit:
                self._start(job)
            for active in list(self._active):
                self._step(active)
        for active in list(self._active):
            self._finish(active, "error", "the server is shutting down")
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit("error", "the server is shutting down")
            self._end(job, "error")

    def _start(self, job: Job) -> None:
        og, engine = self.engine.og, self.engine
        if job.cancelled.is_set():
            return self._end(job, "cancelled")
        try:
            params = og.GeneratorParams(engine.chat.model)
            params.set_search_options(**job.search)
            generator = og.Generator(engine.chat.model, params)
            adapter = engine.names.get(job.adapter) if job.adapter else None
            if adapter is None and engine.chat.adapters is not None:
                adapter = "default"
            if adapter is not None:
                generator.set_active_adapter(engine.adapters, adapter)
            job.started = time.perf_counter()
            generator.append_tokens(job.ids)
        except Exception as exc:  # noqa: BLE001 — reported to this request only; the server goes on
            job.emit("error", f"generation failed: {str(exc).strip().splitlines()[0][:300]}")
            return self._end(job, "error")
        self._active.append(_Active(job, generator, engine.chat.tokenizer.create_stream()))

    def _step(self, active: _Active) -> None:
        job = active.job
        if job.cancelled.is_set():
            return self._finish(active, None, "cancelled")
        if time.perf_counter() > job.deadline:
            return self._finish(active, "error", "timeout")
        try:
            active.generator.generate_next_token()
            token = int(active.generator.get_next_tokens()[0])
        except Exception as exc:  # noqa: BLE001
            return self._finish(active, "error", f"generation failed: {str(exc).strip().splitlines()[0][:300]}")
        job.first_token = job.first_token or time.perf_counter()
        done = active.generator.is_done()
        if done and token in self.engine.chat.stop_ids:
            return self._finish(active, "done", "stop")
        job.new_tokens += 1
        job.text += active.decoder.decode(token)
        hit = _stop_at(job.text, job.stop)
        if hit is not None:
            job.text = job.text[:hit]
            self._flush(active, len(job.text))
            return self._finish(active, "done", "stop")
        # hold back what could be the start of a stop string
        self._flush(active, len(job.text) - _partial_stop(job.text, job.stop))
        if job.new_tokens >= job.max_tokens or done:
            self._flush(active, len(job.text))
            return self._finish(active, "done", "length")

    def _flush(self, active: _Active, upto: int) -> None:
        if upto > active.sent:
            active.job.emit("token", active.job.text[active.sent:upto])
            active.sent = upto

    def _finish(self, active: _Active, kind: str | None, detail: str) -> None:
        self._active.remove(active)
        del active.generator
        if kind is not None:
            active.job.emit(kind, detail)
        self._end(active.job, detail if kind == "done" else ("cancelled" if kind is None else "error"))

    def _end(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        if self.on_finish:
            self.on_finish(job)


def _stop_at(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest
