"""One home for prompt formatting, so training prompts are exactly the prompts inference sends.

``ftl finetune`` renders every training row through a :class:`PromptFormat`, stores the format in
its manifest, and ``ftl export-onnx`` / ``ftl generate`` read it back from there. The chat template
is rendered with the same Jinja settings transformers uses for ``apply_chat_template`` (checked in
the tests), but without importing transformers, so ``ftl generate`` starts fast on an edge box.
"""

from __future__ import annotations

import json
import string
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from ftl.errors import ConfigError, DataError

# A plain fallback for base models that ship no chat template (e.g. gemma3-270m base).
DEFAULT_TEXT_TEMPLATE = "### Question:\n{Question}\n\n### Answer:\n{Answer}"

Message = dict[str, str]


class PromptFormat(BaseModel):
    """How a conversation becomes model text: the model's chat template, or a str.format template."""

    kind: Literal["chat", "text"]
    chat_template: str | None = None
    text_template: str | None = None
    question_field: str = "Question"
    answer_field: str = "Answer"
    system_prompt: str | None = None
    special_tokens: dict[str, str] = {}

    @property
    def eos_token(self) -> str:
        return self.special_tokens.get("eos_token", "")

    # -- training ---------------------------------------------------------------------------
    def render_example(self, messages: list[Message], row: dict) -> str:
        """Full training text for one row: prompt, answer and end-of-turn marker."""
        if self.kind == "chat":
            return _render_chat(self.chat_template, messages, False, self.special_tokens)
        values = {**row, self.question_field: messages_question(messages), self.answer_field: messages[-1]["content"]}
        return self.text_template.format(**values) + self.eos_token

    # -- inference ---------------------------------------------------------------------------
    def render_prompt(self, messages: list[Message]) -> str:
        """Prompt text for the next assistant turn, exactly as training saw it before the answer."""
        if self.kind == "chat":
            return _render_chat(self.chat_template, messages, True, self.special_tokens)
        head = self.text_template.split("{" + self.answer_field + "}", 1)[0]
        text = ""
        turns = [m for m in messages if m["role"] != "system"]
        for user, assistant in zip(turns[0::2], turns[1::2]):
            text += self.text_template.format(
                **{self.question_field: user["content"], self.answer_field: assistant["content"]}
            ) + self.eos_token
        return text + head.format(**{self.question_field: turns[-1]["content"]})

    def conversation(self, question: str, answer: str | None = None) -> list[Message]:
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def check_text_template(self, row: dict, where: str) -> None:
        missing = [f for f in template_fields(self.text_template) if f not in row]
        if missing:
            raise DataError(
                f"row has no field {missing[0]!r} that --text-template uses",
                where,
                f"fields present: {', '.join(sorted(row)) or 'none'}; fix the template or the data",
            )


def messages_question(messages: list[Message]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise ConfigError(f"--text-template is not a valid format string: {exc}", None,
                          "use {Field} placeholders and double braces {{ }} for literal braces") from exc


def read_tokenizer_info(model_dir: Path) -> tuple[str | None, dict[str, str]]:
    """The chat template and special tokens a saved HF tokenizer declares."""
    model_dir = Path(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value:
            tokens[key] = value
    return template, tokens


def prompt_format_for(
    model_dir: Path,
    *,
    text_template: str | None = None,
    question_field: str = "Question",
    answer_field: str = "Answer",
    system_prompt: str | None = None,
) -> PromptFormat:
    """The model's own chat template unless a text template is given or the model has none."""
    chat_template, tokens = read_tokenizer_info(model_dir)
    if text_template is None and chat_template:
        return PromptFormat(kind="chat", chat_template=chat_template, question_field=question_field,
                            answer_field=answer_field, system_prompt=system_prompt, special_tokens=tokens)
    if text_template is None:
        text_template = DEFAULT_TEXT_TEMPLATE.replace("{Question}", "{" + question_field + "}").replace(
            "{Answer}", "{" + answer_field + "}")
    fields = template_fields(text_template)
    if answer_field not in fields or question_field not in fields:
        raise ConfigError(
            f"--text-template must contain {{{question_field}}} and {{{answer_field}}}",
            f"template: {text_template!r}",
            "add both placeholders, or map your fields with --question-field/--answer-field",
        )
    if not text_template.rstrip().endswith("{" + answer_field + "}"):
        raise ConfigError(
            f"--text-template must end with {{{answer_field}}}",
            f"template: {text_template!r}",
            "the answer is what the model learns to generate, so it comes last",
        )
    return PromptFormat(kind="text", text_template=text_template, question_field=question_field,
                        answer_field=answer_field, system_prompt=system_prompt, special_tokens=tokens)


@lru_cache(maxsize=8)
def _compile(template: str):
    # Same environment as transformers' apply_chat_template, so both render identically.
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _render_chat(template: str, messages: list[Message], add_generation_prompt: bool, tokens: dict) -> str:
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
