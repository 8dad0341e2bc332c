"""Gemma 3 through every stage, on a tiny random Gemma 3 built in the test: transformers 5 nests its
rope settings per layer type, which the onnxruntime-genai builder reads flat, and onnxruntime-genai
0.18 sizes its sliding-window KV cache from max_length."""

import json

from ftl import manifest, metrics
from ftl.export import ExportConfig, export_onnx
from ftl.finetune import FinetuneConfig, finetune
from ftl.generate import OnnxChatModel
from ftl.models import import_model
from tiny import build_tiny_gemma3


def test_tiny_gemma3_imports_finetunes_exports_and_answers(tmp_path, qa_file):
    source = build_tiny_gemma3(tmp_path / "gemma-src")
    assert "full_attention" in json.loads((source / "config.json").read_text())["rope_parameters"]
    imported = import_model(str(source), name="gemma3-tiny")
    tuned = finetune(FinetuneConfig(model="gemma3-tiny", data=qa_file, output=tmp_path / "ft", max_steps=2,
                                    batch_size=2, save_steps=2))
    assert tuned.final_loss > 0
    exported = export_onnx(ExportConfig(adapter=tmp_path / "ft", output=tmp_path / "onnx"))
    layout = manifest.read(exported.output)["outputs"]["layout"]
    assert layout["tied"] and layout["head_bits"] == 8 and layout["body_bits"] == [4]
    assert manifest.read(exported.output)["inputs"]["base_model"]["path"] == str(imported.path.resolve())

    model = OnnxChatModel(exported.output)
    prompt = model.prompt_ids(model.format.conversation("Hi"))
    assert prompt[0] == json.loads((source / "config.json").read_text())["bos_token_id"]  # the prompt carries <bos>
    # A prompt and answer far shorter than the sliding window (32 here; 512 on the real 270M).
    assert len(prompt) + 2 < model.min_length
    answer = model.ask("Hi", max_new_tokens=2)
    assert answer.prompt_tokens == len(prompt) and answer.new_tokens <= 2  # the cache is the window, not the answer
    # Scoring a short text needs the window too (ftl eval and the benchmarks read logits this way).
    assert metrics.onnx_perplexity(exported.output, [prompt]) > 1
