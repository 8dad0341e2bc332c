"""Q/A data files: read line by line, validated before any weights load.

Rows are ``{"Question": ..., "Answer": ...}`` (other names mapped by options) or chat
``{"messages": [{"role": ..., "content": ...}, ...]}``. Every error names the file, the line and
the fix; nothing is silently skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftl.chat import with_system
from ftl.errors import DataError

ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    line: int
    row: dict
    messages: list[dict]
    source: str = ""


@dataclass
class Fields:
    question: str = "Question"
    answer: str = "Answer"
    messages: str = "messages"


def read_text(path: Path, accepted: str = "a UTF-8 text file") -> str:
    """A file as UTF-8 text; a binary file is one line naming where, never a stream of garbage rows."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError("not UTF-8 text", f"{path}:{line}", f"save it as UTF-8, or give {accepted}") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError("binary data (a NUL byte) in a text file", f"{path}:{line}", f"give {accepted}")
    return text


def text_lines(text: str) -> list[str]:
    # split on newlines only: str.splitlines() would also split inside a JSON string holding U+2028
    return [line.rstrip("\r") for line in text.split("\n")]


def json_object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", where,
                        'write one object per line, e.g. {"Question": ..., "Answer": ...}')
    return row


def parse_jsonl(text: str, path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line names the file, the line and the fix."""
    rows = []
    for number, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} at column {exc.colno}", f"{path}:{number}",
                            "each line must be one complete JSON object") from None
        rows.append((number, json_object(row, f"{path}:{number}")))
    return rows


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise DataError("data file not found", str(path), "check the path")
    rows = parse_jsonl(read_text(path), path)
    if not rows:
        raise DataError("dataset is empty", str(path), "add at least one Q/A row")
    return rows


def load_examples(path: Path, fields: Fields = Fields(), system_prompt: str | None = None) -> list[Example]:
    examples = [_to_example(path, number, row, fields, system_prompt) for number, row in read_jsonl(path)]
    for example in examples:
        example.source = str(path)
    return examples


def _to_example(path: Path, number: int, row: dict, fields: Fields, system_prompt: str | None) -> Example:
    where = f"{path}:{number}"
    if fields.messages in row:
        return Example(number, row, with_system(_check_messages(row[fields.messages], where), system_prompt))
    for name, option in ((fields.question, "--question-field"), (fields.answer, "--answer-field")):
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            present = ", ".join(sorted(row)) or "none"
            problem = f"missing field {name!r}" if name not in row else f"field {name!r} is empty or not text"
            raise DataError(problem, where, f"fields present: {present}; map yours with {option}")
    messages = [{"role": "user", "content": row[fields.question]},
                {"role": "assistant", "content": row[fields.answer]}]
    return Example(number, row, with_system(messages, system_prompt))


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list", where, 'use [{"role": "user", "content": ...}, ...]')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                message.get("content"), str):
            raise DataError(f"messages[{index}] needs a role in {sorted(ROLES)} and text content", where,
                            "fix that message")
    if messages[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's answer", where,
                        "end each conversation with an assistant turn to train on")
    return messages
