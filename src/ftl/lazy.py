"""Package attributes loaded on first use.

A stage package re-exports its entry points (``from ftl.export import export_onnx``), but the CLI
imports only its config for the options: importing the stage at package import would load numpy,
Olive's helpers and the rest for ``ftl --help`` (2.1 s and 248 MB once torch came along).
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module path) on first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
