"""The teacher interface, the registry, and the one error type the runner understands."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ftl.errors import ConfigError


@dataclass
class Choice:
    text: str
    finish_reason: str | None


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class TeacherError(Exception):
    """A failed request, classified so the runner knows whether and when to retry.

    kind: rate_limit | server | timeout | connection | bad_response (retried), auth | client (fatal).
    """

    kind: str
    message: str
    retry_after: float | None = None
    status: int | None = None
    fatal: bool = field(init=False)

    def __post_init__(self):
        self.fatal = self.kind in ("auth", "client")
        super().__init__(self.message)


class Teacher(Protocol):
    name: str
    model: str

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, n: int) -> Completion:
        ...

    async def aclose(self) -> None:
        ...


TEACHERS: dict[str, Callable] = {}


def register(name: str):
    def wrap(factory):
        TEACHERS[name] = factory
        return factory
    return wrap


def create(config) -> Teacher:
    if config.teacher not in TEACHERS:
        raise ConfigError(f"unknown teacher {config.teacher!r}", "--teacher",
                          f"choose one of: {', '.join(sorted(TEACHERS))}")
    return TEACHERS[config.teacher](config)
