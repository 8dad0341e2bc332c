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


def run_with_progress(label: str, work):
    """Run ``work(on_progress)`` under a bar fed with (step, total, loss) updates."""
    with task_progress(label, total=None) as (progress, task):
        def on_progress(step, total, loss):
            progress.update(task, total=total, completed=step if step is not None else None,
                            info=f"loss {loss:.4f}" if loss is not None else "")
        return work(on_progress)
