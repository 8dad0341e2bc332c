"""Strict settings: one base model for every config, and one way to report what is wrong with one.

Every config forbids unknown keys, so ``max_step: 5`` is an error instead of a silently ignored
typo. :func:`settings_error` turns pydantic's errors into one line that names the YAML key or the
command-line flag (never the pydantic field), lists every problem, and suggests the closest valid
key.
"""

from __future__ import annotations

import difflib
from typing import Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from ftl.errors import ConfigError


class StrictModel(BaseModel):
    """Unknown keys are errors; values are checked when assigned as well as when built."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def default(model: type[BaseModel], name: str):
    """The default of ``model.name``: the click option reads it from here, so it is written once."""
    return model.model_fields[name].get_default(call_default_factory=True)


def describe(model: type[BaseModel], name: str) -> str | None:
    return model.model_fields[name].description


def known_keys(model: type[BaseModel]) -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        keys.append(info.alias or name)
    return keys


def settings_error(exc: ValidationError, *, source: str, model: type[BaseModel] | None = None,
                   key_name: Callable[[tuple], str] | None = None, fix: str | None = None) -> ConfigError:
    """One ConfigError listing every problem in ``exc``.

    ``key_name`` turns a pydantic location into what the user typed (``stages.finetune.max_step``
    or ``--max-steps``); ``model`` (or the nested model found along the location) supplies the
    valid keys for a "did you mean" hint.
    """
    key_name = key_name or (lambda loc: ".".join(str(p) for p in loc))
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = key_name(loc) or "settings"
        if error["type"] == "extra_forbidden":
            hint = _closest(loc, model, key_name)
            problems.append(f"{key}: unknown key{hint}")
        elif error["type"] == "missing":
            problems.append(f"{key}: required")
        else:
            value = error.get("input")
            shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) and len(repr(value)) < 60 else ""
            problems.append(f"{key}: {error['msg'].lower()}{shown}")
    count = len(problems)
    what = f"{count} invalid setting{'s' if count > 1 else ''}: " + "; ".join(problems)
    return ConfigError(what, source, fix or "fix those keys and run again")


def _closest(loc: tuple, model: type[BaseModel] | None, key_name) -> str:
    if model is None:
        return ""
    owner = _model_at(model, loc[:-1])
    if owner is None:
        return ""
    candidates = {key_name(loc[:-1] + (k,)).split(".")[-1]: k for k in known_keys(owner)}
    typed = key_name(loc).split(".")[-1]
    match = difflib.get_close_matches(typed, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _model_at(model: type[BaseModel], path: tuple):
    current = model
    for part in path:
        if not isinstance(part, str):
            continue
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        annotation = field.annotation
        nested = next((a for a in getattr(annotation, "__args__", (annotation,))
                       if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            return None
        current = nested
    return current
