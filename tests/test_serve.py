"""ftl serve: a real server (uvicorn on a loopback port) over the tiny export, talked to through the
`openai` client and raw HTTP. SmolLM2 streaming and a disconnect mid-stream: tests/test_e2e_smollm2.py."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
from openai import APIStatusError, AuthenticationError, InternalServerError, NotFoundError, OpenAI

from ftl.serve import build_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(export, **settings):
    """build_server + uvicorn on 127.0.0.1, in a thread; yields (base URL, app)."""
    import uvicorn

    app, scheduler = build_server(export, threads=2, **settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        scheduler.close()


def http(url, body=None, headers=None, method=None):
    """(status, headers, parsed JSON or text) for a raw request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw, status, got = response.read(), response.status, response.headers
    except urllib.error.HTTPError as error:
        raw, status, got = error.read(), error.code, error.headers
    got = {k.lower(): v for k, v in got.items()}
    try:
        return status, got, json.loads(raw)
    except ValueError:
        return status, got, raw.decode()


def ask(content="What is 2 + 3?", **kw):
    return {"model": "export", "messages": [{"role": "user", "content": content}], **kw}


def test_chat_and_completions_through_the_openai_client_streamed_or_not(tiny_export):
    with running(tiny_export) as (url, _):
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["export"]
        whole = client.chat.completions.create(**ask(max_tokens=6))
        assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens > 0
        stream = client.chat.completions.create(**ask(max_tokens=6), stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        # Greedy: the streamed pieces join into the same answer, and the last chunk carries the usage.
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 6
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        plain = client.completions.create(model="export", prompt="Once upon a time", max_tokens=5)
        assert plain.object == "text_completion" and plain.usage.completion_tokens == 5
        # stop: the answer ends before the first stop string, which is not part of it
        text = plain.choices[0].text
        stop = text[1:3]
        cut = client.completions.create(model="export", prompt="Once upon a time", max_tokens=5, stop=[stop])
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
        status, _, health = http(url + "/health")
        assert status == 200 and health["status"] == "ok" and health["active"] == 0
        status, _, page = http(url + "/metrics")
        assert 'ftl_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in page
        assert "ftl_time_to_first_token_seconds_bucket" in page and "ftl_queue_depth 0.0" in page


def test_bad_requests_are_4xx_in_openais_shape_and_the_server_stays_up(tiny_export):
    with running(tiny_export, max_tokens_cap=64, max_body_bytes=8192) as (url, _):
        chat = url + "/v1/chat/completions"
        cases = [
            (b"{not json", 400, "not valid JSON"),
            (ask(max_tokens="5"), 400, "max_tokens: Input should be a valid integer"),
            ({"model": "export", "messages": []}, 400, "messages"),
            ({"model": "export", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
            (ask(max_tokens=0), 400, "max_tokens must be at least 1"),
            (ask(max_tokens=65), 400, "over this server's cap of 64"),
            (ask("word " * 400, max_tokens=64), 400, "context is 512 tokens"),
            (ask(n=2), 400, "n:"),
            (ask(stop=["a", "b", "c", "d", "e"], max_tokens=4), 400, "stop takes at most 4 strings"),
            ({**ask(), "model": "nope"}, 404, "'nope' is not served here; models: export"),
            (ask("x" * 9000), 413, "over the limit of 8192"),
        ]
        for body, status, message in cases:
            got, _, answer = http(chat, body)
            assert got == status and message in answer["error"]["message"], (body, answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert http(chat, ask(max_tokens=2))[0] == 200  # still up
        _, _, page = http(url + "/metrics")
        assert 'endpoint="/v1/chat/completions",status="400"} 9.0' in page


def test_a_full_queue_is_429_with_retry_after_and_a_timeout_is_504(tiny_export):
    with running(tiny_export, max_concurrency=1, max_queue=1, timeout_s=0.3) as (url, app):
        scheduler = app.state.scheduler
        scheduler.pause_admission()  # hold the queue, so its bound is what answers
        first = {}
        waiter = threading.Thread(target=lambda: first.update(result=http(url + "/v1/chat/completions",
                                                                         ask(max_tokens=3))))
        waiter.start()
        deadline = time.time() + 10
        while scheduler.depth()[0] < 1 and time.time() < deadline:
            time.sleep(0.01)
        status, headers, answer = http(url + "/v1/chat/completions", ask(max_tokens=3))
        assert status == 429 and headers["retry-after"] == "2" and answer["error"]["code"] == "queue_full"
        time.sleep(0.4)  # the queued request's 0.3 s runs out while it waits
        scheduler.pause_admission(False)
        waiter.join(timeout=30)
        status, _, answer = first["result"]
        assert status == 504 and "0.3 s limit" in answer["error"]["message"]
        assert http(url + "/v1/chat/completions", ask(max_tokens=3))[0] == 200


def test_requests_that_arrive_together_are_one_batch_and_answer_as_they_would_alone(tiny_export):
    """Prompts of different lengths, padded into one onnxruntime-genai batch: each greedy answer is the
    one the same request gets alone, and /metrics counts one batch of four."""
    prompts = ["What is 2 + 3?", "Name a colour.", "Write one long sentence about the sea and the sky at night.",
               "Hi"]
    with running(tiny_export, max_concurrency=4) as (url, app):
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        alone = [client.chat.completions.create(**ask(p, max_tokens=6 + i)).choices[0].message.content
                 for i, p in enumerate(prompts)]
        app.state.scheduler.pause_admission()  # let all four arrive, then admit them together
        together = [None] * len(prompts)

        def one(i):
            together[i] = client.chat.completions.create(**ask(prompts[i], max_tokens=6 + i)).choices[0].message.content

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        deadline = time.time() + 10
        while app.state.scheduler.depth()[0] < len(prompts) and time.time() < deadline:
            time.sleep(0.01)
        app.state.scheduler.pause_admission(False)
        for thread in threads:
            thread.join(timeout=30)
        assert together == alone
        _, _, page = http(url + "/metrics")
        assert 'ftl_batch_rows_bucket{le="4.0"} 5.0' in page and 'ftl_batch_rows_bucket{le="2.0"} 4.0' in page


def test_an_api_key_guards_every_endpoint_but_health(tiny_export):
    with running(tiny_export, api_key="s3cret-key") as (url, _):
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong").chat.completions.create(**ask(max_tokens=2))
        status, _, answer = http(url + "/v1/models")
        assert status == 401 and answer["error"]["code"] == "invalid_api_key" and "s3cret" not in json.dumps(answer)
        assert http(url + "/metrics")[0] == 401 and http(url + "/health")[0] == 200
        for n in range(3):  # unknown paths share one metrics label, so probing them cannot grow /metrics
            assert http(f"{url}/probe-{n}")[0] == 401
        page = http(url + "/metrics", headers={"Authorization": "Bearer s3cret-key"})[2]
        assert 'ftl_requests_total{endpoint="other",status="401"} 3.0' in page and "probe" not in page
        answer = OpenAI(base_url=url + "/v1", api_key="s3cret-key").chat.completions.create(**ask(max_tokens=2))
        assert answer.usage.completion_tokens == 2


def test_the_cli_warns_on_every_interface_without_a_key_and_refuses_a_bad_folder(tiny_export, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "ftl.cli", "serve", str(tmp_path / "nothing")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "no genai_config.json" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ftl.cli", "serve", str(tiny_export), "--host", "0.0.0.0",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "COLUMNS": "250", "FTL_API_KEY": ""})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and server.poll() is None:
            try:
                if http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        status, _, answer = http(f"http://127.0.0.1:{port}/v1/chat/completions", ask(max_tokens=2))
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "warning: serving on 0.0.0.0 without an API key" in output


def sse(url, body):
    """The raw `data:` payloads of a streamed answer, parsed, up to [DONE]."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = [line.decode().strip() for line in response]
    payloads = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_streamed_chunks_carry_usage_null_until_the_last_with_include_usage(tiny_export):
    """OpenAI's API: with stream_options.include_usage every chunk has "usage", null but in the last
    (whose choices are empty); without it, no chunk has the field."""
    with running(tiny_export) as (url, _):
        for path, body in (("/v1/chat/completions", ask(max_tokens=5)),
                           ("/v1/completions", {"model": "export", "prompt": "Once upon a time", "max_tokens": 5})):
            chunks = sse(url + path, {**body, "stream": True, "stream_options": {"include_usage": True}})
            assert all("usage" in chunk for chunk in chunks), path
            assert [chunk["usage"] for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
            plain = sse(url + path, {**body, "stream": True})
            assert not any("usage" in chunk for chunk in plain)


def test_unknown_paths_wrong_methods_and_server_errors_are_in_openais_shape(tiny_export):
    """Starlette's own 404 and 405 and an unhandled exception's 500 reach an OpenAI client as
    {"error": {...}} like every other error, without the exception's text."""
    with running(tiny_export) as (url, app):
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(NotFoundError) as missing:
            client.get("/no-such-endpoint", cast_to=object)
        assert set(missing.value.body) == {"message", "type", "param", "code"}
        assert missing.value.type == "invalid_request_error" and "/v1/no-such-endpoint" in missing.value.message
        with pytest.raises(APIStatusError) as method:
            client.delete("/chat/completions", cast_to=object)
        assert method.value.status_code == 405 and method.value.response.headers["allow"] == "POST"
        assert set(method.value.body) == {"message", "type", "param", "code"}

        engine = app.state.engine
        def broken(name, messages):  # a bug in the prompt path, as a real one would surface
            raise RuntimeError("internal detail /secret/path")
        engine.chat_ids = broken
        with pytest.raises(InternalServerError) as failed:
            client.chat.completions.create(**ask(max_tokens=2))
        assert failed.value.status_code == 500 and failed.value.type == "server_error"
        assert set(failed.value.body) == {"message", "type", "param", "code"} and "secret" not in failed.value.message
        del engine.chat_ids
        assert client.chat.completions.create(**ask(max_tokens=2)).usage.completion_tokens == 2  # still up
        page = http(url + "/metrics")[2]
        assert 'endpoint="other",status="404"} 1.0' in page and 'status="500"} 1.0' in page


def test_finished_rows_hold_their_slots_until_their_batch_ends(tiny_export):
    """og cannot drop a row, so a finished row is computed until its batch ends: it keeps its slot, and
    the rows computed never exceed --max-concurrency. A short and a long answer start together; a third
    request sent after the short one ends waits for the long one's batch instead of computing a third row."""
    with running(tiny_export, max_concurrency=2) as (url, app):
        scheduler, order = app.state.scheduler, []
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        scheduler.pause_admission()
        long = threading.Thread(target=lambda: (client.chat.completions.create(**ask("Hi", max_tokens=450)),
                                                order.append("long done")))
        long.start()
        deadline = time.time() + 10
        while scheduler.depth()[0] < 1 and time.time() < deadline:
            time.sleep(0.01)
        short = threading.Thread(target=lambda: client.chat.completions.create(**ask(max_tokens=2)))
        short.start()
        while scheduler.depth()[0] < 2 and time.time() < deadline:
            time.sleep(0.01)
        scheduler.pause_admission(False)
        short.join(timeout=30)
        assert scheduler.depth() == (0, 1) and scheduler.computed() == 2  # the short row ended; the long goes on
        order.append("third sent")
        third = client.chat.completions.create(**ask("Name a colour.", max_tokens=3))
        long.join(timeout=30)
        assert order[0] == "third sent" and third.usage.completion_tokens == 3
        assert scheduler.peak_rows == 2
        # each step computes both rows of the first batch, the finished one too, then the third alone
        assert scheduler.row_steps == 2 * 450 + 3
        page = http(url + "/metrics")[2]
        assert "ftl_row_steps_total 903.0" in page and "ftl_computed_rows " in page


def test_a_model_og_cannot_batch_gets_one_generator_per_request_and_says_so(tiny_export, caplog):
    """OnnxChatModel.can_batch False (Gemma 3 on og 0.18): requests that arrive together still run side
    by side, each in its own generator, with the answers they get alone; the log says so once and
    /health and /metrics show it."""
    prompts = ["What is 2 + 3?", "Write one long sentence about the sea and the sky at night.", "Hi"]
    with running(tiny_export, max_concurrency=4) as (url, app):
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        alone = [client.chat.completions.create(**ask(p, max_tokens=5)).choices[0].message.content for p in prompts]
        app.state.engine.chat.can_batch = False
        scheduler = app.state.scheduler
        for _ in range(2):
            scheduler.pause_admission()
            together = [None] * len(prompts)

            def one(i):
                together[i] = client.chat.completions.create(**ask(prompts[i], max_tokens=5)).choices[0].message.content

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
            for thread in threads:
                thread.start()
            deadline = time.time() + 10
            while scheduler.depth()[0] < len(prompts) and time.time() < deadline:
                time.sleep(0.01)
            scheduler.pause_admission(False)
            for thread in threads:
                thread.join(timeout=30)
            assert together == alone
        assert scheduler.peak_rows == len(prompts)  # side by side, one row each
        assert [r.getMessage() for r in caplog.records].count(
            "onnxruntime-genai cannot batch prompts of different lengths for this model: each request gets its own "
            "generator (requests still run side by side)") == 1
        assert http(url + "/health")[2]["batching"] is False
        page = http(url + "/metrics")[2]
        assert "ftl_batching 0.0" in page and 'ftl_batch_rows_bucket{le="1.0"} 9.0' in page
        assert 'ftl_batch_rows_count 9.0' in page


def test_a_long_prompt_is_tokenised_off_the_event_loop(tiny_export):
    """A 1 MB prompt is rendered and tokenised while streams go on: the tokenising (held open by a hook
    around the real call until a stream started meanwhile has three chunks) sees that stream's chunks
    arrive. On the event loop, the stream could not even start. The prompt is over the context: 400,
    with the token count og's own tokenizer gives."""
    with running(tiny_export, max_body_bytes=2 << 20) as (url, app):
        engine, events, chunks = app.state.engine, [], threading.Semaphore(0)
        real = engine.chat_ids

        def hooked(name, messages):
            if len(messages[-1]["content"]) < 1000:  # the stream's own prompt
                return real(name, messages)
            events.append("tokenising")
            try:
                return real(name, messages)
            finally:
                got = sum(chunks.acquire(timeout=10) for _ in range(3))
                events.append(f"tokenised after {got} chunks")

        engine.chat_ids = hooked
        huge = "word " * 200_000
        answer = {}
        big = threading.Thread(target=lambda: answer.update(result=http(url + "/v1/chat/completions",
                                                                        ask(huge, max_tokens=4))))
        big.start()
        deadline = time.time() + 30
        while not events and time.time() < deadline:
            time.sleep(0.01)
        request = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps(ask(max_tokens=40, stream=True)).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    events.append("chunk")
                    chunks.release()
        big.join(timeout=60)
        del engine.chat_ids
        assert events[:4] == ["tokenising", "chunk", "chunk", "chunk"] and "tokenised after 3 chunks" in events
        status, _, body = answer["result"]
        expected = len(engine.chat.encode(engine.formats["export"].render_prompt([{"role": "user", "content": huge}])))
        assert status == 400 and f"the prompt has {expected} " in body["error"]["message"]
        assert engine.encoder.in_child == 1  # og's encode holds the GIL: a long prompt goes to the child process


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_model, qa_file, session_cwd):
    """Two LoRA fine-tunes of the tiny model, each exported with --keep-adapter-separate, each with its own
    prompt format: legal the chat template and a system prompt, hr a text template and another one."""
    from conftest import working_directory
    from ftl.export import ExportConfig, export_onnx
    from ftl.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("adapters")
    exports = {}
    with working_directory(session_cwd):
        for name, seed, rate, fmt in (("legal", 1, 1e-2, {"system_prompt": "You answer as a lawyer."}),
                                      ("hr", 2, 5e-2, {"system_prompt": "You answer for HR.",
                                                       "text_template": "Q: {Question}\nA: {Answer}"})):
            finetune(FinetuneConfig(model=str(tiny_model), data=qa_file, output=root / f"ft-{name}", max_steps=4,
                                    batch_size=2, save_steps=4, learning_rate=rate, seed=seed, **fmt))
            exports[name] = export_onnx(ExportConfig(adapter=root / f"ft-{name}", output=root / f"export-{name}",
                                                     keep_adapter_separate=True))
    return exports


def test_multi_lora_the_model_field_picks_the_adapter_and_its_prompt_format(two_adapters):
    """Two separately exported adapters on one base: each request's model field routes it, each is
    prompted in its own export's format (system prompt, chat or text template, stop strings), and
    each answer is the one ftl generate gives on that adapter's own export."""
    from ftl.generate import OnnxChatModel

    base = two_adapters["legal"].output
    adapters = {name: result.adapter_file for name, result in two_adapters.items()}
    prompt = "What is 2 + 3?"
    expected = {name: OnnxChatModel(result.output, threads=2).ask(prompt, max_new_tokens=8).text
                for name, result in two_adapters.items()}
    assert expected["legal"] != expected["hr"]  # two different fine-tunes, or routing proves nothing
    with running(base, adapters=adapters) as (url, app):
        engine, scheduler = app.state.engine, app.state.scheduler
        for name, result in two_adapters.items():
            own = OnnxChatModel(result.output, threads=2)
            assert engine.formats[name] == own.format
            assert engine.chat_ids(name, [{"role": "user", "content": prompt}]) == own.prompt_ids(
                own.format.conversation(prompt))
        assert engine.formats["hr"].kind == "text" and engine.formats["legal"].kind == "chat"
        submitted = []
        real_submit = scheduler.submit
        scheduler.submit = lambda job: (submitted.append(job), real_submit(job))[1]
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["export-legal", "legal", "hr"]
        for name in ("legal", "hr", "legal"):
            answer = client.chat.completions.create(model=name, max_tokens=8, stop=["zzz"],
                                                    messages=[{"role": "user", "content": prompt}])
            assert answer.choices[0].message.content == expected[name], name
        # each request stops at its own format's next turn too, beside the client's stop strings
        assert [job.stop for job in submitted] == [["zzz", *engine.formats[name].stop_strings]
                                                   for name in ("legal", "hr", "legal")]
    with pytest.raises(Exception, match="adapter file not found"):
        build_server(base, adapters={"x": base / "missing.onnx_adapter"})
