import json
import re
import shutil
import subprocess
import sys

import pytest

from ftl.chat import DEFAULT_TEXT_TEMPLATE, find_stop, partial_stop
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


TARGET_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def text_template_export(tmp_path_factory, tiny_model, qa_file, session_cwd):
    """The tiny Llama trained on the default text template, prompt included, until it answers and then
    runs on into a turn of its own (``…Paris.\\n\\n### Answer:\\n…``), as Gemma 3 270M does after 4 steps."""
    from conftest import working_directory
    from ftl.export import ExportConfig, export_onnx
    from ftl.finetune import FinetuneConfig, finetune

    runs = tmp_path_factory.mktemp("text-template")
    with working_directory(session_cwd):
        finetune(FinetuneConfig(model=str(tiny_model), data=[qa_file], output=runs / "ft", max_steps=150, batch_size=6,
                                save_steps=150, learning_rate=1e-2, train_on_prompt=True, target_modules=TARGET_ALL,
                                text_template=DEFAULT_TEXT_TEMPLATE))
        export_onnx(ExportConfig(adapter=runs / "ft", output=runs / "onnx"))
    return runs


def test_a_text_template_model_stops_at_its_next_turn(text_template_export):
    from conftest import QA
    from ftl.eval.models import load

    model = OnnxChatModel(text_template_export / "onnx")
    stops = model.format.stop_strings
    assert stops == ["### Question:", "### Answer:"]  # the default template's head, read from the template
    conversations = [model.format.conversation(row["Question"]) for row in QA]
    raw = [model.generate(c, max_new_tokens=40, stop=[]).text for c in conversations]
    ran_on = [text for text in raw if find_stop(text, stops) is not None]
    assert len(ran_on) >= 3, raw  # the model does generate its next turn: the stops below are exercised

    for conversation, unstopped in zip(conversations, raw):
        stats = {}
        pieces = list(model.stream(conversation, max_new_tokens=40, stats=stats))
        text = "".join(pieces)
        cut = find_stop(unstopped, stops)
        # nothing of a stop string is ever shown, not even a first "#" while it may still be forming: the
        # pieces add up to the text before it (what was held back for one that never came is shown at the end)
        assert text == (unstopped if cut is None else unstopped[:cut])
        assert find_stop(text, stops) is None and stats["new_tokens"] <= 40
        assert model.generate(conversation, max_new_tokens=40).text == text
    stopped = [model.generate(c, max_new_tokens=40).text for c in conversations]
    assert [g.text for g in model.generate_batch(conversations, max_new_tokens=40)] == stopped

    # eval's answers, ONNX and PyTorch (the fine-tune merged), end there too
    for spec in (f"onnx:{text_template_export / 'onnx'}", f"torch:{text_template_export / 'ft'}"):
        evaluated = load(spec)
        answers = evaluated.generate_batch(conversations, 40) + [evaluated.generate(c, 40).text for c in conversations]
        assert not [a for a in answers if find_stop(a, stops) is not None], (spec, answers)

    # the commands a user runs: generate and chat print the answer without the next turn
    out = subprocess.run([sys.executable, "-m", "ftl.cli", "generate", str(text_template_export / "onnx"),
                          QA[0]["Question"], "--max-new-tokens", "40"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == stopped[0].strip() and "###" not in out.stdout
    chat, _ = _chat(text_template_export / "onnx", f"{QA[0]['Question']}\n/exit\n", "--max-new-tokens", "40")
    assert stopped[0].strip() in chat.stdout and "###" not in chat.stdout


def test_partial_stop_holds_back_only_what_could_begin_a_stop_string():
    stops = ["### Question:", "### Answer:"]
    assert partial_stop("Paris.\n##", stops) == 2 and partial_stop("Paris.\n### Ans", stops) == 7
    assert partial_stop("Paris. #1", stops) == 0 and partial_stop("", stops) == 0
    assert find_stop("a ### Answer: b ### Question:", stops) == 2 and find_stop("a ## b", stops) is None


def test_a_text_template_stops_only_at_words_an_answer_is_unlikely_to_hold():
    from ftl.chat import PromptFormat

    def stops(template):
        return PromptFormat(kind="text", text_template=template).stop_strings

    assert stops("### Question:\n{Question}\n\n### Answer:\n{Answer}") == ["### Question:", "### Answer:"]
    assert stops("Question: {Question}\nAnswer:{Answer}") == ["Question:", "Answer:"]
    assert stops("Q: {Question}\nA: {Answer}") == [] and stops("{Question} = {Answer}") == []  # "Plan A: …", "x = 5"


def test_a_folder_without_the_model_file_its_config_names_is_a_one_line_error(tiny_export, tmp_path, qa_file):
    """The copy MLflow keeps of an export's small files has genai_config.json but no model.onnx: ftl says
    which file is missing before og tries to load it (og's own message is a RuntimeError from its loader)."""
    small = tmp_path / "small-files"
    shutil.copytree(tiny_export, small, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"))
    renamed = tmp_path / "renamed"  # the file name comes from genai_config.json's decoder section
    shutil.copytree(tiny_export, renamed)
    config = json.loads((renamed / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "decoder.onnx"
    (renamed / "genai_config.json").write_text(json.dumps(config))
    for folder, name in ((small, "model.onnx"), (renamed, "decoder.onnx")):
        for command in (["generate", str(folder), "Hello?"],
                        ["eval", "--model", f"onnx:{folder}", "--data", str(qa_file), "--output", str(tmp_path / "e")]):
            out = subprocess.run([sys.executable, "-m", "ftl.cli", *command], capture_output=True, text=True)
            errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]  # eval's "→ evaluating" aside
            assert out.returncode == 1 and len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]), out.stderr
            assert errors[0].startswith(f"error: the model file {name} named by genai_config.json is missing "
                                        f"({folder / name})"), errors[0]
    assert not (tmp_path / "e").exists()
