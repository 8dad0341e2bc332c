"""Any OpenAI-compatible endpoint (OpenAI, Azure AI Foundry, vLLM, llama.cpp server, ftl serve)."""

from __future__ import annotations

import os
import re

from ftl.distill.budget import RateLimits, parse_duration
from ftl.distill.teachers.base import Choice, Completion, TeacherError, register
from ftl.errors import ConfigError


class OpenAICompatibleTeacher:
    name = "openai"

    def __init__(self, client, model: str):
        self.client = client
        self.model = model

    async def complete(self, messages, *, max_tokens, temperature, n) -> Completion:
        import openai

        try:
            # the raw response, for its rate-limit headers; parse() builds the same object create() returns
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, n=n)
            response = raw.parse()
        except openai.RateLimitError as exc:
            raise TeacherError("rate_limit", "429 Too Many Requests", _retry_after(exc.response, 429), 429,
                               limits=RateLimits.from_headers(exc.response.headers)) from None
        except openai.APITimeoutError:
            raise TeacherError("timeout", "request timed out") from None
        except openai.APIConnectionError as exc:
            raise TeacherError("connection", f"connection failed: {type(exc.__cause__ or exc).__name__}") from None
        except openai.APIStatusError as exc:
            raise _status_error(exc) from None
        except (ValueError, TypeError, AttributeError) as exc:  # a body that is not a chat completion
            raise TeacherError("bad_response", f"malformed response: {exc}"[:200]) from None
        completion = _completion(response)
        completion.limits = RateLimits.from_headers(raw.headers)
        return completion

    async def aclose(self) -> None:
        await self.client.close()


def _status_error(exc) -> TeacherError:
    """Only a refused key and a missing model stop the run: they fail every request alike. Any other
    4xx is about this one request (too long a prompt, a content filter), so only its seed is rejected."""
    status = exc.status_code
    if status in (401, 403):
        return TeacherError("auth", f"{status}: the endpoint refused the credentials", status=status)
    if status == 404:
        return TeacherError("not_found", "404: no such model or deployment at this endpoint", status=status)
    if status == 408:  # the server gave up waiting: as transient as a timeout here (the SDK retries it too)
        return TeacherError("timeout", "408 request timeout", _retry_after(exc.response), status)
    if status == 409 or status >= 500:  # 409: a conflict the SDK retries too
        return TeacherError("server", f"{status} server error", _retry_after(exc.response), status)
    body = exc.body if isinstance(exc.body, dict) else {}
    label = f"{status} {exc.code}" if exc.code else str(status)
    return TeacherError("client", f"{label}: {str(body.get('message') or exc.message)[:200]}", status=status,
                        code=exc.code)


def _retry_after(response, status: int | None = None) -> float | None:
    """Retry-After (ms or s); Azure's TPM 429s sometimes send only x-ratelimit-reset-tokens (read on 429 alone)."""
    try:
        headers = response.headers
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
        if status != 429:
            return None
        resets = [parse_duration(headers.get(name)) for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
        resets = [r for r in resets if r is not None]
        return min(resets) if resets else None  # the sooner one: ftl's own budget waits for the other
    except (AttributeError, ValueError):
        return None


def _completion(response) -> Completion:
    if not isinstance(getattr(response, "choices", None), list):
        raise TeacherError("bad_response", "response has no choices list")
    if not response.choices:
        raise TeacherError("bad_response", "empty choice list")
    choices = []
    for choice in response.choices:
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None)
        finish = getattr(choice, "finish_reason", None)
        if text is None and finish == "content_filter":  # Azure withheld the answer: a verdict, not a bad body
            text = ""
        if not isinstance(text, str):
            raise TeacherError("bad_response", "choice without text content")
        choices.append(Choice(text, finish))
    usage = getattr(response, "usage", None)
    return Completion(choices, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)


def api_key(config, default_variable: str) -> str | None:
    """The key from the environment variable the config names (or the default one). A variable named
    on purpose but unset is an error naming it; its value never appears anywhere."""
    variable = check_key_variable(config.api_key_env, "--api-key-env") or default_variable
    key = os.environ.get(variable)
    if config.api_key_env and not key:
        raise ConfigError(f"the API key variable ${variable} is not set", "--api-key-env",
                          f"export {variable}=<key>, or name the variable that holds it")
    return key


def check_key_variable(name: str | None, where: str) -> str | None:
    """A variable's name, not a key: `--api-key-env "$KEY"` expands to the key itself, never to be echoed."""
    if name is not None and not _VARIABLE.fullmatch(name):
        raise ConfigError("the API key variable must be the name of an environment variable, e.g. MY_TEACHER_KEY "
                          "(what was given is not printed: it may be the key itself)", where,
                          "pass the variable's name, without $")
    return name


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@register("openai")
def create_openai(config) -> OpenAICompatibleTeacher:
    import openai

    key = api_key(config, "OPENAI_API_KEY")
    if not key:
        if not config.base_url:
            raise ConfigError("no API key for the openai teacher", "OPENAI_API_KEY is not set",
                              "export OPENAI_API_KEY, or give --base-url for a local server without auth")
        key = "unused"  # local OpenAI-compatible servers usually ignore it
    if not config.model:
        raise ConfigError("the openai teacher needs a model name", "--model", "e.g. --model gpt-4o-mini")
    # max_retries=0: ftl retries itself, so it can count retries, honour Retry-After and record rejects.
    client = openai.AsyncOpenAI(api_key=key, base_url=config.base_url, max_retries=0, timeout=config.timeout)
    return OpenAICompatibleTeacher(client, config.model)
