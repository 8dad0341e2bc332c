"""Shared console and progress helpers (rich), so every stage reads the same way.

In a terminal a long stage shows a live bar with its rate and ETA. Anywhere else (a log file, CI, a
pipe) there is no bar: each step is one plain line with the same facts, e.g.
``  finetune (Olive, qscale) 12/40 · 0.48/s · ETA 58s · loss 1.9312``.
"""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True)


def _rate(task) -> float | None:
    """Steps per second since the task started: over a whole stage, not rich's 30 s window."""
    elapsed = task.elapsed
    return task.completed / elapsed if task.completed and elapsed else None


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = _rate(task)
        return Text(f"{rate:.2f}/s" if rate else "", style="progress.data.speed")


def _seconds(value: float) -> str:
    value = int(round(value))
    return f"{value // 60}m{value % 60:02d}s" if value >= 60 else f"{value}s"


def step_line(task) -> str:
    """The plain line for a task's state: description, count, rate, ETA, info."""
    parts = [f"  {task.description} {int(task.completed)}" + (f"/{int(task.total)}" if task.total else "")]
    rate = _rate(task)
    if rate:
        parts.append(f"{rate:.2f}/s")
        if task.total and task.completed < task.total:
            parts.append(f"ETA {_seconds((task.total - task.completed) / rate)}")
    info = task.fields.get("info")
    if info:
        parts.append(str(info))
    return " · ".join(parts)


class _Progress(Progress):
    """rich's Progress; outside a terminal, one line per step instead of a live bar."""

    def advance(self, task_id, advance: float = 1) -> None:  # rich's own advance bypasses update()
        self.update(task_id, advance=advance)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if not self.disable:
            return
        task = self._tasks[task_id]
        key = (task.completed, task.total, task.fields.get("info"))
        stepped = kwargs.get("completed") is not None or kwargs.get("advance")
        if stepped and key != task.fields.get("_printed"):
            task.fields["_printed"] = key
            self.console.print(step_line(task), highlight=False, markup=False)


@contextmanager
def task_progress(description: str, total: int | None = None):
    """A progress bar (or spinner when the total is unknown) on stderr; yields (progress, task_id)."""
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    if not console.is_terminal:
        console.print(f"→ {description}", highlight=False)
    # No spinners in logs and pipes: only a terminal gets live progress.
    with _Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, info="")
        yield progress, task


def run_with_progress(label: str, work):
    """Run ``work(on_progress)`` under a bar fed with (step, total, loss) updates."""
    with task_progress(label, total=None) as (progress, task):
        def on_progress(step, total, loss):
            progress.update(task, total=total, completed=step if step is not None else None,
                            info=f"loss {loss:.4f}" if loss is not None else "")
        return work(on_progress)
