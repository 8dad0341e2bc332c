"""The teacher interface, the registry, and the one error type the runner understands."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ftl.distill.budget import RateLimits
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
    limits: RateLimits | None = None  # the response's rate-limit headers, when it sent any


# What a failed request means for its seed. Fatal: the run stops, since every later request would
# fail the same way. Transient: retried, and if that runs out the seed stays pending, so the next
# run asks again. Anything else is permanent for this seed alone: it is rejected and the run goes on.
FATAL_KINDS = ("auth", "not_found")
TRANSIENT_KINDS = ("rate_limit", "server", "timeout", "connection", "bad_response")
# Error codes in a 4xx body kept as the reject reason; any other 4xx is client_error_<status>.
CLIENT_ERROR_CODES = ("context_length_exceeded", "content_filter")


@dataclass
class TeacherError(Exception):
    """A failed request, classified so the runner knows whether to retry, reject the seed, or stop.

    kind: rate_limit | server | timeout | connection | bad_response (transient), auth | not_found
    (fatal), client (any other 4xx: this seed is rejected with ``reason``; give its ``status``, and
    ``code`` when the body has one).
    """

    kind: str
    message: str
    retry_after: float | None = None
    status: int | None = None
    code: str | None = None
    limits: RateLimits | None = None
    fatal: bool = field(init=False)
    transient: bool = field(init=False)

    def __post_init__(self):
        self.fatal = self.kind in FATAL_KINDS
        self.transient = self.kind in TRANSIENT_KINDS
        super().__init__(self.message)

    @property
    def reason(self) -> str:
        """The reject reason: a known error code, else the status, so reasons stay a closed set to retry by."""
        if self.kind != "client":
            return self.kind
        return self.code if self.code in CLIENT_ERROR_CODES else f"client_error_{self.status}"


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
