"""Shared console and progress helpers (rich), so every stage reads the same way."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def task_progress(description: str, total: int | None = None):
    """A progress bar (or spinner when the total is unknown) on stderr; yields (progress, task_id)."""
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
    if total:
        columns += [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    else:
        columns += [TimeElapsedColumn()]
    columns.append(TextColumn("{task.fields[info]}"))
    if not console.is_terminal:
        console.print(f"→ {description}", highlight=False)  # logs get one line per step instead of a bar
    # No spinners in logs and pipes: only a terminal gets live progress.
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, info="")
        yield progress, task
