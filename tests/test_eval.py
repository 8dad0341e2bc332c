import json
import math

import pytest
import torch

from ftl.errors import DataError, OutputExistsError
from ftl.eval import EvalConfig, evaluate
from ftl.eval.stage import _final_number
from conftest import QA, write_jsonl


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_export, tiny_finetune, tiny_model, qa_file):
    out = tmp_path_factory.mktemp("eval") / "e1"
    result = evaluate(EvalConfig(models=[f"onnx:{tiny_export}", f"torch:{tiny_finetune}", f"torch:{tiny_model}"],
                                 data=str(qa_file), output=out, max_new_tokens=6))
    return result


def test_perplexity_equals_exp_mean_cross_entropy_of_the_answer(evaluated, tiny_finetune, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftl.chat import prompt_format_for

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      tiny_finetune / "adapter").merge_and_unload().eval()
    fmt = prompt_format_for(tiny_model)
    total, count = 0.0, 0
    for row in QA:
        messages = fmt.conversation(row["Question"], row["Answer"])
        prompt = tokenizer(fmt.render_prompt(messages[:-1]), add_special_tokens=False)["input_ids"]
        full = tokenizer(fmt.render_example(messages), add_special_tokens=False)["input_ids"]
        labels = torch.tensor([[-100] * len(prompt) + full[len(prompt):]])
        with torch.no_grad():
            loss = model(torch.tensor([full]), labels=labels).loss  # mean CE over the answer tokens
        answer_tokens = len(full) - len(prompt)
        total, count = total + loss.item() * answer_tokens, count + answer_tokens
    expected = math.exp(total / count)
    got = evaluated.summary["models"][f"torch:{tiny_finetune}"]["perplexity_answer"]
    assert got == pytest.approx(expected, rel=1e-4)


def test_onnx_is_compared_with_its_pytorch_source(evaluated, tiny_export, tiny_finetune):
    onnx = evaluated.summary["models"][f"onnx:{tiny_export}"]
    assert onnx["quantization_source"] == f"torch:{tiny_finetune}"
    assert onnx["kl_divergence"] > 0 and 0 <= onnx["top1_agreement"] <= 1
    assert onnx["threads"] >= 1 and onnx["ttft_ms"]["p50"] <= onnx["latency_ms"]["p50"]


def test_every_output_file_is_written_and_parses(evaluated):
    out = evaluated.output
    details = json.loads((out / "detailed_results.json").read_text())
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert len(details["samples"]) == len(QA) and details["hardware"]
    assert summary["versions"]["onnxruntime-genai"] and len(summary["models"]) == 3
    assert (out / "report.md").read_text().startswith("# ftl eval")
    assert "<table>" in (out / "report.html").read_text()
    for png in ("latency.png", "tokens_per_s.png", "ppl_delta.png", "rouge_delta.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_rouge_is_scored_with_stemming_and_summarised_as_the_mean(evaluated):
    from ftl.eval.stage import rouge_scorer, rouge_scores

    scorer = rouge_scorer()
    # "cat sits" vs "the cats sit": 2 of 2 and 2 of 3 unigrams match, only with stemming → F1 = 0.8.
    assert rouge_scores(scorer, "the cats sit", "cat sits")["rouge1"] == pytest.approx(0.8)
    assert rouge_scores(scorer, "a b c d", "a b")["rouge2"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    details = json.loads((evaluated.output / "detailed_results.json").read_text())["samples"]
    for label, stats in evaluated.summary["models"].items():
        per_sample = [rouge_scores(scorer, d["reference"], d["models"][label]["answer"]) for d in details]
        for key in ("rouge1", "rouge2", "rougeL"):
            assert [d["models"][label][key] for d in details] == pytest.approx([p[key] for p in per_sample])
            assert stats[key] == pytest.approx(sum(p[key] for p in per_sample) / len(per_sample))


def test_compare_with_an_earlier_run(evaluated, tiny_finetune, qa_file, tmp_path):
    result = evaluate(EvalConfig(models=[f"torch:{tiny_finetune}"], data=str(qa_file), output=tmp_path / "e2",
                                 max_new_tokens=4, memory=False,
                                 compare=evaluated.output / "metrics_summary.json"))
    ppl = next(c for c in result.comparison if c["metric"] == "perplexity_answer")
    assert ppl["change"] == pytest.approx(0, abs=1e-6)


def test_bad_inputs(tmp_path, tiny_model, evaluated, qa_file):
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="empty"):
        evaluate(EvalConfig(models=[f"torch:{tiny_model}"], data=str(empty), output=tmp_path / "x"))
    no_ref = write_jsonl(tmp_path / "noref.jsonl", [{"Question": "q?"}])
    with pytest.raises(DataError, match="reference"):
        evaluate(EvalConfig(models=[f"torch:{tiny_model}"], data=str(no_ref), output=tmp_path / "x"))
    with pytest.raises(OutputExistsError, match="--force"):
        evaluate(EvalConfig(models=[f"torch:{tiny_model}"], data=str(qa_file), output=evaluated.output))


def test_force_with_a_typo_keeps_the_old_report(tmp_path, tiny_model, qa_file):
    from ftl.errors import ConfigError, ModelNotFoundError

    out = tmp_path / "report"
    evaluate(EvalConfig(models=[f"torch:{tiny_model}"], data=str(qa_file), output=out, max_new_tokens=2,
                        memory=False, limit=2))
    before = sorted(p.name for p in out.iterdir())
    for typo in (f"torhc:{tiny_model}", f"onnx:{tiny_model}", "torch:no/such/model"):
        with pytest.raises((ConfigError, ModelNotFoundError)):
            evaluate(EvalConfig(models=[typo], data=str(qa_file), output=out, force=True))
    assert sorted(p.name for p in out.iterdir()) == before and (out / "report.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left behind
    evaluate(EvalConfig(models=[f"torch:{tiny_model}"], data=str(qa_file), output=out, max_new_tokens=2,
                        memory=False, limit=1, force=True))
    assert json.loads((out / "metrics_summary.json").read_text())["samples"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_gsm8k_final_number():
    assert _final_number("so she has 10 + 2 = 12 apples.\n#### 12") == "12"
    assert _final_number("The answer is 1,024.") == "1024"


def test_different_tokenizers_compare_per_byte(tmp_path, tiny_model, qa_file):
    from tiny import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other-vocab", vocab_size=400)
    result = evaluate(EvalConfig(models=[f"torch:{tiny_model}", f"torch:{other}"], data=str(qa_file),
                                 output=tmp_path / "e", max_new_tokens=2, memory=False, limit=2))
    assert result.summary["tokenizers_agree"] is False
    assert all(m["perplexity_answer"] is None and m["nll_per_byte"] > 0 for m in result.summary["models"].values())
    assert "different tokenizers" in (tmp_path / "e" / "report.md").read_text()


def test_batched_answers_and_logits_are_each_samples_own(tiny_export, tiny_finetune, tiny_model):
    """The batches eval (and the local distil teacher) use give every sample what it gets alone: the
    greedy answer (ONNX padded on the right, PyTorch on the left) and the logits (padded, masked)."""
    import numpy as np

    from ftl.distill.teachers.local import LocalTeacher
    from ftl.eval.models import load
    from ftl.eval.stage import _ids

    rows = QA[:4]
    assert len({len(r["Question"]) for r in rows}) > 1  # prompts of different lengths: padding is exercised
    for spec in (f"onnx:{tiny_export}", f"torch:{tiny_finetune}"):
        model = load(spec)
        conversations = [model.format.conversation(r["Question"]) for r in rows]
        assert model.generate_batch(conversations, 8) == [model.generate(c, 8).text for c in conversations]
        sequences = [_ids(model, {"question": r["Question"], "reference": r["Answer"]})[0] for r in rows]
        for batched, alone in zip(model.logits_batch(sequences), [model.logits(s) for s in sequences]):
            assert batched.shape == alone.shape and np.allclose(batched, alone, atol=1e-4)
    teacher = LocalTeacher(tiny_model)
    conversations = [[{"role": "user", "content": r["Question"]}] for r in rows]
    together = teacher._run_torch_batch(conversations, 8, 0.0, 1)
    alone = [teacher._run_torch(c, 8, 0.0, 1) for c in conversations]
    assert [c.choices[0].text for c in together] == [c.choices[0].text for c in alone]
    assert [c.prompt_tokens for c in together] == [c.prompt_tokens for c in alone]
    # greedy with n > 1: the one answer n times (transformers refuses n greedy sequences)
    twice = teacher._run_torch_batch(conversations[:2], 8, 0.0, 2)
    assert [[ch.text for ch in c.choices] for c in twice] == [[c.choices[0].text] * 2 for c in alone[:2]]

    # a request that gives up (a timeout cancels it) leaves the batch: the others are still answered
    import asyncio

    async def ask_all():
        tasks = [asyncio.create_task(teacher.complete(c, max_tokens=8, temperature=0.0, n=1)) for c in conversations]
        await asyncio.sleep(0)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    answered = asyncio.run(ask_all())
    assert isinstance(answered[1], asyncio.CancelledError)
    assert [answered[i].choices[0].text for i in (0, 2, 3)] == [alone[i].choices[0].text for i in (0, 2, 3)]
