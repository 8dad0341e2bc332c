"""The OpenAI-compatible HTTP API over :mod:`ftl.serve.engine`, on FastAPI/Starlette (uvicorn).

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events, or not), ``POST
/v1/completions``, ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text).
Every error is in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}`` (Starlette's own
404 and 405 and an unhandled exception's 500 included, so an OpenAI client reads them all), and the
server stays up. Rendering and tokenising a prompt run off the event loop, so a long prompt never
stalls the streams already open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from jinja2 import TemplateError

from ftl.serve.engine import SHUTDOWN, Engine, Job, QueueFull, Scheduler

log = logging.getLogger(__name__)


@dataclass
class Limits:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 1024
    default_max_tokens: int = 256
    timeout_s: float = 120.0
    retry_after_s: int = 2


# -- requests (OpenAI's fields; unknown ones are ignored, as OpenAI's own clients add new ones) -------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str


# -- errors ---------------------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Guard:
    """The API key and the body-size limit, checked before anything is read, and a bug's 500 (a plain
    ASGI middleware: Starlette's BaseHTTPMiddleware would sit in every streamed chunk's path)."""

    def __init__(self, app, limits: Limits, metrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], {k.lower(): v for k, v in scope["headers"]}
        refusal = None
        if self.limits.api_key and path != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.limits.api_key}".encode()):
                refusal = _error(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                 code="invalid_api_key")
        length = headers.get(b"content-length")
        if refusal is None and scope["method"] == "POST" and length is None:
            # The limit is checked before the body is read; a chunked upload has no length to check.
            refusal = _error(411, "send the body with a Content-Length header", code="length_required")
        elif refusal is None and length and length.isdigit() and int(length) > self.limits.max_body_bytes:
            refusal = _error(413, f"the body is {int(length)} bytes, over the limit of {self.limits.max_body_bytes}",
                             code="request_too_large")
        if refusal is None:
            return await self._run(scope, receive, send)
        self.metrics.requests.labels(_route(path), str(refusal.status_code)).inc()
        await refusal(scope, receive, send)

    async def _run(self, scope, receive, send):
        """An exception nothing else handled becomes a 500 in OpenAI's shape, without its text (the log has
        the traceback). Caught here rather than re-raised to uvicorn, which would close the connection."""
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if started:  # a stream already under way: nothing more can be said to this client
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            self.metrics.requests.labels(_route(scope["path"]), "500").inc()
            await _error(500, "the server had an error while processing this request", "server_error")(
                scope, receive, send)


ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
MAX_STOPS, MAX_STOP_CHARS = 4, 200  # OpenAI's own limit on stop sequences; a bound on what each token is checked against


def _route(path: str) -> str:
    """A metrics label: any other path would make a new series per request."""
    return path if path in ROUTES else "other"


# -- the app --------------------------------------------------------------------------------------------------------

def create_app(engine: Engine, scheduler: Scheduler, limits: Limits, metrics) -> FastAPI:
    app = FastAPI(title="ftl serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, limits=limits, metrics=metrics)
    app.state.engine, app.state.scheduler, app.state.limits, app.state.metrics = engine, scheduler, limits, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.requests.labels(_route(request.url.path), str(exc.status)).inc()
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        """Starlette's own: a path that is not served (404) or a method it does not take (405)."""
        metrics.requests.labels(_route(request.url.path), str(exc.status_code)).inc()
        message = (f"{request.method} {request.url.path} is not served here" if exc.status_code == 404 else
                   f"{request.url.path} does not take {request.method}" if exc.status_code == 405 else exc.detail)
        return _error(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                      headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels(_route(request.url.path), "400").inc()
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where or 'body'}: {first['msg']}", param=where or None)

    @app.get("/health")
    async def health():
        waiting, active = scheduler.depth()
        return {"status": "ok", "model": engine.name, "models": list(engine.names), "waiting": waiting,
                "active": active, "computed_rows": scheduler.computed(), "batching": scheduler.batching}

    @app.get("/metrics")
    async def prometheus():
        metrics.scrape(scheduler)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "ftl"}
                                           for name in engine.names]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _served(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if messages[-1]["role"] == "assistant":
            raise ApiError(400, "the last message is the assistant's: end with a user message", param="messages")
        try:  # in a worker thread: Jinja over a long conversation would stall every open stream
            ids = await to_thread.run_sync(engine.chat_ids, body.model, messages)
        except TemplateError as exc:  # e.g. a template that wants user and assistant turns to alternate
            raise ApiError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        # a text template's next turn ends the answer too, in the format of the model or adapter asked for
        return await _complete(request, body, ids, max_tokens, "/v1/chat/completions", chat=True,
                               implicit_stops=engine.formats[body.model].stop_strings)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _served(body.model)
        ids = await to_thread.run_sync(engine.encoder.encode, body.prompt)
        return await _complete(request, body, ids, body.max_tokens, "/v1/completions", chat=False)

    def _served(model: str) -> None:
        if model not in engine.names:
            raise ApiError(404, f"model {model!r} is not served here; models: {', '.join(engine.names)}",
                           param="model", code="model_not_found")

    async def _complete(request: Request, body: _Sampling, ids: list[int], max_tokens: int | None, path: str,
                        chat: bool, implicit_stops: list[str] = ()):
        max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, not {max_tokens}", param="max_tokens")
        if max_tokens > limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's cap of {limits.max_tokens_cap}",
                           param="max_tokens")
        context = engine.context_length
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {len(ids)} and "
                                f"max_tokens asks for {max_tokens} more: shorten the prompt or lower max_tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                           param="stop")
        stops += [stop for stop in implicit_stops if stop not in stops]
        search: dict = {}  # max_length is the batch's (ftl.serve.engine)
        temperature = body.temperature if body.temperature is not None else 0.0
        if temperature > 0:
            search.update(do_sample=True, temperature=temperature, top_p=body.top_p or 1.0)
        else:
            search.update(do_sample=False)
        if body.seed is not None:
            search["random_seed"] = body.seed
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        def emit(kind: str, value) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting any more
                pass

        job = Job(ids=ids, max_tokens=max_tokens, search=search, adapter=body.model, stop=stops,
                  deadline=time.perf_counter() + limits.timeout_s, emit=emit)
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, "the server is busy (its queue is full); retry after a moment", type_="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(limits.retry_after_s)}) from None
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": job.new_tokens,  # noqa: E731
                         "total_tokens": len(ids) + job.new_tokens}
        if body.stream:
            return StreamingResponse(_stream(request, job, events, ident, created, body, chat, usage, path),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = _watch(request, job, events)
        text, finish = [], None
        try:
            while finish is None:
                kind, value = await events.get()
                if kind == "token":
                    text.append(value)
                elif kind == "done":
                    finish = value
                elif kind == "gone":
                    metrics.requests.labels(path, "499").inc()
                    return Response(status_code=499)
                else:
                    return _failed(job, value, path)
        finally:
            watcher.cancel()
        metrics.finished(path, job)
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                  if chat else {"index": 0, "text": content, "finish_reason": finish, "logprobs": None})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": [choice], "usage": usage()}

    def _failed(job: Job, message: str, path: str) -> JSONResponse:
        status = 504 if message == "timeout" else 503 if message == SHUTDOWN else 500
        metrics.requests.labels(path, str(status)).inc()
        text = (f"the request ran past this server's {limits.timeout_s:g} s limit" if message == "timeout"
                else message)
        return _error(status, text, type_="timeout" if status == 504 else "server_error")

    def _watch(request: Request, job: Job, events: asyncio.Queue) -> asyncio.Task:
        """Cancel the job as soon as its client goes away. The body has been read, so the next ASGI
        message is the disconnect (uvicorn drops writes to a closed connection silently, so a stream
        would otherwise run on to its end)."""
        async def wait() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled.set()
            events.put_nowait(("gone", None))

        return asyncio.create_task(wait())

    async def _stream(request, job, events, ident, created, body, chat, usage, path):
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict | None, finish: str | None = None, with_usage: bool = False) -> str:
            choices = [] if delta is None else [
                {"index": 0, "delta": delta, "finish_reason": finish} if chat else
                {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}]
            payload = {"id": ident, "object": kind_name, "created": created, "model": body.model, "choices": choices}
            if include_usage:  # OpenAI's API: every chunk has the field, null but in the last one
                payload["usage"] = usage() if with_usage else None
            return f"data: {json.dumps(payload)}\n\n"

        finished, watcher = False, _watch(request, job, events)
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            following = None
            while True:
                kind, value = following or await events.get()
                following = None
                if kind == "token":
                    # What arrived while the last chunk was being sent goes out as one chunk: under load the
                    # event loop (and a client on the same CPU) is not paid per token.
                    pieces = [value]
                    while not events.empty():
                        following = events.get_nowait()
                        if following[0] != "token":
                            break
                        pieces.append(following[1])
                        following = None
                    yield chunk({"content": "".join(pieces)})
                elif kind == "gone":
                    return
                elif kind == "done":
                    yield chunk({}, finish=value)
                    if include_usage:
                        yield chunk(None, with_usage=True)
                    yield "data: [DONE]\n\n"
                    finished = True
                    metrics.finished(path, job)
                    return
                else:
                    status = "504" if value == "timeout" else "500"
                    metrics.requests.labels(path, status).inc()
                    yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                    finished = True
                    return
        finally:
            watcher.cancel()
            if not finished:  # the client went away: stop its generation at the next token
                job.cancelled.set()
                metrics.requests.labels(path, "499").inc()

    return app
