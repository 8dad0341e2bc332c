"""``ftl serve``: an OpenAI-compatible server over an exported model (see ftl.serve)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ftl.progress import console


def _adapter(ctx, param, values) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r} is not NAME=PATH (e.g. legal=runs/legal/export/adapter.onnx_adapter)")
        found[name] = Path(path)
    return found


@click.command("serve")
@click.argument("export", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, callback=_adapter, metavar="NAME=PATH",
              help="A separately exported LoRA (.onnx_adapter) on this base; a request's model field picks it. "
                   "Repeat for several.")
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 serves every interface (set a key).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="FTL_API_KEY", help="Require Authorization: Bearer KEY (default: $FTL_API_KEY).")
@click.option("--model-name", help="The base model's name in requests and /v1/models (default: the folder name).")
@click.option("--max-concurrency", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Requests generating at once (stepped token by token, round-robin).")
@click.option("--max-queue", type=click.IntRange(0, 10000), default=16, show_default=True,
              help="Requests waiting beyond those; more get 429 with Retry-After.")
@click.option("--max-tokens-cap", type=click.IntRange(1), default=1024, show_default=True,
              help="The largest max_tokens a request may ask for.")
@click.option("--default-max-tokens", type=click.IntRange(1),
              help="max_tokens for a request that sets none (default: 256, or the cap if lower).")
@click.option("--max-body-kb", type=click.IntRange(1), default=1024, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds a request may take, queue included.")
@click.option("--threads", type=int, help="onnxruntime-genai intra-op threads (default: this machine's cores).")
def serve(export: Path, adapters: dict[str, Path], host: str, port: int, api_key: str | None, model_name: str | None,
          max_concurrency: int, max_queue: int, max_tokens_cap: int, default_max_tokens: int | None, max_body_kb: int,
          timeout: float, threads: int | None) -> None:
    """Serve EXPORT (an ftl export-onnx folder) through the OpenAI API: /v1/chat/completions (streamed or
    not), /v1/completions, /v1/models, /health and /metrics, on onnxruntime-genai."""
    import uvicorn

    from ftl.errors import ConfigError
    from ftl.serve import build_server

    if default_max_tokens is None:
        default_max_tokens = min(256, max_tokens_cap)
    if default_max_tokens > max_tokens_cap:
        raise ConfigError(f"--default-max-tokens {default_max_tokens} is over --max-tokens-cap {max_tokens_cap}",
                          "--default-max-tokens", "lower it or raise the cap")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]warning:[/] serving on {host} without an API key: anyone who can reach this "
                      "machine can use the model (set --api-key or FTL_API_KEY)", highlight=False)
    app, scheduler = build_server(export, adapters=adapters, threads=threads, name=model_name, api_key=api_key,
                                  max_concurrency=max_concurrency, max_queue=max_queue, max_tokens_cap=max_tokens_cap,
                                  default_max_tokens=default_max_tokens, max_body_bytes=max_body_kb * 1024,
                                  timeout_s=timeout)
    engine = app.state.engine
    console.print(f"[green]✓[/] serving {', '.join(engine.names)} from {export} on http://{host}:{port}/v1 "
                  f"({engine.chat.threads} threads, {max_concurrency} at once, queue {max_queue}"
                  f"{', key required' if api_key else ''}); Ctrl-C stops it", highlight=False, soft_wrap=True)
    if not scheduler.batching:
        console.print("[yellow]note:[/] onnxruntime-genai cannot batch prompts of different lengths for this model: "
                      "each request gets its own generator", highlight=False, soft_wrap=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning" if not os.environ.get("FTL_DEBUG") else "info",
                    access_log=False, timeout_graceful_shutdown=5)
    finally:
        scheduler.close()
