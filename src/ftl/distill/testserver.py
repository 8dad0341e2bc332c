"""A real OpenAI-compatible HTTP endpoint on 127.0.0.1, for tests and benchmarks.

It answers ``POST /v1/chat/completions`` through a real local model (or an echo, for timing), and
injects scripted faults: markers in a question such as ``[429]``, ``[500x2]``, ``[hang]``,
``[reset]``, ``[garbage]``, ``[empty]``, ``[refuse]`` or ``[long]``, or random 429/500 rates.
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

_MARK = re.compile(r"\[(429|500|hang|reset|garbage|empty|refuse|long)(?:x(\d+))?\]")


class _Server(ThreadingHTTPServer):
    # The default listen backlog of 5 drops connections when many clients connect at once, and a
    # dropped SYN costs a 1 s retransmit: that, not ftl, was half the time at concurrency 16.
    request_queue_size = 256
    daemon_threads = True


class TeacherServer:
    def __init__(self, answer: Callable[[list[dict]], str] | None = None, *, delay: float = 0.0,
                 api_key: str | None = None, rate_429: float = 0.0, rate_500: float = 0.0, hang_s: float = 3.0,
                 seed: int = 0):
        self.answer = answer or (lambda messages: "Answer: " + messages[-1]["content"][::-1])
        self.delay, self.api_key, self.hang_s = delay, api_key, hang_s
        self.rate_429, self.rate_500 = rate_429, rate_500
        self.random = random.Random(seed)
        self.attempts: Counter = Counter()
        self.paths: list[str] = []
        self.auth_headers: list[str | None] = []
        self.statuses: Counter = Counter()
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
            if kind in ("garbage", "empty", "refuse", "long") or attempt < times:
                return kind
            return None
        if roll < self.rate_429:
            return "429"
        if roll < self.rate_429 + self.rate_500:
            return "500"
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
                    server.paths.append(self.path)
                    server.auth_headers.append(self.headers.get("api-key") or self.headers.get("Authorization"))
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
                if not self.path.split("?", 1)[0].endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                messages = body.get("messages", [])
                question = messages[-1]["content"] if messages else ""
                fault = server._fault(question)
                if server.delay:
                    time.sleep(server.delay)
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "0.2"})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "internal error"}}')
                if fault == "hang":
                    time.sleep(server.hang_s)
                    return self._send(500, b'{"error": {"message": "too late"}}')
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if fault == "garbage":
                    return self._send(200, b'{"choices": [{"message": {"content": "tru')
                n = int(body.get("n", 1))
                if fault == "empty":
                    choices = []
                elif fault == "refuse":
                    choices = [_choice(i, "I'm sorry, but I can't help with that.", "stop") for i in range(n)]
                elif fault == "long":
                    choices = [_choice(i, "This answer was cut", "length") for i in range(n)]
                else:
                    choices = [_choice(i, server.answer(messages), "stop") for i in range(n)]
                payload = {"id": "chatcmpl-ftl", "object": "chat.completion", "created": int(time.time()),
                           "model": body.get("model", "test"), "choices": choices,
                           "usage": {"prompt_tokens": len(question.split()), "completion_tokens": 8 * n,
                                     "total_tokens": len(question.split()) + 8 * n}}
                return self._send(200, json.dumps(payload).encode())

        return Handler


def _choice(index: int, text: str, finish: str) -> dict:
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


def main() -> None:  # python -m ftl.distill.testserver --port 8000 [--model EXPORT_DIR]
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-500", type=float, default=0.0)
    args = parser.parse_args()
    server = TeacherServer(onnx_answerer(args.model) if args.model else None, delay=args.delay,
                           rate_429=args.rate_429, rate_500=args.rate_500, seed=1)
    with server:
        print(server.url, flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
