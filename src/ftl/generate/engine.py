"""A thin, fast chat model over onnxruntime-genai.

The prompt is built by the :class:`~ftl.chat.PromptFormat` recorded in the export manifest (or,
for a folder ftl did not write, from its own chat template), so inference sends the very prompt
the model was fine-tuned on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ftl import manifest
from ftl.chat import Message, PromptFormat, find_stop, partial_stop, prompt_format_for
from ftl.errors import ConfigError, ModelNotFoundError
from ftl.system import decode_rate, default_threads

log = logging.getLogger(__name__)

# Why a model answers a batch one conversation at a time (OnnxChatModel.can_batch is False).
UNBATCHED = ("onnxruntime-genai cannot batch prompts of different lengths for a model with a sliding-window KV "
             "cache (Gemma 3): its answers are computed one at a time")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int  # the answer's tokens; the end-of-sequence step is not one of them
    ttft_s: float
    total_s: float  # until the last answer token arrived
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float | None:
        return decode_rate(self.new_tokens, self.ttft_s, self.total_s)


def _genai_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "genai_config.json").read_text())


def check_folder(folder: Path) -> dict:
    """An onnxruntime-genai folder's genai_config.json, once the model file it names is there too:
    og itself reports a missing one only as a RuntimeError from deep in its loader. (A copy of an
    export's small files, such as MLflow keeps, has the config without the model.)"""
    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise ModelNotFoundError("not an onnxruntime-genai folder (no genai_config.json)", str(folder),
                                 "give the output folder of `ftl export-onnx`")
    config = _genai_config(folder)
    name = config.get("model", {}).get("decoder", {}).get("filename") or "model.onnx"
    if not (folder / name).is_file():
        raise ModelNotFoundError(f"the model file {name} named by genai_config.json is missing", str(folder / name),
                                 "give the whole export folder, or run `ftl export-onnx` again")
    return config


def kv_window(folder: Path) -> int:
    """The sliding window a folder's KV cache must hold at least (0 without one): onnxruntime-genai
    0.18 refuses a max_length below it (Gemma 3: 512)."""
    return _window(_genai_config(folder).get("model", {}))


def _window(model_config: dict) -> int:
    window = model_config.get("decoder", {}).get("sliding_window") or {}
    # A window no layer uses (og 0.18 writes Phi-4-mini's 262144 with "layers": []) constrains nothing:
    # taken as a minimum it would make every prompt ask for the whole 131072-token context, a 34 GB
    # KV cache (og accepts a short max_length there; measured).
    if window.get("layers") == []:
        return 0
    return int(window.get("window_size") or 0)


def load_og_model(folder: Path, threads: int | None = None):
    """An ``onnxruntime_genai.Model`` with an explicit intra-op thread count.

    Left unset, onnxruntime-genai uses the physical cores, which is 1 on some VMs; ftl passes
    :func:`ftl.system.default_threads`. A value already in genai_config.json wins unless
    ``threads`` is given.
    """
    import onnxruntime_genai as og

    session = _genai_config(folder).get("model", {}).get("decoder", {}).get("session_options", {})
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
        model_config = check_folder(folder).get("model", {})  # read once: stop ids, context, window
        record = manifest.read(folder)
        record = record if manifest.is_ftl(record) else {}
        check_runtime(folder, record)
        self.folder = folder
        recorded = record.get("prompt_format")
        self.format = PromptFormat(**recorded) if recorded else prompt_format_for(folder)
        if system_prompt is not None:
            self.format = self.format.model_copy(update={"system_prompt": system_prompt})
        self._og = og
        self.model, self.threads = load_og_model(folder, threads)
        eos = model_config.get("eos_token_id", [])
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.context_length = int(model_config.get("context_length") or 2048)
        # og 0.18 sizes a sliding-window model's KV cache from max_length, and refuses one smaller
        # than the window (Gemma 3: 512), so a short prompt still asks for at least the window.
        self.min_length = _window(model_config)
        self.tokenizer = og.Tokenizer(self.model)
        # Whether og can batch prompts of different lengths: not with a sliding-window KV cache. og 0.18's
        # builder gives those layers a window-sized ring cache (GroupQueryAttention sliding_window_cache),
        # which a padded batch breaks: padded on the right, the prompt step fails ("seqlens_k[0] = 13 is too
        # small for sequence_length 20", Gemma 3 270M); on the left, it runs, but answers leave what each
        # prompt gets alone once the batch outgrows the window; og's Engine pads the same way. The config
        # says which layers have the cache, so no probe is needed (tests/test_families.py checks both ways).
        self.can_batch = not self.min_length
        self._said_unbatched = False
        self.adapters = None
        adapter = adapter or _bundled_adapter(folder, record)
        if adapter:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter), "default")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    @property
    def bos_token(self) -> str:
        return self.format.special_tokens.get("bos_token", "")

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self.encode(self.format.render_prompt(messages))


    def fit(self, messages: list[Message], max_new_tokens: int) -> tuple[list[Message], int]:
        """Drop the oldest user/assistant turns (never the system prompt or the last question) until
        the prompt plus ``max_new_tokens`` fits the context. Returns the messages and turns dropped."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        dropped = 0
        while len(turns) > 1 and len(self.prompt_ids(system + turns)) + max_new_tokens > self.context_length:
            turns = turns[2:] if len(turns) > 2 else turns[-1:]
            dropped += 1
        return system + turns, dropped

    def check_fits(self, ids: list[int], max_new_tokens: int) -> None:
        if len(ids) + max_new_tokens > self.context_length:
            raise ConfigError(f"the prompt has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it "
                              f"exceeds the model's {self.context_length}-token context", str(self.folder),
                              "shorten the prompt or lower --max-new-tokens")

    def stream(self, messages: list[Message], *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stats: dict | None = None, search: dict | None = None,
               repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        """Yield text pieces as tokens arrive: one per answer token (empty while it may begin a stop
        string), then whatever was held back. ``stats`` (if given) receives timing and counts.
        ``search``: og search options over the folder's own defaults (genai_config.json "search",
        where the export writes the repetition settings it measured best). ``stop``: strings that end
        the answer and are not part of it (default: the prompt format's, a text template's next turn)."""
        og = self._og
        ids = self.prompt_ids(messages)
        self.check_fits(ids, max_new_tokens)
        params = og.GeneratorParams(self.model)
        options = {"max_length": min(self.context_length, max(len(ids) + max_new_tokens, self.min_length))}
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            options.update(do_sample=False)
        search = dict(search or {})
        for key, value in (("repetition_penalty", repetition_penalty), ("no_repeat_ngram_size", no_repeat_ngram_size)):
            if value is not None:  # an explicit setting wins; None leaves the folder's default
                search[key] = value
        options.update({k: v for k, v in search.items() if v is not None})
        params.set_search_options(**options)
        started = time.perf_counter()
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "default")
        generator.append_tokens(ids)
        answer = Answer(self.tokenizer.create_stream(), self._stops(stop))
        first = None
        while not generator.is_done() and not answer.ended(max_new_tokens):  # max_length may exceed it (window)
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            now = time.perf_counter() - started
            first = now if first is None else first
            if generator.is_done() and token in self.stop_ids:
                break  # the end-of-sequence step is not an answer token (see ftl.system.decode_rate)
            yield answer.add(token, now)
        rest = answer.flush()
        if rest:
            yield rest
        if stats is not None:
            stats.update(prompt_tokens=len(ids), new_tokens=len(answer.ids), ttft_s=first or 0.0,
                         token_ids=answer.ids, total_s=answer.last_s if answer.ids else (first or 0.0))

    def generate(self, messages: list[Message], **kwargs) -> Generation:
        stats: dict = {}
        text = "".join(self.stream(messages, stats=stats, **kwargs))
        return Generation(text=text, **stats)

    def generate_batch(self, conversations: list[list[Message]], *, max_new_tokens: int = 256,
                       search: dict | None = None, stop: list[str] | None = None) -> list[Generation]:
        """Greedy answers to several conversations as one og batch (prompts padded on the right, which
        og 0.18 masks: each row's answer is the one it gets alone, tests/test_families.py). The times are
        the batch's. About 2x the tokens/s of one by one at 4 rows on 2 cores (bench/serve.py). A model
        og cannot batch (:attr:`can_batch`) answers one at a time, and says so once."""
        import numpy as np

        og = self._og
        if len(conversations) == 1 or not self.can_batch:
            if len(conversations) > 1 and not self._said_unbatched:
                log.warning("%s (%s)", UNBATCHED, self.folder)
                self._said_unbatched = True
            return [self.generate(messages, max_new_tokens=max_new_tokens, search=search, stop=stop)
                    for messages in conversations]
        prompts = [self.prompt_ids(messages) for messages in conversations]
        for ids in prompts:
            self.check_fits(ids, max_new_tokens)
        longest = max(len(ids) for ids in prompts)
        params = og.GeneratorParams(self.model)
        params.set_search_options(**{k: v for k, v in (search or {}).items() if v is not None}, do_sample=False,
                                  batch_size=len(prompts), max_length=min(self.context_length, max(
                                      longest + max_new_tokens, self.min_length)))
        started = time.perf_counter()
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "default")
        generator.append_tokens(np.array([ids + [self.pad_id] * (longest - len(ids)) for ids in prompts],
                                         dtype=np.int32))
        stops = self._stops(stop)
        answers = [Answer(self.tokenizer.create_stream(), stops) for _ in prompts]
        live, first = [True] * len(prompts), None
        while any(live) and not generator.is_done():
            generator.generate_next_token()
            now = time.perf_counter() - started
            first = now if first is None else first
            for row, token in enumerate(generator.get_next_tokens()):
                if not live[row]:
                    continue
                if int(token) in self.stop_ids:
                    live[row] = False
                    continue
                answers[row].add(int(token), now)
                live[row] = not answers[row].ended(max_new_tokens)
        return [Generation(answer.text, len(prompt), len(answer.ids), first or 0.0,
                           answer.last_s if answer.ids else (first or 0.0), answer.ids)
                for answer, prompt in zip(answers, prompts)]

    def _stops(self, stop: list[str] | None) -> list[str]:
        return self.format.stop_strings if stop is None else [s for s in stop if s]

    @property
    def pad_id(self) -> int:
        """The token that pads a batch's shorter prompts: the tokenizer's pad token, else an end-of-sequence id."""
        if not hasattr(self, "_pad_id"):
            pad = _genai_config(self.folder).get("model", {}).get("pad_token_id")
            self._pad_id = int(pad if pad is not None else min(self.stop_ids))
        return self._pad_id

    def ask(self, question: str, **kwargs) -> Generation:
        return self.generate(self.format.conversation(question), **kwargs)


def check_runtime(folder: Path, record: dict) -> None:
    """Refuse a folder built by a newer onnxruntime-genai than the one installed: its config can
    hold keys this runtime does not know (e.g. 0.18's Gemma folders and "cache_slack" on 0.14)."""
    from importlib import metadata

    from packaging.version import Version

    if record.get("stage") != "export":
        return
    built = (record.get("outputs") or {}).get("built_with_onnxruntime_genai") or \
        (record.get("versions") or {}).get("onnxruntime-genai")
    installed = metadata.version("onnxruntime-genai")
    if built and Version(built) > Version(installed):
        raise ModelNotFoundError(f"built by onnxruntime-genai {built}, newer than the installed {installed}",
                                 str(folder), f"pip install onnxruntime-genai=={built}, or export it again here")


def _bundled_adapter(folder: Path, record: dict) -> Path | None:
    name = record.get("outputs", {}).get("adapter_file")
    if not name:
        return None
    path = folder / name
    if not path.is_file():
        raise ConfigError("the export's adapter file is missing", str(path), "re-run ftl export-onnx")
    return path


class Answer:
    """One answer as its tokens arrive: the text up to the first stop string, the ids of the tokens
    that made it, and how much of it may be shown (the tail that could begin a stop string waits)."""

    def __init__(self, decoder, stops: list[str]):
        self.decoder, self.stops = decoder, stops
        self.longest = max((len(stop) for stop in stops), default=0)
        self.text, self.sent, self.stopped = "", 0, False
        self.ids: list[int] = []
        self.starts: list[int] = []  # where each token's text begins
        self.times: list[float] = []  # when each token arrived

    def add(self, token: int, now: float) -> str:
        """Take one token; return the text it makes safe to show."""
        before = len(self.text)
        self.ids.append(token)
        self.starts.append(before)
        self.times.append(now)
        self.text += self.decoder.decode(token)
        tail = max(0, before - self.longest + 1)  # a stop string ending before this token was found before
        cut = find_stop(self.text[tail:], self.stops)
        if cut is None:
            return self._show(len(self.text) - partial_stop(self.text, self.stops))
        self.stopped, self.text = True, self.text[:tail + cut]
        # The answer's tokens are those whose text begins before the stop string.
        self.ids = [t for t, start in zip(self.ids, self.starts) if start < len(self.text)]
        return self._show(len(self.text))

    @property
    def last_s(self) -> float:
        """When the last answer token arrived (0 before any)."""
        return self.times[len(self.ids) - 1] if self.ids else 0.0

    def ended(self, max_new_tokens: int) -> bool:
        return self.stopped or len(self.ids) >= max_new_tokens

    def flush(self) -> str:
        """What was held back for a stop string that never came."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece
