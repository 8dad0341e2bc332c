import pytest
from transformers import AutoTokenizer

from ftl.chat import PromptFormat, prompt_format_for
from ftl.errors import ConfigError, DataError


def test_chat_template_renders_like_transformers(tiny_model):
    fmt = prompt_format_for(tiny_model, system_prompt="Be brief.")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = fmt.conversation("What is 2 + 3?", "5.")
    assert fmt.render_example(messages, {}) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert fmt.render_prompt(messages[:-1]) == tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True)


def test_training_text_starts_with_the_inference_prompt(tiny_model):
    for fmt in (prompt_format_for(tiny_model),
                prompt_format_for(tiny_model, text_template="Q: {Question}\nA: {Answer}")):
        full = fmt.render_example(fmt.conversation("Why?", "Because."), {})
        prompt = fmt.render_prompt(fmt.conversation("Why?"))
        assert full.startswith(prompt) and full[len(prompt):].startswith("Because.")


def test_text_template_appends_eos_and_uses_row_fields(tiny_model):
    fmt = prompt_format_for(tiny_model, text_template="[{topic}] Q: {Question}\nA: {Answer}")
    text = fmt.render_example(fmt.conversation("Why?", "Because."), {"topic": "physics"})
    assert text == "[physics] Q: Why?\nA: Because.<|im_end|>"


@pytest.mark.parametrize("template,problem", [
    ("Q: {Question}", "must contain"),
    ("A: {Answer} Q: {Question}", "must end with"),
    ("Q: {Question A: {Answer}", "not a valid format string"),
])
def test_wrong_template_placeholders(tiny_model, template, problem):
    with pytest.raises(ConfigError, match=problem):
        prompt_format_for(tiny_model, text_template=template)


def test_row_missing_template_field_names_the_line(tiny_model):
    fmt = prompt_format_for(tiny_model, text_template="[{topic}] {Question} {Answer}")
    with pytest.raises(DataError) as info:
        fmt.check_text_template({"Question": "q", "Answer": "a"}, "data.jsonl:7")
    assert "data.jsonl:7" in str(info.value) and "'topic'" in str(info.value)


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
