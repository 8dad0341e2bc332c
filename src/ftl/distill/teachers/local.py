"""A local teacher: an exported ONNX folder (onnxruntime-genai) or an HF folder (transformers).

The offline default. Generation runs in a worker thread, one request at a time: a CPU model
gains nothing from concurrent calls.
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

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
            self._torch = AutoModelForCausalLM.from_pretrained(self.folder).eval()
            self._run = self._run_torch

    async def complete(self, messages, *, max_tokens, temperature, n) -> Completion:
        async with self._lock:
            return await asyncio.to_thread(self._run, messages, max_tokens, temperature, n)

    def _run_onnx(self, messages, max_tokens, temperature, n) -> Completion:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for _ in range(n):
            result = self._onnx.generate(messages, max_new_tokens=max_tokens, temperature=temperature)
            finish = "length" if result.new_tokens >= max_tokens else "stop"
            choices.append(Choice(result.text, finish))
            prompt_tokens, completion_tokens = result.prompt_tokens, completion_tokens + result.new_tokens
        return Completion(choices, prompt_tokens, completion_tokens)

    def _run_torch(self, messages, max_tokens, temperature, n) -> Completion:
        import torch

        ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        choices, completion_tokens = [], 0
        with torch.inference_mode():
            for _ in range(n):
                out = self._torch.generate(ids, max_new_tokens=max_tokens, pad_token_id=self._tokenizer.eos_token_id,
                                           **sampling)[0, ids.shape[1]:]
                new = out.tolist()
                ended = self._tokenizer.eos_token_id in new
                choices.append(Choice(self._tokenizer.decode(out, skip_special_tokens=True),
                                      "stop" if ended or len(new) < max_tokens else "length"))
                completion_tokens += len(new)
        return Completion(choices, ids.shape[1], completion_tokens)

    async def aclose(self) -> None:
        return None


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
