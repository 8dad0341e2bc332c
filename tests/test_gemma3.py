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
    # The int4 graph computes the merged PyTorch model's function, rope thetas included; scoring a text
    # shorter than the window needs the window too (ftl eval and the benchmarks read logits this way).
    import numpy as np
    import onnxruntime_genai as og

    ids = [int(i) for i in prompt] * 3
    onnx = metrics.onnx_logits(og.Model(str(exported.output)), ids, model.min_length)
    reference = metrics.torch_logits(metrics.load_merged_torch(imported.path, tmp_path / "ft" / "adapter"), ids)
    assert np.corrcoef(onnx.ravel(), reference.ravel())[0, 1] > 0.9


def test_a_text_template_on_a_bos_model_carries_bos(tmp_path):
    """transformers 5 drops add_bos_token on save; the tokenizer's post-processor still says it."""
    from ftl.chat import prompt_format_for
    from tokenizers import processors
    from transformers import AutoTokenizer

    source = build_tiny_gemma3(tmp_path / "gemma")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(source)
    fmt = prompt_format_for(source, text_template="Q: {Question}\nA: {Answer}")
    assert fmt.bos_first and fmt.render_prompt(fmt.conversation("Hi")).startswith("<bos>Q: Hi")
    assert fmt.render_example(fmt.conversation("Hi", "Hello.")).startswith("<bos>Q: Hi\nA: Hello.")
