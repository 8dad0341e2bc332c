"""score.py for an Azure ML managed online endpoint serving an ftl int4 export (copied as is by
``ftl deploy``). It needs only onnxruntime-genai: the model folder is ``$AZUREML_MODEL_DIR``
(or the one folder in it that holds genai_config.json).

Request (JSON)::

    {"messages": [{"role": "user", "content": "What is int4?"}]}     # or {"question": "What is int4?"}
    optional: "max_new_tokens" (default 256), "temperature" (0 = greedy, the default),
              "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size"

Response (JSON)::

    {"text": "...", "prompt_tokens": 31, "completion_tokens": 57, "finish_reason": "stop" | "length",
     "latency_ms": 812.4, "decode_tokens_per_s": 74.1}

Bad JSON, a missing question, unknown options or a prompt longer than the context answer 400 with
``{"error": "..."}``, never 500. The prompt is rendered as ``ftl generate`` renders it: the model's
chat template, the fine-tune's system prompt or text template (from the export's manifest).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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
    import onnxruntime_genai as og

    folder = model_folder()
    config = og.Config(str(folder))
    threads = int(os.environ.get("FTL_THREADS", "0")) or (os.cpu_count() or 1)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    genai = json.loads((folder / "genai_config.json").read_text())
    record = {}
    if (folder / "manifest.json").is_file():
        record = json.loads((folder / "manifest.json").read_text())
    _STATE.update(og=og, model=model, tokenizer=og.Tokenizer(model), context=genai["model"]["context_length"],
                  search=genai.get("search", {}), prompt_format=record.get("prompt_format") or {})


def prompt(request: dict) -> str:
    fmt = _STATE["prompt_format"]
    messages = request.get("messages")
    if messages is None:
        question = request.get("question")
        if not isinstance(question, str) or not question.strip():
            raise BadRequest('give "messages" (a list of {role, content}) or "question" (text)')
        messages = [{"role": "user", "content": question}]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRequest('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    if fmt.get("text_template"):
        last = messages[-1]["content"]
        return fmt["text_template"].split("{Answer}")[0].replace("{Question}", last)
    if fmt.get("system_prompt") and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": fmt["system_prompt"]}] + messages
    return _STATE["tokenizer"].apply_chat_template(json.dumps(messages), add_generation_prompt=True)


def generate(request: dict) -> dict:
    og, tokenizer = _STATE["og"], _STATE["tokenizer"]
    unknown = set(request) - OPTIONS - {"messages", "question"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}; options are {sorted(OPTIONS)}")
    tokens = tokenizer.encode(prompt(request))
    new = request.get("max_new_tokens", 256)
    if not isinstance(new, int) or new < 1:
        raise BadRequest('"max_new_tokens" must be a positive integer')
    if len(tokens) + new > _STATE["context"]:
        raise BadRequest(f"prompt ({len(tokens)} tokens) + max_new_tokens ({new}) exceeds the model's context "
                         f"({_STATE['context']}); shorten the prompt or lower max_new_tokens")
    search = {"max_length": len(tokens) + new,
              "repetition_penalty": _STATE["search"].get("repetition_penalty", 1.0),
              "no_repeat_ngram_size": _STATE["search"].get("no_repeat_ngram_size", 0)}
    temperature = float(request.get("temperature", 0) or 0)
    if temperature > 0:
        search.update(do_sample=True, temperature=temperature, top_p=float(request.get("top_p", 1.0)),
                      top_k=int(request.get("top_k", 50)))
    for key in ("repetition_penalty", "no_repeat_ngram_size"):
        if key in request:
            search[key] = request[key]
    params = og.GeneratorParams(_STATE["model"])
    params.set_search_options(**search)
    generator = og.Generator(_STATE["model"], params)
    started = time.perf_counter()
    generator.append_tokens(tokens)
    out, first = [], None
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
        first = first or time.perf_counter()
    ended = time.perf_counter()
    eos = set(getattr(tokenizer, "eos_token_ids", []) or [])
    finish = "stop" if out and out[-1] in eos else "length"
    text = tokenizer.decode([t for t in out if t not in eos])
    rate = (len(out) - 1) / (ended - first) if len(out) > 1 and ended > first else None
    return {"text": text, "prompt_tokens": len(tokens), "completion_tokens": len(out), "finish_reason": finish,
            "latency_ms": round((ended - started) * 1000, 1), "decode_tokens_per_s": round(rate, 1) if rate else None}


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
