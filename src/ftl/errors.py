"""Typed errors. Library code raises these; the CLI turns them into one line.

Every error carries *what* went wrong, *where* (a file, a line, a field) and *what to do*,
so the CLI can print ``error: <what> (<where>) — <fix>`` and nothing else.
"""

from __future__ import annotations


class FtlError(Exception):
    """Base class for every error ftl reports to a user."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f" — {self.fix}"
        return text


class DataError(FtlError):
    """A data file is malformed, empty, or lacks a field the template needs."""


class ModelNotFoundError(FtlError):
    """A model path or name does not resolve to a usable model."""


class AdapterMismatchError(FtlError):
    """An adapter was trained on a different base model than the one given."""


class OutputExistsError(FtlError):
    """An output folder already holds results and --force was not given."""


class ConfigError(FtlError):
    """A stage or pipeline configuration is invalid."""


class DeviceError(FtlError):
    """The requested method needs hardware this machine lacks (e.g. QLoRA without CUDA)."""


class OliveRunError(FtlError):
    """Olive failed, or exited 0 without producing the expected output."""


class ExportError(FtlError):
    """An exported model cannot hold what it was asked to (a grid from another model, a wrong layout)."""
