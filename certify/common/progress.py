"""One look for every progress bar of both tools: a rich bar on a wide enough terminal, plain progress
lines anywhere else (CI logs, `| tee`, a narrow window), nothing with --quiet."""

from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

# Progress and messages go to stderr, so `--json -` output on stdout stays machine-readable.
console = Console(stderr=True)

# Narrower than this, the bar's columns (name, bar, n/N, times, status) cannot all show: lines instead.
BAR_MIN_WIDTH = 60
# Plain lines: one at least every LINE_EVERY_S seconds or LINE_EVERY_FRACTION of the work, and one at the end.
LINE_EVERY_S = 10.0
LINE_EVERY_FRACTION = 0.1


def progress_bar(*, quiet: bool = False, out: Console | None = None):
    """A context manager with rich's `add_task(description, total=, status=)` / `update(task, advance=, status=)`,
    drawing on `out` (default: stderr)."""
    out = out or console
    if not quiet and (not out.is_terminal or out.width < BAR_MIN_WIDTH):
        return LineProgress(out)
    # Fixed-width columns plus a name and status that shorten with an ellipsis keep the bar on one
    # line of an 80-column terminal.
    return Progress(
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=12)),
        BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=out, disable=quiet, transient=False, expand=True,
    )


class LineProgress:
    """Progress as plain, complete lines, e.g. `finetune: 940/1876 (50%) 0:00:06 elapsed, eta 0:00:06,
    epoch 1/2 loss 0.38`: readable in a log file, never wider than the console."""

    def __init__(self, out: Console, *, clock=time.monotonic):
        self.out, self.clock = out, clock
        self.tasks: list[dict] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:  # the last state of every task, unless its last line already said it
            for task in self.tasks:
                if task["printed"] != (task["done"], task["status"]):
                    self._print(task)

    def add_task(self, description: str, *, total: float | None = None, status: str = "", **_) -> int:
        now = self.clock()
        self.tasks.append({"description": description, "total": total or 0, "done": 0, "status": status,
                           "started": now, "last_time": now, "last_done": 0, "printed": None})
        return len(self.tasks) - 1

    def update(self, task_id: int, *, advance: float = 0, status: str | None = None, **_) -> None:
        task = self.tasks[task_id]
        task["done"] += advance
        if status is not None:
            task["status"] = status
        now, total = self.clock(), task["total"]
        step = max(1.0, LINE_EVERY_FRACTION * total)
        if task["done"] >= total or task["done"] - task["last_done"] >= step or now - task["last_time"] >= LINE_EVERY_S:
            self._print(task)

    def line(self, task: dict) -> str:
        done, total = task["done"], task["total"]
        elapsed = self.clock() - task["started"]
        parts = [f"{task['description']}: {done:g}/{total:g}"]
        if total:
            parts.append(f" ({100 * done / total:.0f}%)")
        parts.append(f" {_clock(elapsed)} elapsed")
        if 0 < done < total:
            parts.append(f", eta {_clock(elapsed * (total - done) / done)}")
        if task["status"]:
            parts.append(f", {task['status']}")
        text = "".join(parts)
        width = min(self.out.width, 100) - 1
        return text if len(text) <= width else text[:width - 3] + "..."

    def _print(self, task: dict) -> None:
        self.out.print(self.line(task), markup=False, highlight=False, soft_wrap=True)
        task["last_time"], task["last_done"], task["printed"] = self.clock(), task["done"], (task["done"], task["status"])


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def results_console() -> Console:
    """Where a command's result table goes: stdout (messages and progress stay on stderr), wide enough
    for the table when stdout is a file or a pipe."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=160)


def say(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        console.print(message, highlight=False, soft_wrap=True)
