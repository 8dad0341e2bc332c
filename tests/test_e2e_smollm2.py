"""End to end on the real SmolLM2-135M-Instruct, on CPU: import → finetune → int4 export → generate.

Minutes, not seconds; marked ``e2e`` so ``pytest -m "not e2e"`` gives the quick loop.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ftl import manifest, metrics
from ftl.eval import EvalConfig, evaluate
from ftl.export import ExportConfig, export_onnx
from ftl.finetune import FinetuneConfig, finetune
from ftl.generate import OnnxChatModel
from conftest import REPO, write_jsonl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2_import(tmp_path_factory):
    """`ftl models import smollm2-135m` as a user runs it: (the folder, what it printed)."""
    models = tmp_path_factory.mktemp("models")
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "models", "import", "smollm2-135m", "--models-dir",
                          str(models)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return models / "smollm2-135m", out


@pytest.fixture(scope="module")
def smollm2(smollm2_import):
    return smollm2_import[0]


def test_importing_a_gguf_prints_one_line_per_step(smollm2_import):
    """transformers' own tqdm bar over the GGUF tensors does not reach a log or CI output."""
    _, out = smollm2_import
    printed = out.stdout + out.stderr
    assert "Converting and de-quantizing" not in printed and "it/s" not in printed, printed
    assert "imported in" in printed


@pytest.fixture(scope="module")
def tuned_export(smollm2, tmp_path_factory):
    """SmolLM2 fine-tuned for 3 steps on 16 quickstart rows, then exported int4: (folder, finetune, export)."""
    tmp_path = tmp_path_factory.mktemp("smollm2-e2e")
    train = [json.loads(line) for line in (REPO / "data/quickstart/train.jsonl").read_text().splitlines()[:16]]
    data = write_jsonl(tmp_path / "train.jsonl", train)
    tuned = finetune(FinetuneConfig(model=str(smollm2), data=data, output=tmp_path / "ft", max_steps=3,
                                    batch_size=4, save_steps=3))
    exported = export_onnx(ExportConfig(adapter=tmp_path / "ft", output=tmp_path / "onnx"))
    return tmp_path, tuned, exported


def test_smollm2_finetune_export_generate(smollm2, tuned_export, tiny_model):
    from transformers import AutoTokenizer

    tmp_path, tuned, exported = tuned_export
    held_out = [json.loads(line) for line in (REPO / "data/quickstart/test.jsonl").read_text().splitlines()]
    assert tuned.rows == 16 and len(tuned.loss_curve) == 3 and tuned.final_loss > 0
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
    # Peak memory, each model in a process of its own: its own figure (not the parent's, as once), the
    # ONNX one without torch, and a tiny model's share well under SmolLM2's.
    from ftl.eval.stage import _peak_rss

    torch_rss = result.summary["models"][f"torch:{tmp_path / 'ft'}"]
    assert onnx["peak_rss_mib"] < torch_rss["peak_rss_mib"]
    tiny = _peak_rss(f"torch:{tiny_model}")
    print(f"peak RSS MiB (model share): SmolLM2 torch {torch_rss['peak_rss_mib']} ({torch_rss['model_rss_mib']}), "
          f"SmolLM2 int4 {onnx['peak_rss_mib']} ({onnx['model_rss_mib']}), tiny {tiny['peak_rss_mib']} "
          f"({tiny['model_rss_mib']})")
    assert tiny["model_rss_mib"] < torch_rss["model_rss_mib"] / 2
    for name in ("detailed_results.json", "metrics_summary.json"):
        json.loads((tmp_path / "eval" / name).read_text())
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "eval" / "report.md").is_file()


def test_deploy_local_serves_score_py_under_the_real_inference_server(tuned_export, tmp_path):
    """ftl deploy --target local: the endpoint's score.py under azureml-inference-server-http (in the
    environment ftl builds for it), on 127.0.0.1, answering from the SmolLM2 int4 export."""
    pytest.importorskip("azure.ai.ml", reason="the [azure] extra is not installed")
    _, _, exported = tuned_export
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ftl.cli", "deploy", str(exported.output), "--target", "local",
                               "--port", str(port), "--threads", "2", "--max-new-tokens", "16"], cwd=tmp_path,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "250"})
    try:
        deadline = time.time() + 300  # the server's environment is built on first use (about 20 s here)
        while time.time() < deadline and server.poll() is None:
            try:
                if urllib.request.urlopen(url + "/", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        assert server.poll() is None, server.stdout.read()
        sample = json.loads((exported.output.with_name("onnx.deploy") / "sample-request.json").read_text())
        answer = _post(url + "/score", json.dumps(sample).encode())
        assert answer[0] == 200, answer
        body = answer[1]
        assert body["text"].strip() and 0 < body["completion_tokens"] <= sample["max_new_tokens"]
        assert body["prompt_tokens"] > 0 and body["finish_reason"] in ("stop", "length")
        assert _post(url + "/score", b"{not json")[0] == 400
        # The deployment's cap (--max-new-tokens) holds a long ask to 16 tokens; a prompt past the context is a 400.
        status, capped = _post(url + "/score", json.dumps({"question": "x", "max_new_tokens": 4000}).encode())
        assert status == 200 and capped["max_new_tokens"] == 16 and capped["completion_tokens"] <= 16
        status, error = _post(url + "/score", json.dumps({"question": "x " * 9000}).encode())
        assert status == 400 and "exceeds the model's context" in error["error"]
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=90)[0]
    assert server.returncode == 0, output
    assert f"POST {url}/score" in output
    with pytest.raises(ConnectionRefusedError):  # the server is gone with ftl
        socket.create_connection(("127.0.0.1", port), timeout=5)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_ftl_serve_streams_smollm2_stops_on_a_disconnect_and_teaches_ftl_distill(tuned_export, tmp_path, monkeypatch):
    """ftl serve over the SmolLM2 int4 export: the openai client streamed and not; a client that goes
    away mid-stream stops its generation; and ftl distill, pointed at it, gets its answers."""
    from openai import OpenAI

    from ftl.distill import DistillConfig, distill
    from test_serve import http, running

    _, _, exported = tuned_export
    with running(exported.output) as (url, app):
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model="onnx", messages=messages, max_tokens=24)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="onnx", messages=messages, max_tokens=24, stream=True))
        assert whole.choices[0].message.content.strip() and streamed == whole.choices[0].message.content
        # Ask for 600 tokens (several seconds here), read a few, hang up.
        stream = client.chat.completions.create(model="onnx", max_tokens=600, stream=True, messages=[
            {"role": "user", "content": "Write a very long story about a lighthouse keeper."}])
        for _, _ in zip(range(3), stream):
            pass
        stream.close()
        deadline = time.time() + 20
        while time.time() < deadline and app.state.scheduler.depth() != (0, 0):
            time.sleep(0.1)
        assert app.state.scheduler.depth() == (0, 0)
        _, _, page = http(url + "/metrics")
        assert 'ftl_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0' in page
        completion = [line for line in page.splitlines() if line.startswith('ftl_tokens_total{kind="completion"}')]
        assert float(completion[0].split()[-1]) < 24 * 2 + 300  # the 600-token story stopped early

        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"question": q} for q in (
            "What is the capital of Italy?", "Name a primary colour.", "What is 2 + 2?")])
        result = distill(DistillConfig(seeds=str(seeds), output="qa.jsonl", teacher="openai", base_url=url + "/v1",
                                       model="onnx", max_tokens=160, concurrency=2))
    rows = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    assert result.answered == len(rows) >= 2 and all(r["Answer"].strip() for r in rows)
