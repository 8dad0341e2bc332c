"""A thin, fast chat model over onnxruntime-genai.

The prompt is built by the :class:`~ftl.chat.PromptFormat` recorded in the export manifest (or,
for a folder ftl did not write, from its own chat template), so inference sends the very prompt
the model was fine-tuned on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ftl import manifest
from ftl.chat import Message, PromptFormat, prompt_format_for
from ftl.errors import ConfigError, ModelNotFoundError


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else 0.0


def default_threads() -> int:
    """CPU cores this process may use (container limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _stop_ids(folder: Path) -> set[int]:
    eos = json.loads((Path(folder) / "genai_config.json").read_text()).get("model", {}).get("eos_token_id", [])
    return set(eos if isinstance(eos, list) else [eos])


def load_og_model(folder: Path, threads: int | None = None):
    """An ``onnxruntime_genai.Model`` with an explicit intra-op thread count.

    Left unset, onnxruntime-genai decoded SmolLM2 int4 at ~100 tok/s on a 2-core machine here;
    with the thread count set to the cores available, ~140 tok/s. A value already in
    genai_config.json wins unless ``threads`` is given.
    """
    import onnxruntime_genai as og

    config_path = Path(folder) / "genai_config.json"
    session = json.loads(config_path.read_text()).get("model", {}).get("decoder", {}).get("session_options", {})
    if threads is None and "intra_op_num_threads" in session:
        return og.Model(str(folder)), session["intra_op_num_threads"]
    threads = threads or default_threads()
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config), threads


class OnnxChatModel:
    def __init__(self, folder: Path, adapter: Path | None = None, system_prompt: str | None = None,
                 threads: int | None = None):
        import onnxruntime_genai as og

        folder = Path(folder)
        if not (folder / "genai_config.json").is_file():
            raise ModelNotFoundError("not an onnxruntime-genai folder (no genai_config.json)", str(folder),
                                     "give the output folder of `ftl export-onnx`")
        record = manifest.read(folder) or {}
        self.folder = folder
        self.format = PromptFormat(**record["prompt_format"]) if record.get("prompt_format") else \
            prompt_format_for(folder)
        if system_prompt is not None:
            self.format = self.format.model_copy(update={"system_prompt": system_prompt})
        self._og = og
        self.model, self.threads = load_og_model(folder, threads)
        self.stop_ids = _stop_ids(folder)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = None
        adapter = adapter or _bundled_adapter(folder, record)
        if adapter:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter), "default")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self.encode(self.format.render_prompt(messages))

    def stream(self, messages: list[Message], *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stats: dict | None = None) -> Iterator[str]:
        """Yield text pieces as tokens arrive. ``stats`` (if given) receives timing and counts."""
        og = self._og
        ids = self.prompt_ids(messages)
        params = og.GeneratorParams(self.model)
        options = {"max_length": len(ids) + max_new_tokens}
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            options.update(do_sample=False)
        params.set_search_options(**options)
        started = time.perf_counter()
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "default")
        generator.append_tokens(ids)
        decoder = self.tokenizer.create_stream()
        new_tokens, ttft = 0, None
        while not generator.is_done():
            generator.generate_next_token()
            token = generator.get_next_tokens()[0]
            new_tokens += 1
            if ttft is None:
                ttft = time.perf_counter() - started
            if generator.is_done() and token in self.stop_ids:
                break
            yield decoder.decode(token)
        if stats is not None:
            stats.update(prompt_tokens=len(ids), new_tokens=new_tokens, ttft_s=ttft or 0.0,
                         total_s=time.perf_counter() - started)

    def generate(self, messages: list[Message], **kwargs) -> Generation:
        stats: dict = {}
        text = "".join(self.stream(messages, stats=stats, **kwargs))
        return Generation(text=text, **stats)

    def ask(self, question: str, **kwargs) -> Generation:
        return self.generate(self.format.conversation(question), **kwargs)


def _bundled_adapter(folder: Path, record: dict) -> Path | None:
    name = record.get("outputs", {}).get("adapter_file")
    if not name:
        return None
    path = folder / name
    if not path.is_file():
        raise ConfigError("the export's adapter file is missing", str(path), "re-run ftl export-onnx")
    return path
