import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ftl import manifest
from ftl.errors import DeviceError, ModelNotFoundError, OutputExistsError
from ftl.finetune import FinetuneConfig, finetune
from ftl.models import model_identity
from conftest import QA, write_jsonl


def test_finetune_writes_adapter_and_manifest_with_loss(tiny_finetune, qa_file, tiny_model):
    record = manifest.read(tiny_finetune)
    assert record["status"] == "complete"
    assert (tiny_finetune / "adapter" / "adapter_model.safetensors").is_file()
    assert record["inputs"]["base_model"]["sha256"] == model_identity(tiny_model)["sha256"]
    assert record["inputs"]["data"]["sha256"] == manifest.sha256_file(qa_file)
    assert record["metrics"]["rows"] == len(QA) and record["metrics"]["tokens"] > 0
    curve = record["metrics"]["loss_curve"]
    assert [p["step"] for p in curve] == [1, 2, 3, 4]
    assert all(p["loss"] > 0 for p in curve) and record["metrics"]["final_loss"] == curve[-1]["loss"]
    assert record["versions"]["olive-ai"] and record["timings"]["seconds"] > 0
    assert record["prompt_format"]["kind"] == "chat"
    assert not (tiny_finetune / ".olive-cache").exists()


def test_every_row_is_trained_on_past_olives_256_cap(tiny_model, tmp_path):
    # 300 rows at batch 30 is 10 steps an epoch; Olive's 256-sample cap would make it 9, and
    # joining rows into windows would make it far fewer. The epoch counter at step 10 tells.
    rows = [{"Question": f"What is {i} + 1?", "Answer": f"{i} + 1 = {i + 1}."} for i in range(300)]
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    result = finetune(FinetuneConfig(model=str(tiny_model), data=data, output=tmp_path / "ft", max_steps=10,
                                     batch_size=30, save_steps=10))
    assert result.rows == 300
    assert result.loss_curve[-1]["step"] == 10 and result.loss_curve[-1]["epoch"] == pytest.approx(1.0)
    prepared = (tmp_path / "ft" / "train.prepared.jsonl").read_text().splitlines()
    assert len(prepared) == 300
    olive_config = json.loads((tmp_path / "ft" / "olive_config.json").read_text())
    data_config = olive_config["data_configs"][0]
    # One sample per row, answer-only labels: ftl's own Olive pre-process component.
    assert data_config["pre_process_data_config"] == {"type": "ftl_answer_only", "answer_only": True}
    assert data_config["user_script"].endswith("olive_data.py")
    assert 0 < result.answer_tokens < result.tokens


def test_the_lora_loss_covers_the_answers_only_unless_asked(tiny_model, qa_file, tmp_path):
    from transformers import AutoTokenizer

    from ftl.finetune.olive_data import ftl_answer_only
    from ftl.finetune.stage import _write_prepared, plan

    config = FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / "ft")
    p = plan(config)
    _write_prepared(tmp_path / "rows.jsonl", p)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    examples = ftl_answer_only(rows, str(tiny_model))  # what Olive's LoRA pass trains on
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for qa, example in zip(QA, examples):
        trained = tokenizer.decode(example["input_ids"][example["labels"] != -100].tolist())
        assert qa["Answer"] in trained and qa["Question"] not in trained
    assert p.answer_tokens == sum(int((e["labels"] != -100).sum()) for e in examples)
    whole = finetune(FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / "ft2", train_on_prompt=True),
                     save_config=tmp_path / "wf2.json")
    pre = json.loads((tmp_path / "wf2.json").read_text())["data_configs"][0]["pre_process_data_config"]
    assert pre["max_samples"] is None and pre["strategy"] == "line-by-line"
    assert whole.answer_tokens == whole.tokens


def test_rerun_with_same_inputs_is_skipped_and_finished_output_protected(tiny_model, qa_file, tiny_finetune):
    config = FinetuneConfig(model=str(tiny_model), data=qa_file, output=tiny_finetune, max_steps=4, batch_size=2,
                            save_steps=2, learning_rate=1e-2)
    assert finetune(config).skipped
    with pytest.raises(OutputExistsError, match="--force"):
        finetune(config.model_copy(update={"max_steps": 5}))


def test_save_config_writes_the_olive_workflow_without_training(tiny_model, qa_file, tmp_path):
    result = finetune(FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / "ft"),
                      save_config=tmp_path / "wf.json")
    workflow = json.loads((tmp_path / "wf.json").read_text())
    assert result.config_only and workflow["passes"]["lora"]["type"] == "FtlLoRA"
    assert workflow["passes"]["lora"]["training_args"]["logging_steps"] >= 1
    assert not (tmp_path / "ft" / "adapter").exists()


def test_qlora_without_cuda_is_refused_before_loading(tiny_model, qa_file, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="--method lora"):
        finetune(FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / "ft", method="qlora"))
    assert not (tmp_path / "ft").exists()


def test_missing_model_is_refused(qa_file, tmp_path):
    with pytest.raises(ModelNotFoundError):
        finetune(FinetuneConfig(model="nope", data=qa_file, output=tmp_path / "ft"))


def test_kill_9_mid_training_then_resume_from_checkpoint(tiny_model, tmp_path):
    rows = [{"Question": f"Count to {i}.", "Answer": " ".join(str(n) for n in range(i))} for i in range(1, 41)]
    data = write_jsonl(tmp_path / "count.jsonl", rows)
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "ftl.cli", "finetune", "--model", str(tiny_model), "--data", str(data),
           "--output", str(out), "--max-steps", "60", "--batch-size", "2", "--save-steps", "5"]
    process = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # ftl and its Olive child, as a hard kill would
    process.wait()
    killed_at = max(int(p.parent.name.split("-")[1])
                    for p in (out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert manifest.read(out)["status"] == "running"
    killed_log = (out / "olive.log").read_text()  # line-buffered: the killed run's lines are kept

    result = finetune(FinetuneConfig(model=str(tiny_model), data=data, output=out, max_steps=60, batch_size=2,
                                     save_steps=5))
    assert result.resumed and result.steps == 60
    assert manifest.read(out)["resumed_from"] == f"checkpoint-{killed_at}"
    # It went on from there: this run's log has a loss line (logging_steps 1) for each remaining step only.
    log = (out / "olive.log").read_text()
    assert log.startswith(killed_log)
    assert log[len(killed_log):].count("{'loss': ") == 60 - killed_at
    assert manifest.read(out)["status"] == "complete"
    assert [p["step"] for p in result.loss_curve][-1] == 60
