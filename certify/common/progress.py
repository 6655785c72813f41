"""One look for every progress bar of both tools (rich), silent when asked or not on a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Progress and messages go to stderr, so `--json -` output on stdout stays machine-readable.
console = Console(stderr=True)


def progress_bar(*, quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=console, disable=quiet, transient=False,
    )


def say(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        console.print(message, highlight=False, soft_wrap=True)
