import json
import re
import shutil
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


def _chat(folder, session: str, *options):
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "chat", str(folder), *options], input=session,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    prompts = [int(n) for n in re.findall(r"from a (\d+)-token prompt", out.stderr)]
    return out, prompts


def test_chat_repl_keeps_history(tiny_export):
    model = OnnxChatModel(tiny_export)
    first_turn = len(model.prompt_ids(model.format.conversation("What is 2 + 3?")))
    out, prompts = _chat(tiny_export, "What is 2 + 3?\nWhat is 2 + 3?\n/exit\n", "--max-new-tokens", "3")
    assert out.stdout.count("model> ") == 2 and len(prompts) == 2
    # The same question twice: the second prompt holds the first turn, its answer and the question again.
    assert prompts[0] == first_turn and prompts[1] > 2 * first_turn - 2


def test_chat_drops_the_oldest_turns_when_the_context_is_full_and_says_so(tiny_export, tmp_path):
    small = tmp_path / "small-context"
    shutil.copytree(tiny_export, small)
    config = json.loads((small / "genai_config.json").read_text())
    config["model"]["context_length"] = 64
    (small / "genai_config.json").write_text(json.dumps(config))
    question = "Name three primary colours."
    out, prompts = _chat(small, f"{question}\n" * 5 + "/exit\n", "--max-new-tokens", "8")
    assert out.stdout.count("model> ") == 5 and "dropped the" in out.stderr and "64-token context" in out.stderr
    assert all(p + 8 <= 64 for p in prompts)


def test_generate_refuses_a_prompt_longer_than_the_context(tiny_export):
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "generate", str(tiny_export), "word " * 600],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "context" in out.stderr and "Traceback" not in out.stderr
