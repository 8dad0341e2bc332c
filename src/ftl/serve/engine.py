"""The serving engine: one onnxruntime-genai model, its LoRA adapters, and a scheduler thread.

**Scheduling.** onnxruntime-genai 0.18's Python API has no continuous batching: a ``Generator``'s
batch is fixed when its prompts are appended, so a request cannot join one that is running. Its
static batches pay, though (bench/serve.py: 2.2× the tokens/s of one stream at batch 4 here), and
threads do not (``generate_next_token`` holds the GIL: two threads on one model give 1.02×). So
one scheduler thread:

- admits the oldest waiting request together with the others waiting that can share a generator
  (the same adapter and sampling settings, and all within the context once padded), up to the free
  slots (``max_active`` generating rows in all), as one batch, prompts padded on the right (og 0.18
  masks the padding: every row's greedy answer is the one it gets alone, tested);
- steps every running batch round-robin, a token per row per turn, so a batch that starts later
  still streams at once;
- starts a new batch when slots free up. A slot is freed when its *batch* ends, not when its answer
  does: og cannot drop a row, so a finished row goes on being computed, and holding its KV cache,
  until its batch ends; counting it keeps the rows actually computed within ``max_active`` (freeing
  it at once let up to ``max_active``² rows compute, each holding a KV cache). ``row_steps`` and
  ``peak_rows`` count what was computed. (og 0.18 also has a continuous-batching ``og.Engine``,
  which drops a finished request, but it has no adapter API: multi-LoRA needs the Generator.)
- runs one request per generator for a model og cannot batch (``OnnxChatModel.can_batch``: prompts
  of different lengths break og's attention for Gemma 3), and says so once in the log.

Waiting requests sit in a bounded queue; a full queue is refused at once (HTTP 429) rather than
letting latency grow without bound.

**Adapters.** Separately exported ``.onnx_adapter`` files are loaded into one
``onnxruntime_genai.Adapters`` and each batch activates its requests' adapter, so several LoRA
fine-tunes share one base in memory.

**Prompts.** Each name served renders prompts in its own export's format (an adapter's from the
manifest of the export folder its ``.onnx_adapter`` sits in), and tokenising a long prompt runs
in a child process: og's ``encode`` holds the GIL, so in a thread it would still stall every
stream (a 1 MB prompt: about 0.3 s in which neither the event loop nor this scheduler runs).

Every request carries a deadline and a cancel flag (set when its client disconnects): the
scheduler drops its row at the next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftl import manifest
from ftl.chat import Message, PromptFormat, find_stop, partial_stop, with_system
from ftl.errors import ConfigError, ModelNotFoundError
from ftl.generate.engine import OnnxChatModel

log = logging.getLogger(__name__)


SHUTDOWN = "the server is shutting down"


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

    @property
    def key(self) -> tuple:
        """Requests with the same key can share one batched generator."""
        return self.adapter, tuple(sorted(self.search.items()))


class _Row:
    def __init__(self, job: Job, decoder):
        self.job, self.decoder = job, decoder
        self.sent = 0  # characters of job.text already emitted (held back while a stop string may be forming)
        self.live = True


class _Group:
    """Requests admitted together, generated as one onnxruntime-genai batch (prompts padded on the right,
    which og 0.18 masks: each row's greedy answer is the one it gets alone)."""

    def __init__(self, generator, rows: list[_Row]):
        self.generator, self.rows = generator, rows


class Engine:
    """The model and its adapters. ``names`` maps a request's ``model`` field to an adapter (None = base),
    ``formats`` to the prompt format that name was fine-tuned with."""

    def __init__(self, export: Path, adapters: dict[str, Path] | None = None, threads: int | None = None,
                 name: str | None = None):
        import onnxruntime_genai as og

        self.og = og
        self.chat = OnnxChatModel(Path(export), threads=threads)
        self.name = name or Path(export).resolve().name
        self.names: dict[str, str | None] = {self.name: "default" if self.chat.adapters is not None else None}
        self.formats: dict[str, PromptFormat] = {self.name: self.chat.format}
        self.adapters = self.chat.adapters
        self.pad_id = self.chat.pad_id  # what a shorter prompt is padded with in a batch
        self.encoder = Encoder(self.chat)
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
            self.formats[adapter_name] = adapter_format(path, self.chat.format)

    @property
    def context_length(self) -> int:
        return self.chat.context_length

    def chat_ids(self, name: str, messages: list[Message]) -> list[int]:
        """A conversation's prompt ids for the model or adapter ``name``, in the format it was fine-tuned
        with (its system prompt when the client sends none, as ftl generate, chat and score.py do). Slow
        for a long prompt: call it off the event loop."""
        fmt = self.formats[name]
        return self.encoder.encode(fmt.render_prompt(with_system(messages, fmt.system_prompt)))

    def close(self) -> None:
        self.encoder.close()


def adapter_format(path: Path, base: PromptFormat) -> PromptFormat:
    """The prompt format an ``.onnx_adapter`` was fine-tuned with: its export folder's manifest records it.
    A file without one (copied out of its folder, or not written by ftl) is prompted as the base."""
    record = manifest.read(Path(path).parent)
    recorded = record.get("prompt_format") if manifest.is_ftl(record) else None
    return PromptFormat(**recorded) if recorded else base


# -- tokenising -------------------------------------------------------------------------------------------------

LONG_PROMPT_CHARS = 32_768  # below this og's encode takes about 10 ms: not worth a round trip to the child
_child_tokenizer = None


def _load_tokenizer(folder: str) -> None:
    import onnxruntime_genai as og

    global _child_tokenizer
    _child_tokenizer = og.Tokenizer(folder)  # the folder's tokenizer files only: no weights in the child


def _encode_in_child(text: str) -> list[int]:
    return _child_tokenizer.encode(text).tolist()


class Encoder:
    """Prompt text to ids with the model's own og tokenizer. og's ``encode`` holds the GIL for the whole
    call, so a thread would not keep the streams going: a long prompt goes to one child process
    (started at the first one) with its own ``og.Tokenizer`` on the same folder."""

    def __init__(self, chat: OnnxChatModel):
        self.chat, self._pool, self._lock = chat, None, threading.Lock()
        self.in_child = 0  # prompts tokenised in the child (for /metrics and the tests)

    def encode(self, text: str) -> list[int]:
        if len(text) < LONG_PROMPT_CHARS:
            return self.chat.encode(text)
        from concurrent.futures.process import BrokenProcessPool

        pool = self._child()
        self.in_child += 1
        try:
            return pool.submit(_encode_in_child, text).result()
        except BrokenProcessPool:  # the child died (e.g. killed for memory): the next long prompt starts another
            with self._lock:
                self._pool = None
            raise

    def _child(self) -> ProcessPoolExecutor:
        import multiprocessing

        with self._lock:
            if self._pool is None:
                # spawn, not fork: this process runs the scheduler's and og's threads
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_load_tokenizer, initargs=(str(self.chat.folder),))
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class Scheduler:
    def __init__(self, engine: Engine, *, max_active: int = 4, max_queue: int = 16,
                 on_finish: Callable[[Job], None] | None = None, on_batch: Callable[[int], None] | None = None):
        self.engine, self.max_active, self.max_queue = engine, max_active, max_queue
        self.on_finish, self.on_batch = on_finish, on_batch
        self._waiting: deque[Job] = deque()
        self._groups: list[_Group] = []
        self._lock = threading.Condition()
        self._admitting = threading.Event()
        self._admitting.set()
        self._stop = False
        self.row_steps = 0  # rows computed, summed over every step (a finished row still counts)
        self.peak_rows = 0  # the most rows computed at once
        self._said_unbatched = False
        self._thread = threading.Thread(target=self._loop, name="ftl-serve-scheduler", daemon=True)
        self._thread.start()

    # -- what the HTTP side calls -------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            # max_queue requests may wait beyond those the free slots will take at the next turn
            free = max(0, self.max_active - self._rows()) if self._admitting.is_set() else 0
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull()
            self._waiting.append(job)
            self._lock.notify()

    def depth(self) -> tuple[int, int]:
        """(waiting, generating)"""
        with self._lock:
            return len(self._waiting), sum(row.live for group in self._groups for row in group.rows)

    def computed(self) -> int:
        """Rows in the running generators, finished ones included: what each step computes."""
        with self._lock:
            return self._rows()

    @property
    def batching(self) -> bool:
        """Whether requests that arrive together share a generator (False: og cannot batch this model)."""
        return bool(getattr(self.engine.chat, "can_batch", True))

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
        self.engine.close()

    # -- the scheduler thread -----------------------------------------------------------------------------------

    def _rows(self) -> int:
        """Slots taken: every row of a running batch, finished or not, as og computes them all until it ends."""
        return sum(len(group.rows) for group in self._groups)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._groups and not (self._waiting and self._admitting.is_set()):
                    self._lock.wait(timeout=0.5)
                    self._sweep()
                if self._stop:
                    break
                self._sweep()
                batch = self._take() if self._admitting.is_set() else []
            if batch:
                self._guarded(lambda: self._start(batch), [_Row(job, None) for job in batch])
            for group in list(self._groups):
                self._guarded(lambda: self._step(group), group.rows, group)
        for group in list(self._groups):
            for row in group.rows:
                if row.live:
                    self._finish(row, "error", SHUTDOWN)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit("error", SHUTDOWN)
            self._end(job, "error")

    def _guarded(self, work: Callable[[], None], rows: list[_Row], group: _Group | None = None) -> None:
        """One batch's work; whatever it raises fails that batch's requests, never the scheduler thread
        (which every later request waits on)."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001
            message = f"generation failed: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}"
            for row in rows:
                if row.live and row.job.finish_reason is None:
                    self._finish(row, "error", message)
            with self._lock:
                if group is not None and group in self._groups:
                    self._groups.remove(group)

    def _sweep(self) -> None:
        """Waiting requests whose client left go; those past their deadline get their timeout now."""
        now = time.perf_counter()
        for job in [j for j in self._waiting if j.cancelled.is_set() or now > j.deadline]:
            self._waiting.remove(job)
            if job.cancelled.is_set():
                self._end(job, "cancelled")
            else:
                job.emit("error", "timeout")
                self._end(job, "error")

    def _take(self) -> list[Job]:
        """The next batch: the oldest waiting request and the others that can share its generator (the same
        adapter and sampling settings, and all of them within the context once padded), up to the free slots.
        A slot is held until its batch ends, so requests that arrive together are generated together."""
        free = self.max_active - self._rows()
        if free <= 0 or not self._waiting:
            return []
        if not self.batching:
            free = 1
            if not self._said_unbatched:
                self._said_unbatched = True
                log.warning("onnxruntime-genai cannot batch prompts of different lengths for this model: "
                            "each request gets its own generator (requests still run side by side)")
        first, context = self._waiting[0], self.engine.context_length
        batch = [first]
        longest, most = len(first.ids), first.max_tokens
        for job in list(self._waiting)[1:]:
            if len(batch) >= free:
                break
            if job.key == first.key and max(longest, len(job.ids)) + max(most, job.max_tokens) <= context:
                batch.append(job)
                longest, most = max(longest, len(job.ids)), max(most, job.max_tokens)
        for job in batch:
            self._waiting.remove(job)
        return batch

    def _start(self, batch: list[Job]) -> None:
        import numpy as np

        og, engine = self.engine.og, self.engine
        live = []
        for job in batch:
            if job.cancelled.is_set():
                self._end(job, "cancelled")
            else:
                live.append(job)
        if not live:
            return
        longest = max(len(job.ids) for job in live)
        try:
            params = og.GeneratorParams(engine.chat.model)
            max_length = longest + max(job.max_tokens for job in live)
            params.set_search_options(**live[0].search, batch_size=len(live),
                                      max_length=min(engine.context_length, max(max_length, engine.chat.min_length)))
            generator = og.Generator(engine.chat.model, params)
            adapter = engine.names.get(live[0].adapter) if live[0].adapter else None
            if adapter is None and engine.chat.adapters is not None:
                adapter = "default"
            if adapter is not None:
                generator.set_active_adapter(engine.adapters, adapter)
            now = time.perf_counter()
            for job in live:
                job.started = now
            if len(live) == 1:
                generator.append_tokens(live[0].ids)
            else:
                generator.append_tokens(np.array([job.ids + [engine.pad_id] * (longest - len(job.ids)) for job in live],
                                                 dtype=np.int32))
        except Exception as exc:  # noqa: BLE001 — reported to these requests only; the server goes on
            for job in live:
                job.emit("error", f"generation failed: {str(exc).strip().splitlines()[0][:300]}")
                self._end(job, "error")
            return
        with self._lock:  # computed() reads the groups from the HTTP side
            self._groups.append(_Group(generator, [_Row(job, engine.chat.tokenizer.create_stream()) for job in live]))
            self.peak_rows = max(self.peak_rows, self._rows())
        if self.on_batch:
            try:
                self.on_batch(len(live))
            except Exception:  # noqa: BLE001 — a metrics hook never fails a batch
                pass

    def _step(self, group: _Group) -> None:
        now = time.perf_counter()
        for row in group.rows:
            if row.live and row.job.cancelled.is_set():
                self._finish(row, None, "cancelled")
            elif row.live and now > row.job.deadline:
                self._finish(row, "error", "timeout")
        if any(row.live for row in group.rows) and not group.generator.is_done():
            try:
                group.generator.generate_next_token()
                self.row_steps += len(group.rows)
                tokens = group.generator.get_next_tokens()
            except Exception as exc:  # noqa: BLE001
                for row in group.rows:
                    if row.live:
                        self._finish(row, "error", f"generation failed: {str(exc).strip().splitlines()[0][:300]}")
            else:
                done = group.generator.is_done()
                for row, token in zip(group.rows, tokens):
                    if row.live:
                        self._advance(row, int(token), done)
        if not any(row.live for row in group.rows) or group.generator.is_done():
            for row in group.rows:
                if row.live:
                    self._flush(row, len(row.job.text))
                    self._finish(row, "done", "length")
            with self._lock:
                self._groups.remove(group)
            del group.generator

    def _advance(self, row: _Row, token: int, done: bool) -> None:
        job = row.job
        job.first_token = job.first_token or time.perf_counter()
        if token in self.engine.chat.stop_ids:
            self._flush(row, len(job.text))  # what was held back for a stop string that never came
            return self._finish(row, "done", "stop")
        job.new_tokens += 1
        job.text += row.decoder.decode(token)
        hit = find_stop(job.text, job.stop)
        if hit is not None:
            job.text = job.text[:hit]
            self._flush(row, len(job.text))
            return self._finish(row, "done", "stop")
        self._flush(row, len(job.text) - partial_stop(job.text, job.stop))  # hold back a forming stop string
        if job.new_tokens >= job.max_tokens:
            self._flush(row, len(job.text))
            self._finish(row, "done", "length")

    def _flush(self, row: _Row, upto: int) -> None:
        if upto > row.sent:
            row.job.emit("token", row.job.text[row.sent:upto])
            row.sent = upto

    def _finish(self, row: _Row, kind: str | None, detail: str) -> None:
        row.live = False
        if kind is not None:
            row.job.emit(kind, detail)
        self._end(row.job, detail if kind == "done" else ("cancelled" if kind is None else "error"))

    def _end(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        if self.on_finish:
            self.on_finish(job)

