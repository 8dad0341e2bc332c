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

from pydantic import BaseModel, ConfigDict

from ftl.errors import ConfigError, DataError

# A plain fallback for base models that ship no chat template (e.g. gemma3-270m base).
DEFAULT_TEXT_TEMPLATE = "### Question:\n{Question}\n\n### Answer:\n{Answer}"

Message = dict[str, str]


class PromptFormat(BaseModel):
    """How a conversation becomes model text: the model's chat template, or a str.format template.

    The contract: for every conversation, the training text is the inference prompt of everything
    before the last answer, followed by that answer. :meth:`render_example` is built from
    :meth:`render_prompt` for text templates, so the two cannot drift apart; for chat templates
    both come from the model's own template, with and without the generation prompt.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["chat", "text"]
    chat_template: str | None = None
    text_template: str | None = None
    question_field: str = "Question"
    answer_field: str = "Answer"
    system_prompt: str | None = None
    special_tokens: dict[str, str] = {}
    # Text templates on models whose tokenizer adds <bos> (Gemma): onnxruntime-genai's tokenizer does
    # not add it and training tokenises without special tokens, so the rendered text carries it.
    bos_first: bool = False

    @property
    def eos_token(self) -> str:
        return self.special_tokens.get("eos_token", "")

    @property
    def stop_strings(self) -> list[str]:
        """Text that ends an answer beyond the model's end tokens: a text template's next turn, i.e. the
        literal words of its head (``### Question:`` and ``### Answer:`` for the default template).

        A briefly trained model often skips the end token and runs on into a turn of its own (Gemma 3
        270M, 4 steps: ``…Paris.### Question:What is…``, or ``…Paris.\n\n### Answer:`` here), so
        either word starts one. Whitespace around them is dropped: the answer ends where they begin.
        Only words an answer is unlikely to hold stop it: at least 4 characters with a letter among them
        (``Q: {Question}\nA: {Answer}`` gets none, or "Plan A: …" would be cut at "A:"). A chat template
        needs none: its end of turn is a special token, which stops as an end token."""
        if self.kind != "text":
            return []
        head = self.text_template.split("{" + self.answer_field + "}", 1)[0]
        words = [literal.strip() for literal, _, _, _ in string.Formatter().parse(head)]
        return list(dict.fromkeys(w for w in words if len(w) >= 4 and any(c.isalpha() for c in w)))

    def conversation(self, question: str, answer: str | None = None) -> list[Message]:
        """A one-turn conversation, with the system prompt the model was trained with."""
        messages = [{"role": "user", "content": question}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return with_system(messages, self.system_prompt)

    # -- inference ---------------------------------------------------------------------------
    def render_prompt(self, messages: list[Message]) -> str:
        """Prompt text for the next assistant turn: ``messages`` end with the user's turn."""
        if self.kind == "chat":
            return _render_chat(self.chat_template, messages, True, self.special_tokens)
        system, turns = _split_system(messages)
        text = self.special_tokens.get("bos_token", "") if self.bos_first else ""
        text += f"{system}\n\n" if system else ""
        for user, assistant in zip(turns[0:-1:2], turns[1:-1:2]):
            text += self._head(user["content"]) + self._tail(assistant["content"])
        return text + self._head(turns[-1]["content"])

    # -- training ----------------------------------------------------------------------------
    def render_example(self, messages: list[Message]) -> str:
        """Training text: the prompt for everything before the last answer, then the answer."""
        if self.kind == "chat":
            return _render_chat(self.chat_template, messages, False, self.special_tokens)
        return self.render_prompt(messages[:-1]) + self._tail(messages[-1]["content"])

    def check_messages(self, messages: list[Message], where: str) -> None:
        """A text template renders strict user/assistant pairs; anything else cannot be trained
        the way it will be prompted."""
        if self.kind != "text":
            return
        _, turns = _split_system(messages)
        roles = [m["role"] for m in turns]
        expected = ["user", "assistant"] * (len(roles) // 2)
        if roles != expected or any(m["role"] == "system" for m in turns):
            raise DataError("with --text-template, a conversation must be one optional system message, then "
                            "user/assistant turns in pairs", where, "fix the roles, or train with the chat template")

    def _head(self, question: str) -> str:
        head = self.text_template.split("{" + self.answer_field + "}", 1)[0]
        return head.format(**{self.question_field: question})

    def _tail(self, answer: str) -> str:
        tail = "{" + self.answer_field + "}" + self.text_template.split("{" + self.answer_field + "}", 1)[1]
        return tail.format(**{self.answer_field: answer}) + self.eos_token


def with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Add the system prompt unless the conversation brings its own: the same rule for Q/A rows,
    chat rows and inference."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
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
    check_text_template(text_template, question_field, answer_field)
    return PromptFormat(kind="text", text_template=text_template, question_field=question_field,
                        answer_field=answer_field, system_prompt=system_prompt, special_tokens=tokens,
                        bos_first=bool(_adds_bos(model_dir) and tokens.get("bos_token")))


def check_text_template(text_template: str, question_field: str = "Question", answer_field: str = "Answer") -> None:
    """A text template inference can fill: both placeholders once each, nothing else, answer last.
    Needs no model, so a pipeline checks it before any stage runs."""
    fields = template_fields(text_template)
    if answer_field not in fields or question_field not in fields:
        raise ConfigError(
            f"--text-template must contain {{{question_field}}} and {{{answer_field}}}",
            f"template: {text_template!r}",
            "add both placeholders, or map your fields with --question-field/--answer-field",
        )
    extra = [f for f in fields if f not in (question_field, answer_field)]
    if extra or fields.count(question_field) > 1 or fields.count(answer_field) > 1:
        name = extra[0] if extra else (question_field if fields.count(question_field) > 1 else answer_field)
        raise ConfigError(
            f"--text-template uses {{{name}}}, which inference cannot fill",
            f"template: {text_template!r}",
            f"use {{{question_field}}} and {{{answer_field}}} once each; put other row fields into the question",
        )
    if not text_template.rstrip().endswith("{" + answer_field + "}"):
        raise ConfigError(
            f"--text-template must end with {{{answer_field}}}",
            f"template: {text_template!r}",
            "the answer is what the model learns to generate, so it comes last",
        )


def _adds_bos(model_dir: Path) -> bool:
    """Whether the HF tokenizer puts <bos> first: tokenizer_config's flag, or (transformers 5 drops
    that flag on save) a post-processor template that starts with the bos token."""
    config_path, tokenizer_path = Path(model_dir) / "tokenizer_config.json", Path(model_dir) / "tokenizer.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    if not tokenizer_path.is_file():
        return False
    processor = json.loads(tokenizer_path.read_text()).get("post_processor") or {}
    steps = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        single = step.get("single") if step.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return True
    return False


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


def answer_start(full: list[int], prompt: list[int]) -> int:
    """Where the answer starts in a row's ids: after the prompt's tokens, backing off where the
    tokeniser merged across the boundary (always at least 1: the first token is never predicted)."""
    start = len(prompt)
    while start > 1 and full[:start] != prompt[:start]:
        start -= 1
    return max(1, min(start, len(full) - 1))


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in ``text`` begins (None: none has appeared)."""
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


def partial_stop(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string: a stream holds
    them back until the next tokens tell whether the stop string forms."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held
