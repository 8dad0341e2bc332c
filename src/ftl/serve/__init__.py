"""``ftl serve``: an OpenAI-compatible edge server over onnxruntime-genai (see :mod:`ftl.serve.engine`
for the scheduling and :mod:`ftl.serve.app` for the API)."""

from __future__ import annotations

from pathlib import Path


def build_server(export: Path, *, adapters: dict[str, Path] | None = None, threads: int | None = None,
                 name: str | None = None, api_key: str | None = None, max_concurrency: int = 4, max_queue: int = 16,
                 max_tokens_cap: int = 1024, default_max_tokens: int = 256, max_body_bytes: int = 1 << 20,
                 timeout_s: float = 120.0):
    """(the ASGI app, its scheduler); the model and adapters are loaded here, so a bad folder fails
    before anything listens."""
    from ftl.serve.app import Limits, create_app
    from ftl.serve.engine import Engine, Scheduler
    from ftl.serve.metrics import Metrics

    engine, metrics = Engine(Path(export), adapters, threads=threads, name=name), Metrics()
    scheduler = Scheduler(engine, max_active=max_concurrency, max_queue=max_queue, on_batch=metrics.batch.observe)
    limits = Limits(api_key=api_key, max_body_bytes=max_body_bytes, max_tokens_cap=max_tokens_cap,
                    default_max_tokens=min(default_max_tokens, max_tokens_cap), timeout_s=timeout_s)
    return create_app(engine, scheduler, limits, metrics), scheduler
