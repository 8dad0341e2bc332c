"""A fault-injecting, OpenAI-compatible teacher on 127.0.0.1, for testing ``ftl distill`` setups.

A real HTTP endpoint (``POST /v1/chat/completions``), so a distil run, a benchmark or your own
client exercises the same code paths as against a paid service, with no key and no network::

    from ftl.testing import TeacherServer
    from ftl.distill import DistillConfig, distill

    with TeacherServer() as server:                  # answers "Answer: " + the question reversed
        result = distill(DistillConfig(seeds="seeds.jsonl", output="qa.jsonl", teacher="openai",
                                       base_url=server.url, model="any"))
        print(server.requests, server.statuses)      # what reached the server, by HTTP status

Put a marker in a question to script a fault for it:

- ``[429]`` rate limited (with Retry-After), ``[500]`` server error, ``[hang]`` no answer for
  ``hang_s`` seconds, ``[reset]`` connection dropped: the first attempt only, or the first N with
  ``[500x3]``;
- ``[garbage]`` a truncated JSON body, ``[empty]`` an answer with no text, ``[refuse]`` a refusal,
  ``[long]`` an answer cut by the length limit, ``[400]`` HTTP 400 ``context_length_exceeded``,
  ``[filter]`` HTTP 400 ``content_filter`` (Azure's prompt filter), ``[filtered]`` an answer
  withheld by the output filter (``finish_reason: content_filter``): every attempt, or the first
  N with ``[longx1]``.

``rate_429`` / ``rate_500`` / ``rate_garbage`` / ``rate_reset`` add random faults (independent of
load, as a proxy's or a busy self-hosted server's are); a random 429 sends ``Retry-After: retry_after``
and, like any fault not from a quota, no rate-limit headers.

``rpm`` / ``tpm`` enforce a quota the way Azure OpenAI does: over a sliding ``window`` of seconds
(10 by default), each window allows ``rpm * window / 60`` requests and ``tpm * window / 60``
tokens (the prompt's tokens plus ``max_tokens * n``, counted on arrival). A request over it gets 429
with ``Retry-After`` (and ``retry-after-ms``). Every response carries rate-limit headers:
``headers="openai"`` (the default) sends OpenAI's ``x-ratelimit-limit-*``, ``-remaining-*`` and
``-reset-*``; ``"azure"`` only ``x-ratelimit-remaining-requests`` / ``-tokens``, as Azure OpenAI
does; ``None`` none. ``events`` lists ``(seconds since start, status)`` for each response.

``onnx_answerer(folder)`` answers through a real
exported model. From a shell, ``python -m ftl.testing [--model EXPORT_DIR] [--delay S]`` prints
the URL and serves until interrupted.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_TOKEN = re.compile(r"\w+|[^\w\s]")  # the test server's "tokenizer": words and punctuation
_MARK = re.compile(r"\[(429|500|400|hang|reset|garbage|empty|refuse|long|filter|filtered)(?:x(\d+))?\]")
# Faults a real service repeats on every attempt (the question itself causes them) unless a count is given.
_PERMANENT = ("400", "garbage", "empty", "refuse", "long", "filter", "filtered")
_CLIENT_ERRORS = {
    "400": b'{"error": {"code": "context_length_exceeded", "type": "invalid_request_error", "param": "messages",'
           b' "message": "This model\'s maximum context length is 4096 tokens."}}',
    "filter": b'{"error": {"code": "content_filter", "param": "prompt", "status": 400, "message": "The response'
              b' was filtered due to the prompt triggering the content management policy."}}',
}


class _Server(ThreadingHTTPServer):
    # The default listen backlog of 5 drops connections when many clients connect at once, and a
    # dropped SYN waits for a TCP retransmit: the benchmark would measure that, not ftl.
    request_queue_size = 256
    daemon_threads = True


class TeacherServer:
    """Serves on a free port from ``__enter__`` to ``__exit__``; counts what it was asked and answered.

    ``requests``: POSTs received; ``statuses``: responses sent, by HTTP status (a dropped connection
    sends none); ``attempts``: requests per question; ``paths`` and ``auth_headers``, in order.
    ``models``: when given, any other model name is answered 404, as a wrong name or deployment is.
    """

    def __init__(self, answer: Callable[[list[dict]], str] | None = None, *, delay: float = 0.0,
                 api_key: str | None = None, rate_429: float = 0.0, rate_500: float = 0.0, rate_garbage: float = 0.0,
                 rate_reset: float = 0.0, retry_after: float = 0.2, hang_s: float = 3.0, seed: int = 0,
                 models: set[str] | None = None, rpm: int | None = None, tpm: int | None = None,
                 window: float = 10.0, headers: str | None = "openai"):
        self.answer = answer or (lambda messages: "Answer: " + messages[-1]["content"][::-1])
        self.delay, self.api_key, self.hang_s = delay, api_key, hang_s
        self.models, self.retry_after = models, retry_after
        self.random_faults = [("429", rate_429), ("500", rate_500), ("garbage", rate_garbage), ("reset", rate_reset)]
        self.random = random.Random(seed)
        self.attempts: Counter = Counter()
        self.paths: list[str] = []
        self.auth_headers: list[str | None] = []
        self.statuses: Counter = Counter()
        self.requests = 0
        self.quota = _Quota(rpm, tpm, window) if (rpm or tpm) else None
        self.headers = headers
        self.events: list[tuple[float, int]] = []
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _fault(self, question: str) -> str | None:
        with self.lock:
            attempt = self.attempts[question]
            self.attempts[question] += 1
            roll = self.random.random()
        mark = _MARK.search(question)
        if mark:
            kind, times = mark.group(1), int(mark.group(2) or 1)
            if (kind in _PERMANENT and mark.group(2) is None) or attempt < times:
                return kind
            return None
        for kind, rate in self.random_faults:
            if roll < rate:
                return kind
            roll -= rate
        return None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                with server.lock:
                    server.statuses[status] += 1
                    server.events.append((time.monotonic() - server.started, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests += 1
                    server.paths.append(self.path)
                    server.auth_headers.append(self.headers.get("api-key") or self.headers.get("Authorization"))
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
                if not self.path.split("?", 1)[0].endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                if server.models is not None and body.get("model") not in server.models:
                    return self._send(404, json.dumps({"error": {"code": "model_not_found", "message": f"The model "
                                                       f"{body.get('model')!r} does not exist"}}).encode())
                messages = body.get("messages", [])
                question = messages[-1]["content"] if messages else ""
                prompt_tokens = sum(len(_TOKEN.findall(str(m.get("content", "")))) for m in messages)
                n = int(body.get("n", 1))
                limits = {}
                if server.quota:
                    granted, limits = server.quota.take(prompt_tokens + int(body.get("max_tokens") or 16) * n)
                    limits = {k: v for k, v in limits.items() if "ratelimit" not in k or server.headers == "openai"
                              or (server.headers == "azure" and "remaining" in k)}
                    if not granted:
                        return self._send(429, b'{"error": {"code": "429", "message": "Requests to this deployment '
                                               b'have exceeded the rate limit of your current tier."}}', limits)
                    limits = {k: v for k, v in limits.items() if "retry-after" not in k}
                fault = server._fault(question)
                if server.delay:
                    time.sleep(server.delay)
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}',
                                      {"Retry-After": f"{server.retry_after:g}"})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "internal error"}}')
                if fault in _CLIENT_ERRORS:
                    return self._send(400, _CLIENT_ERRORS[fault])
                if fault == "hang":
                    time.sleep(server.hang_s)
                    return self._send(500, b'{"error": {"message": "too late"}}')
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if fault == "garbage":
                    return self._send(200, b'{"choices": [{"message": {"content": "tru')
                if fault == "empty":
                    choices = [_choice(i, "", "stop") for i in range(n)]
                elif fault == "filtered":
                    choices = [_choice(i, None, "content_filter") for i in range(n)]
                elif fault == "refuse":
                    choices = [_choice(i, "I'm sorry, but I can't help with that.", "stop") for i in range(n)]
                elif fault == "long":
                    choices = [_choice(i, "This answer was cut", "length") for i in range(n)]
                else:
                    choices = [_choice(i, server.answer(messages), "stop") for i in range(n)]
                payload = {"id": "chatcmpl-ftl", "object": "chat.completion", "created": int(time.time()),
                           "model": body.get("model", "test"), "choices": choices,
                           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 8 * n,
                                     "total_tokens": prompt_tokens + 8 * n}}
                return self._send(200, json.dumps(payload).encode(), limits)

        return Handler


class _Quota:
    """Requests and tokens over a sliding window, as a provider enforces RPM/TPM (a rejected request is not counted)."""

    def __init__(self, rpm: int | None, tpm: int | None, window: float):
        self.window = window
        self.requests = rpm * window / 60 if rpm else None
        self.tokens = tpm * window / 60 if tpm else None
        self.rpm, self.tpm = rpm, tpm
        self.log: list[tuple[float, int]] = []
        self.lock = threading.Lock()

    def take(self, tokens: int) -> tuple[bool, dict]:
        with self.lock:
            now = time.monotonic()
            self.log = [(t, c) for t, c in self.log if now - t < self.window]
            used = sum(c for _, c in self.log)
            fits = (self.requests is None or len(self.log) + 1 <= self.requests) and \
                   (self.tokens is None or used + tokens <= self.tokens)
            if fits:
                self.log.append((now, tokens))
                used += tokens
            wait = 0.0 if fits else self._wait(now, tokens)
            headers = {}
            if self.requests is not None:
                reset = self.window - (now - self.log[0][0]) if self.log else 0.0
                headers |= {"x-ratelimit-limit-requests": str(self.rpm),
                            "x-ratelimit-remaining-requests": str(max(0, int(self.requests) - len(self.log))),
                            "x-ratelimit-reset-requests": f"{max(reset, 0.001):.3f}s"}
            if self.tokens is not None:
                reset = self.window - (now - self.log[0][0]) if self.log else 0.0
                headers |= {"x-ratelimit-limit-tokens": str(self.tpm),
                            "x-ratelimit-remaining-tokens": str(max(0, int(self.tokens - used))),
                            "x-ratelimit-reset-tokens": f"{max(reset, 0.001):.3f}s"}
            if not fits:
                headers |= {"Retry-After": str(max(1, round(wait))), "retry-after-ms": str(max(1, int(wait * 1000)))}
            return fits, headers

    def _wait(self, now: float, tokens: int) -> float:
        """Seconds until enough of the window has expired for this request to fit."""
        count, used = len(self.log), sum(c for _, c in self.log)
        for t, c in self.log:  # oldest first: each one that expires frees its request and tokens
            count, used = count - 1, used - c
            if (self.requests is None or count + 1 <= self.requests) and \
                    (self.tokens is None or used + tokens <= self.tokens):
                return max(self.window - (now - t), 0.001)
        return self.window  # more tokens than a whole window allows: a provider would refuse it every time


def _choice(index: int, text: str | None, finish: str) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


def onnx_answerer(folder, max_new_tokens: int = 16) -> Callable[[list[dict]], str]:
    """Answer through a real exported model (one request at a time; ORT sessions are not re-entrant here)."""
    from ftl.generate import OnnxChatModel

    model = OnnxChatModel(folder)
    lock = threading.Lock()

    def answer(messages):
        with lock:
            text = model.generate(messages, max_new_tokens=max_new_tokens).text.strip()
        return text or "(no text)"

    return answer


def main() -> None:
    """``python -m ftl.testing``: print the URL, serve until Ctrl-C (a separate process, as a real endpoint is)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ftl.testing", description="A fault-injecting OpenAI-compatible "
                                     "test server on 127.0.0.1; prints its base URL.")
    parser.add_argument("--model", help="answer through this exported ONNX folder (default: an echo)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--rate-429", type=float, default=0.0, help="fraction of requests answered 429")
    parser.add_argument("--rate-500", type=float, default=0.0, help="fraction of requests answered 500")
    parser.add_argument("--rate-garbage", type=float, default=0.0, help="fraction answered with truncated JSON")
    parser.add_argument("--rate-reset", type=float, default=0.0, help="fraction whose connection is dropped")
    parser.add_argument("--retry-after", type=float, default=0.2, help="Retry-After seconds of the random 429s")
    parser.add_argument("--rpm", type=int, help="enforce this requests-per-minute quota over --window")
    parser.add_argument("--tpm", type=int, help="enforce this tokens-per-minute quota over --window")
    parser.add_argument("--window", type=float, default=10.0, help="seconds over which the quota is enforced")
    parser.add_argument("--headers", choices=["openai", "azure", "none"], default="openai",
                        help="rate-limit headers to send: OpenAI's, Azure's (remaining only), or none")
    args = parser.parse_args()
    server = TeacherServer(onnx_answerer(args.model) if args.model else None, delay=args.delay,
                           rate_429=args.rate_429, rate_500=args.rate_500, rate_garbage=args.rate_garbage,
                           rate_reset=args.rate_reset, retry_after=args.retry_after, seed=1, rpm=args.rpm, tpm=args.tpm,
                           window=args.window, headers=None if args.headers == "none" else args.headers)
    with server:
        print(server.url, flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
