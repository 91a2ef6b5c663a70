"""Rich progress bars for long library work, on stderr so that stdout stays machine-readable.

One convention everywhere: a library function that can show progress takes ``progress: bool`` (default ``False``,
silent for tests and library use) and opens :func:`progress_bar` itself with ``enabled=progress``. It lives in ``io``,
the bottom layer, so that every layer may use it.

Example:
    >>> with progress_bar("caching", total=10, unit="img") as advance:
    ...     for _ in range(10):
    ...         advance(1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True, highlight=False)


class RateColumn(TextColumn):
    """Items per second with a unit, e.g. ``143.2 img/s``."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "it", enabled: bool = True) -> Iterator[Callable]:
    """A bar with count, rate, elapsed and remaining time; yields ``advance(n=1, description=None)``.

    A ``description`` replaces the bar's label (e.g. to show the running loss); None keeps it.
    """
    if not enabled:
        yield lambda n=1, description=None: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr_console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1, description=None: progress.update(task, advance=n, description=description)
