"""A local teacher: an exported ONNX folder (onnxruntime-genai) or an HF folder (transformers).

The offline default. Generation runs in a worker thread, one call at a time: a CPU model gains
nothing from concurrent calls. A PyTorch teacher answers the requests that wait together (up to
``--concurrency``) as one batched ``generate``, prompts padded on the left: on 2 cores 8 questions
take about as long as two asked one by one (bench/distill.py). An ONNX teacher answers them in turn.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ftl.distill.teachers.base import Choice, Completion, register
from ftl.errors import ConfigError


class LocalTeacher:
    name = "local"

    def __init__(self, folder: Path):
        self.model = str(folder)
        self.folder = Path(folder)
        self._lock = asyncio.Lock()
        if (self.folder / "genai_config.json").is_file():
            from ftl.generate import OnnxChatModel

            self._onnx = OnnxChatModel(self.folder)
            self._run = self._run_onnx
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, padding_side="left")
            if self._tokenizer.pad_token_id is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
            self._torch = AutoModelForCausalLM.from_pretrained(self.folder, dtype="float32").eval()
            self._run = self._run_torch
            self._queue: dict[tuple, list] = {}
            self._drainer: asyncio.Task | None = None
            eos = self._torch.generation_config.eos_token_id
            # every id that ends an answer: the generation config's (several for some models) and the tokenizer's
            self._stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {
                self._tokenizer.eos_token_id}

    async def complete(self, messages, *, max_tokens, temperature, n) -> Completion:
        if self._run != self._run_torch:
            async with self._lock:
                return await asyncio.to_thread(self._run, messages, max_tokens, temperature, n)
        # Batched: queue the request; one drain task answers what waits together, batch by batch. The
        # caller awaits only its own answer, so a caller that gives up (a timeout) takes nothing else down.
        future = asyncio.get_running_loop().create_future()
        self._queue.setdefault((max_tokens, temperature, n), []).append((messages, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            key = next(iter(self._queue))
            batch = [(m, f) for m, f in self._queue.pop(key) if not f.done()]
            if not batch:
                continue
            try:
                answers = await asyncio.to_thread(self._run_torch_batch, [m for m, _ in batch], *key)
            except Exception as exc:  # every request of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), answer in zip(batch, answers):
                    if not future.done():
                        future.set_result(answer)

    def _run_onnx(self, messages, max_tokens, temperature, n) -> Completion:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for _ in range(n):
            result = self._onnx.generate(messages, max_new_tokens=max_tokens, temperature=temperature)
            finish = "length" if result.new_tokens >= max_tokens else "stop"
            choices.append(Choice(result.text, finish))
            prompt_tokens, completion_tokens = result.prompt_tokens, completion_tokens + result.new_tokens
        return Completion(choices, prompt_tokens, completion_tokens)

    def _run_torch(self, messages, max_tokens, temperature, n) -> Completion:
        return self._run_torch_batch([messages], max_tokens, temperature, n)[0]

    def _run_torch_batch(self, conversations, max_tokens, temperature, n) -> list[Completion]:
        import torch

        prompts = self._tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        encoded = self._tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampled = temperature > 0
        sampling = {"do_sample": True, "temperature": temperature} if sampled else {"do_sample": False}
        returned = n if sampled else 1  # greedy gives one answer (transformers refuses n > 1 without sampling)
        with torch.inference_mode():
            out = self._torch.generate(**encoded, max_new_tokens=max_tokens, pad_token_id=self._tokenizer.pad_token_id,
                                       num_return_sequences=returned, **sampling)[:, encoded["input_ids"].shape[1]:]
        completions = []
        for row, mask in enumerate(encoded["attention_mask"]):
            choices, completion_tokens = [], 0
            answers = out[row * returned:(row + 1) * returned].tolist()
            for new in answers * (n // returned):
                end = next((i for i, token in enumerate(new) if token in self._stops), None)
                ended = end is not None
                new = new[:end + 1] if ended else new  # a shorter row's padding is not part of its answer
                choices.append(Choice(self._tokenizer.decode(new, skip_special_tokens=True),
                                      "stop" if ended or len(new) < max_tokens else "length"))
                completion_tokens += len(new)
            completions.append(Completion(choices, int(mask.sum()), completion_tokens))
        return completions

    async def aclose(self) -> None:
        if getattr(self, "_drainer", None) is not None and not self._drainer.done():
            self._drainer.cancel()


@register("local")
def create_local(config) -> LocalTeacher:
    from ftl.models import resolve_model

    if not config.model:
        raise ConfigError("the local teacher needs a model", "--model",
                          "give an exported ONNX folder, an HF folder, or a name under models/")
    path = Path(config.model)
    if (path / "genai_config.json").is_file():
        return LocalTeacher(path)
    return LocalTeacher(resolve_model(config.model))
