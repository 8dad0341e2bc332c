"""The models ``ftl eval`` compares, behind one small interface: logits for token ids, and a
timed greedy generation. ``onnx:PATH`` is an exported onnxruntime-genai folder; ``torch:PATH`` an
HF folder, a finetune output folder, or a bare peft adapter folder (base found from the manifest
or adapter_config.json)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftl import manifest
from ftl.chat import PromptFormat, find_stop, prompt_format_for
from ftl.errors import ConfigError
from ftl.lineage import (adapter_dir_of, base_of_adapter, base_of_qscale, export_source, prompt_format_record,
                         qscale_of, require_base)
from ftl.system import default_threads, folder_size_mb


@dataclass
class Timed:
    text: str
    new_tokens: int
    ttft_s: float
    total_s: float


class EvalModel:
    label: str
    kind: str
    path: Path
    format: PromptFormat
    tokenizer_dir: Path
    lineage: dict  # base sha256 + adapter sha256: which PyTorch model an ONNX export came from
    threads: int
    can_batch = True  # False: generate_batch answers one at a time (ftl.generate.engine.UNBATCHED)

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def generate(self, messages: list[dict], max_new_tokens: int) -> Timed:
        raise NotImplementedError

    def logits_batch(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Every position's logits for each sequence; one by one unless the kind batches."""
        return [self.logits(ids) for ids in sequences]

    def generate_batch(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        """Greedy answers to several conversations together (untimed): the quality columns' answers."""
        return [self.generate(m, max_new_tokens).text for m in conversations]

    def size_mb(self) -> float:
        """The model's files on disk (ftl.system.folder_size_mb), the same measure for every kind."""
        return folder_size_mb(*self.files)


class OnnxEvalModel(EvalModel):
    kind = "onnx"

    def __init__(self, path: Path):
        from ftl.generate import OnnxChatModel

        self.path, self.label = path, f"onnx:{path}"
        self.chat = OnnxChatModel(path)
        self.format, self.tokenizer_dir, self.threads = self.chat.format, path, self.chat.threads
        self.can_batch = self.chat.can_batch
        self.lineage = export_source(manifest.read(path) or {})
        self.files = [path]

    def logits(self, ids):
        from ftl.metrics import onnx_logits

        return onnx_logits(self.chat.model, ids, self.chat.min_length)

    def generate(self, messages, max_new_tokens):
        result = self.chat.generate(messages, max_new_tokens=max_new_tokens)
        return Timed(result.text, result.new_tokens, result.ttft_s, result.total_s)

    def generate_batch(self, conversations, max_new_tokens):
        return [g.text for g in self.chat.generate_batch(conversations, max_new_tokens=max_new_tokens)]


class TorchEvalModel(EvalModel):
    kind = "torch"

    def __init__(self, path: Path):
        import torch

        from ftl.metrics import load_merged_torch
        from ftl.models import model_identity

        self.path, self.label = path, f"torch:{path}"
        base, adapter = torch_parts(path)
        # The same cores as onnxruntime-genai gets, so the latency columns compare like with like.
        torch.set_num_threads(default_threads())
        grid = qscale_of(path)
        if grid:  # a qscale fine-tune: the base's codes with the trained scales, an int4 model in PyTorch
            from ftl.quant.qscale import load_model

            self.model, adapter = load_model(base, grid), grid
        else:
            self.model = load_merged_torch(base, adapter)
        self.base = base
        recorded = prompt_format_record(path) or (prompt_format_record(adapter.parent) if adapter else None)
        self.format = PromptFormat(**recorded) if recorded else prompt_format_for(base)
        from transformers import AutoTokenizer

        self.tokenizer_dir = base
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.lineage = {"base": model_identity(base)["sha256"],
                        "adapter": _sha256(adapter) if adapter else None}
        self.threads = torch.get_num_threads()
        self.files = [base, adapter]

    def logits(self, ids):
        from ftl.metrics import torch_logits

        return torch_logits(self.model, ids)

    def logits_batch(self, sequences):
        """One forward pass for the batch, padded on the right and masked: each row's logits are its own."""
        import torch

        width = max(len(ids) for ids in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()
        return [logits[row, :len(seq)] for row, seq in enumerate(sequences)]

    def generate_batch(self, conversations, max_new_tokens):
        """HF generate on the merged model, greedy, prompts padded on the left."""
        import torch

        if len(conversations) == 1:
            return [self.generate(conversations[0], max_new_tokens).text]
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(stops)
        encoded = _left_pad(self.tokenizer, [self.format.render_prompt(m) for m in conversations], pad)
        from transformers import GenerationConfig

        # Plain argmax, as generate() above: not the model's own generation_config (some carry a
        # repetition penalty that HF applies even to greedy decoding).
        greedy = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stops) or None,
                                  pad_token_id=pad, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                  stop_strings=self.format.stop_strings or None)
        with torch.inference_mode():
            out = self.model.generate(**encoded, generation_config=greedy, tokenizer=self.tokenizer)
        texts = []
        for row in out[:, encoded["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self._before_stop(self.tokenizer.decode(row[:cut], skip_special_tokens=True)))
        return texts

    def _before_stop(self, text: str) -> str:
        """The answer ends where a stop string (a text template's next turn) begins, as in ONNX generation."""
        cut = find_stop(text, self.format.stop_strings)
        return text if cut is None else text[:cut]

    def generate(self, messages, max_new_tokens):
        import torch

        ids = torch.tensor([self.tokenizer(self.format.render_prompt(messages), add_special_tokens=False)["input_ids"]])
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        out_ids = []
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.model(ids, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            ttft = last = time.perf_counter() - started
            past = out.past_key_values
            while token not in stops and len(out_ids) < max_new_tokens:
                out_ids.append(token)
                last = time.perf_counter() - started
                if len(out_ids) == max_new_tokens or self._stopped(out_ids):
                    break
                out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        return Timed(self._before_stop(self.tokenizer.decode(out_ids, skip_special_tokens=True)), len(out_ids), ttft,
                     last)

    def _stopped(self, ids: list[int]) -> bool:
        """Whether a stop string has formed in the last tokens (the longest needs at most its length in tokens)."""
        longest = max((len(s) for s in self.format.stop_strings), default=0)
        return bool(longest) and find_stop(self.tokenizer.decode(ids[-longest:], skip_special_tokens=True),
                                           self.format.stop_strings) is not None


def _left_pad(tokenizer, prompts: list[str], pad: int) -> dict:
    import torch

    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    return {"input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}


def _sha256(path: Path) -> str:
    return manifest.sha256_file(path) if path.is_file() else manifest.sha256_dir(path)


def torch_parts(path: Path) -> tuple[Path, Path | None]:
    """(base model folder, adapter folder or None) for a torch:PATH spec."""
    from ftl.models import resolve_model

    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        return path, None
    grid = qscale_of(path)
    if grid:
        base = base_of_qscale(grid)
        if not base:
            raise ConfigError("cannot tell the qscale fine-tune's base model", str(path),
                              "use the finetune output folder with its manifest.json")
        return resolve_model(base), None
    adapter = adapter_dir_of(path)
    base = base_of_adapter(adapter)
    if not base:
        raise ConfigError("cannot tell the adapter's base model", str(path), "use a finetune output folder")
    return resolve_model(require_base(adapter, None)), adapter


def check_spec(spec: str) -> tuple[str, Path]:
    """Validate a model spec without loading any weights: its kind, its path, its files."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("onnx", "torch"):
        raise ConfigError(f"model spec {spec!r} needs a kind", "--model", "use onnx:PATH or torch:PATH")
    target = Path(path)
    if not target.exists():
        from ftl.models import resolve_model

        target = resolve_model(path)
    if kind == "onnx":
        from ftl.generate.engine import check_folder

        check_folder(target)
    if kind == "torch":
        torch_parts(target)
    return kind, target


def load(spec: str) -> EvalModel:
    kind, target = check_spec(spec)
    return OnnxEvalModel(target) if kind == "onnx" else TorchEvalModel(target)
