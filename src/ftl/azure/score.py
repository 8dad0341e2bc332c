"""score.py for an Azure ML managed online endpoint serving an ftl int4 export (copied by ``ftl deploy``
into ``<export>.deploy/score/`` beside a copy of ftl's inference engine, ``score/ftl/``: the same
code as ``ftl generate`` and ``ftl serve``, which needs only onnxruntime-genai, pydantic and jinja2).
The model folder is ``$AZUREML_MODEL_DIR`` (or the one folder in it that holds genai_config.json).

Request (JSON)::

    {"messages": [{"role": "user", "content": "What is int4?"}]}     # or {"question": "What is int4?"}
    optional: "max_new_tokens" (default 256), "temperature" (0 = greedy, the default),
              "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size"

Response (JSON)::

    {"text": "...", "prompt_tokens": 31, "completion_tokens": 57,
     "finish_reason": "stop" | "length" | "deadline", "max_new_tokens": 256,
     "latency_ms": 812.4, "decode_tokens_per_s": 74.1}

The deployment serves one request at a time per instance, so one request must not hold it: the
deployment's ``FTL_MAX_NEW_TOKENS`` caps ``max_new_tokens`` (a larger ask gets that many, and says
so in ``max_new_tokens``), and generation stops ``FTL_DEADLINE_S`` after the request arrived
(``finish_reason: "deadline"``, with what was generated), before the endpoint's own timeout.
``ftl deploy`` writes both (:mod:`ftl.azure.deploy`); unset, only the context limits a request.

Bad JSON, a missing question, unknown options or a prompt longer than the context answer 400 with
``{"error": "..."}``, never 500. The prompt is rendered as ``ftl generate`` renders it: the format
recorded at fine-tuning (chat template, system prompt or text template), from the export's manifest.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the engine copy beside this file (score/ftl/)

try:  # azureml-inference-server-http: lets run() choose the HTTP status
    from azureml.contrib.services.aml_response import AMLResponse
except ImportError:  # outside the server (a plain import): the same constructor; the server's own class
    # json.dumps a json_str=True message itself, so ``message`` is the object, not its JSON text
    class AMLResponse:  # type: ignore[no-redef]
        def __init__(self, message, status_code, response_headers=None, json_str=False):
            self.message, self.status_code, self.json_str = message, status_code, json_str

OPTIONS = {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size"}
_STATE: dict = {}


class BadRequest(ValueError):
    pass


def model_folder() -> Path:
    root = Path(os.environ.get("AZUREML_MODEL_DIR", "."))
    if (root / "genai_config.json").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("genai_config.json"))
    if not found:
        raise RuntimeError(f"no genai_config.json under AZUREML_MODEL_DIR={root}")
    return found[0]


def init() -> None:
    from ftl.generate.engine import OnnxChatModel

    threads = int(os.environ.get("FTL_THREADS", "0")) or None  # None: the cores this process may use
    _STATE["model"] = OnnxChatModel(model_folder(), threads=threads)
    _STATE["cap"] = int(os.environ.get("FTL_MAX_NEW_TOKENS") or 0) or None
    _STATE["deadline_s"] = float(os.environ.get("FTL_DEADLINE_S") or 0) or None


def messages_of(request: dict) -> list[dict]:
    messages = request.get("messages")
    if messages is None:
        question = request.get("question")
        if not isinstance(question, str) or not question.strip():
            raise BadRequest('give "messages" (a list of {role, content}) or "question" (text)')
        return _STATE["model"].format.conversation(question)
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRequest('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    from ftl.chat import with_system

    return with_system(messages, _STATE["model"].format.system_prompt)  # as ftl chat adds it


def generate(request: dict) -> dict:
    started = time.perf_counter()
    model, cap = _STATE["model"], _STATE.get("cap")
    unknown = set(request) - OPTIONS - {"messages", "question"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}; options are {sorted(OPTIONS)}")
    new = request.get("max_new_tokens", 256)
    if not isinstance(new, int) or isinstance(new, bool) or new < 1:
        raise BadRequest('"max_new_tokens" must be a positive integer')
    new = min(new, cap or new)
    temperature = float(request.get("temperature", 0) or 0)
    search = {"top_k": int(request["top_k"])} if "top_k" in request and temperature > 0 else {}
    messages = messages_of(request)
    try:
        prompt_tokens = len(model.prompt_ids(messages))
    except Exception as exc:  # noqa: BLE001 — jinja2's TemplateError: the chat template refused the messages
        raise BadRequest(f"the model's chat template refused these messages: {exc}") from None
    if prompt_tokens + new > model.context_length:
        raise BadRequest(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({new}) exceeds the model's context "
                         f"({model.context_length}); shorten the prompt or lower max_new_tokens")
    deadline = started + _STATE["deadline_s"] if _STATE.get("deadline_s") else None
    pieces, stats = [], {}
    for piece in model.stream(messages, max_new_tokens=new, temperature=temperature,
                              top_p=float(request.get("top_p", 1.0)), search=search, stats=stats,
                              repetition_penalty=request.get("repetition_penalty"),
                              no_repeat_ngram_size=request.get("no_repeat_ngram_size")):
        pieces.append(piece)  # one piece per answer token while it generates (ftl.generate.engine)
        if deadline is not None and time.perf_counter() >= deadline and len(pieces) < new:
            break  # the client's timeout is near: answer with what there is, and free the only slot
    from ftl.system import decode_rate

    if stats:  # it ended by itself: the engine's own counts (a stop string is not part of the answer)
        tokens, finish = stats["new_tokens"], "length" if stats["new_tokens"] >= new else "stop"
        rate = decode_rate(tokens, stats["ttft_s"], stats["total_s"])
    else:
        tokens, finish, rate = len(pieces), "deadline", None
    return {"text": "".join(pieces), "prompt_tokens": prompt_tokens, "completion_tokens": tokens,
            "finish_reason": finish, "max_new_tokens": new,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            "decode_tokens_per_s": round(rate, 1) if rate else None}


def run(raw_data):
    """The endpoint's handler: JSON in, JSON out; client errors are 400, never 500."""
    try:
        request = json.loads(raw_data) if isinstance(raw_data, (str, bytes, bytearray)) else raw_data
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        return generate(request)
    except json.JSONDecodeError as exc:
        return AMLResponse({"error": f"the body is not JSON: {exc.msg} at {exc.pos}"}, 400, json_str=True)
    except (BadRequest, TypeError, ValueError) as exc:
        return AMLResponse({"error": str(exc)}, 400, json_str=True)
