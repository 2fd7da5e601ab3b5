"""Progress bars for long work: a rich bar with count, rate and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar() -> Progress:
    """A bar showing done/total, a `status` field the caller fills (rate, loss...), elapsed and ETA.

    Example:
        >>> with progress_bar() as bar:
        ...     task = bar.add_task("generate", total=100, status="")
        ...     bar.update(task, advance=10, status="143 tok/s")
    """
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("[cyan]{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=Console(stderr=True), refresh_per_second=4)
