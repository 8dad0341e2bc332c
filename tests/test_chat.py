import pytest
from transformers import AutoTokenizer

from ftl.chat import PromptFormat, prompt_format_for
from ftl.errors import ConfigError, DataError


def test_chat_template_renders_like_transformers(tiny_model):
    fmt = prompt_format_for(tiny_model, system_prompt="Be brief.")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = fmt.conversation("What is 2 + 3?", "5.")
    assert fmt.render_example(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert fmt.render_prompt(messages[:-1]) == tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True)


def test_training_text_starts_with_the_inference_prompt(tiny_model):
    for fmt in (prompt_format_for(tiny_model),
                prompt_format_for(tiny_model, text_template="Q: {Question}\nA: {Answer}")):
        full = fmt.render_example(fmt.conversation("Why?", "Because."))
        prompt = fmt.render_prompt(fmt.conversation("Why?"))
        assert full.startswith(prompt) and full[len(prompt):].startswith("Because.")


def test_text_template_appends_eos(tiny_model):
    fmt = prompt_format_for(tiny_model, text_template="Q: {Question}\nA: {Answer}")
    assert fmt.render_example(fmt.conversation("Why?", "Because.")) == "Q: Why?\nA: Because.<|im_end|>"


@pytest.mark.parametrize("template,problem", [
    ("Q: {Question}", "must contain"),
    ("A: {Answer} Q: {Question}", "must end with"),
    ("Q: {Question A: {Answer}", "not a valid format string"),
    ("[{topic}] Q: {Question}\nA: {Answer}", "inference cannot fill"),
    ("{} Q: {Question}\nA: {Answer}", "inference cannot fill"),
])
def test_wrong_template_placeholders(tiny_model, template, problem):
    with pytest.raises(ConfigError, match=problem):
        prompt_format_for(tiny_model, text_template=template)


CONVERSATIONS = [
    {"Question": "What is 2 + 3?", "Answer": "5."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why?"},
                  {"role": "assistant", "content": "Because."}]},
]


@pytest.mark.parametrize("text_template", [None, "Q: {Question}\nA: {Answer}"], ids=["chat", "text"])
@pytest.mark.parametrize("system_prompt", [None, "You are helpful."], ids=["no-system", "system"])
def test_inference_prompt_is_the_training_prefix_byte_for_byte(tiny_model, tmp_path, text_template, system_prompt):
    """What finetune trains on, cut before the last answer, is exactly what generate/chat/eval send."""
    from conftest import write_jsonl
    from ftl.data import load_examples

    fmt = prompt_format_for(tiny_model, text_template=text_template, system_prompt=system_prompt)
    for example in load_examples(write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS), system_prompt=system_prompt):
        fmt.check_messages(example.messages, "d.jsonl")
        history, answer = example.messages[:-1], example.messages[-1]["content"]
        if "Question" in example.row:  # what ftl generate / eval build for a one-turn question
            history = fmt.conversation(example.row["Question"])
        training, prompt = fmt.render_example(example.messages), fmt.render_prompt(history)
        assert training[:len(prompt)] == prompt
        assert training[len(prompt):].startswith(answer)
        own_system = example.row.get("messages", [{}])[0].get("role") == "system"
        expected_system = "Be terse." if own_system else system_prompt
        if expected_system:
            assert expected_system in prompt


def test_system_prompt_reaches_chat_rows_and_text_templates(tiny_model, tmp_path):
    from conftest import write_jsonl
    from ftl.data import load_examples

    rows = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS[1:2])
    example = load_examples(rows, system_prompt="Be kind.")[0]
    assert example.messages[0] == {"role": "system", "content": "Be kind."}
    fmt = prompt_format_for(tiny_model, text_template="Q: {Question}\nA: {Answer}", system_prompt="Be kind.")
    assert fmt.render_example(example.messages).startswith("Be kind.\n\nQ: Hi\nA: Hello.<|im_end|>Q: What is")
    assert fmt.render_prompt(fmt.conversation("Why?")) == "Be kind.\n\nQ: Why?\nA: "


def test_text_template_refuses_turns_it_cannot_pair(tiny_model):
    fmt = prompt_format_for(tiny_model, text_template="Q: {Question}\nA: {Answer}")
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
             {"role": "assistant", "content": "c"}]
    with pytest.raises(DataError, match="pairs") as info:
        fmt.check_messages(twice, "d.jsonl:3")
    assert "d.jsonl:3" in str(info.value)


def test_model_without_chat_template_falls_back_to_text(tiny_model, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = (bare / "tokenizer_config.json")
    import json
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    fmt = prompt_format_for(bare)
    assert fmt.kind == "text" and "{Question}" in fmt.text_template
    assert PromptFormat(**fmt.model_dump()) == fmt
