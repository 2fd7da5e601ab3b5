"""Progress bars for long work: a rich bar with count, rate and ETA.

In a terminal the bar redraws in place; in a log (CI, a pipe) it prints one line every
`log_every_s` seconds instead, so long jobs still show they are alive.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Progress(Progress):
    log_every_s = 15.0

    def update(self, task_id, **kwargs):
        super().update(task_id, **kwargs)
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        if now - getattr(task, "_last_log", 0.0) >= self.log_every_s or task.finished:
            task._last_log = now
            eta = f"{_remaining(task):.0f}s" if _remaining(task) is not None else "?"
            self.console.print(f"{task.description}: {task.completed:.0f}/{task.total:.0f} "
                               f"{task.fields.get('status', '')} elapsed {task.elapsed or 0:.0f}s ETA {eta}",
                               highlight=False)


def _remaining(task) -> float | None:
    """Seconds left: rich's estimate, else the average rate so far (work reported in a few large
    chunks, such as cache shards, gives rich's windowed estimate too few samples)."""
    if task.time_remaining is not None:
        return task.time_remaining
    if task.total is None or not task.completed or not task.elapsed:
        return None
    return task.elapsed * (task.total - task.completed) / task.completed


def progress_bar() -> Progress:
    """A bar showing done/total, a `status` field the caller fills (rate, loss...), elapsed and ETA.

    Example:
        >>> with progress_bar() as bar:
        ...     task = bar.add_task("generate", total=100, status="")
        ...     bar.update(task, advance=10, status="143 tok/s")
    """
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TextColumn("[cyan]{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                     TimeRemainingColumn(), console=Console(stderr=True), refresh_per_second=4,
                     speed_estimate_period=600)
