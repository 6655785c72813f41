"""What every benchmark does at its end: print the readable table and write the JSON (atomically,
so an interrupted run never leaves half a result file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def finish(document: dict, json_path: str | Path | None, show: Callable[[dict], None]) -> dict:
    show(document)
    if json_path:
        from certify.common.files import atomic_path

        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(document, indent=1) + "\n")
    return document


def table(title: str, columns: tuple[str, ...]):
    """A rich table with the columns right-aligned (numbers line up)."""
    from rich.table import Table

    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="right")
    return out
