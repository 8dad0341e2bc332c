"""Teachers plug in through one interface and one registry, built-ins included.

A new backend is one module: a class with ``name``, ``model``, ``async complete(...)`` and
``async aclose()``, registered with ``@register("name")``.
"""

from ftl.distill.teachers.base import TEACHERS, Choice, Completion, Teacher, TeacherError, create, register
from ftl.distill.teachers import azure, local, openai_compat  # noqa: F401  (registers the built-ins)

__all__ = ["TEACHERS", "Choice", "Completion", "Teacher", "TeacherError", "create", "register"]
