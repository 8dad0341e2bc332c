"""End to end on the real SmolLM2-135M-Instruct, on CPU: import → finetune → int4 export → generate.

Minutes, not seconds; marked ``e2e`` so ``pytest -m "not e2e"`` gives the quick loop.
"""

import json

import pytest

from ftl import manifest, metrics
from ftl.eval import EvalConfig, evaluate
from ftl.export import ExportConfig, export_onnx
from ftl.finetune import FinetuneConfig, finetune
from ftl.generate import OnnxChatModel
from ftl.models import import_model
from conftest import REPO, write_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return import_model("smollm2-135m", models_dir=tmp_path_factory.mktemp("models")).path


def test_smollm2_finetune_export_generate(smollm2, tmp_path):
    from transformers import AutoTokenizer

    train = [json.loads(line) for line in (REPO / "data/quickstart/train.jsonl").read_text().splitlines()[:16]]
    held_out = [json.loads(line) for line in (REPO / "data/quickstart/test.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp_path / "train.jsonl", train)

    tuned = finetune(FinetuneConfig(model=str(smollm2), data=data, output=tmp_path / "ft", max_steps=3,
                                    batch_size=4, save_steps=3))
    assert tuned.rows == 16 and len(tuned.loss_curve) == 3 and tuned.final_loss > 0

    exported = export_onnx(ExportConfig(adapter=tmp_path / "ft", output=tmp_path / "onnx"))
    assert manifest.read(exported.output)["status"] == "complete"
    assert (exported.output / "model.onnx").is_file() and not list(exported.output.glob("*.onnx_adapter"))

    model = OnnxChatModel(exported.output)
    tokenizer = AutoTokenizer.from_pretrained(exported.output)
    question = "What is the capital of France?"
    messages = model.format.conversation(question)
    # The prompt ftl sends is the one transformers' chat template builds (and the one trained on).
    assert model.format.render_prompt(messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    answer = model.ask(question, max_new_tokens=32)
    assert answer.text.strip() and answer.new_tokens > 0
    assert type(model.model).__module__.startswith("onnxruntime_genai")

    fmt = model.format
    sequences = [tokenizer(fmt.render_example(fmt.conversation(r["Question"], r["Answer"])),
                           add_special_tokens=False)["input_ids"] for r in held_out]
    torch_ppl = metrics.torch_perplexity(metrics.load_merged_torch(smollm2, tmp_path / "ft" / "adapter"), sequences)
    onnx_ppl = metrics.onnx_perplexity(exported.output, sequences)
    print(f"perplexity on {len(sequences)} held-out Q/A: torch fp32 merged {torch_ppl:.3f}, "
          f"ONNX int4 {onnx_ppl:.3f}, ratio {onnx_ppl / torch_ppl:.3f}")
    assert onnx_ppl == pytest.approx(torch_ppl, rel=0.15)

    # ftl eval on the same pair: int4 moves the distributions, and the top choice now and then. A
    # sanity bound, not the quality target: on this GGUF-derived model k_quant int4 agrees on about
    # 0.77-0.80 of answer tokens (../shared/INT4.md, issue 16), so 0.8 failed by chance (0.799).
    result = evaluate(EvalConfig(models=[f"onnx:{exported.output}", f"torch:{tmp_path / 'ft'}"],
                                 data=str(REPO / "data/quickstart/test.jsonl"), limit=6, max_new_tokens=16,
                                 output=tmp_path / "eval"))
    onnx = result.summary["models"][f"onnx:{exported.output}"]
    assert onnx["quantization_source"] == f"torch:{tmp_path / 'ft'}"
    assert onnx["kl_divergence"] > 0 and onnx["top1_agreement"] > 0.7
    for name in ("detailed_results.json", "metrics_summary.json"):
        json.loads((tmp_path / "eval" / name).read_text())
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "eval" / "report.md").is_file()
