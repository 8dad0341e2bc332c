import json
import subprocess
import sys

from ftl.generate import OnnxChatModel


def test_generate_streams_tokens_with_the_training_prompt(tiny_export):
    model = OnnxChatModel(tiny_export)
    question = "What is the capital of France?"
    expected_prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert model.format.render_prompt(model.format.conversation(question)) == expected_prompt
    stats = {}
    pieces = list(model.stream(model.format.conversation(question), max_new_tokens=8, stats=stats))
    assert stats["new_tokens"] >= 1 and stats["prompt_tokens"] == len(model.encode(expected_prompt))
    assert stats["ttft_s"] > 0 and len(pieces) <= 8


def test_generate_cli_json(tiny_export):
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "generate", str(tiny_export), "Hello?", "--json",
                          "--max-new-tokens", "4"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["new_tokens"] >= 1 and result["prompt_tokens"] > 0


def test_chat_repl_keeps_history(tiny_export):
    session = "What is 2 + 3?\nAnd again?\n/exit\n"
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "chat", str(tiny_export), "--max-new-tokens", "3"],
                         input=session, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("model> ") == 2
