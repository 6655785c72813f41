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


def write_markdown(path: str | Path | None, lines: list[str]) -> None:
    """Write a benchmark's README-ready markdown (atomically, like the JSON)."""
    if not path:
        return
    from certify.common.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def markdown_row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(columns: tuple[str, ...], rows: list[list]) -> list[str]:
    """A markdown table: the header, the rule, one line per row."""
    return [markdown_row(columns), markdown_row(["---"] * len(columns))] + [markdown_row(row) for row in rows]


def add_run_options(parser) -> None:
    """The options every dataset-sweeping benchmark ends with."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None, help="also write the README-ready markdown table here")


def run_datasets(args, benchmark: str, run_dataset: Callable, markdown: Callable[[dict], list[str]],
                 show: Callable[[dict], None], **extra) -> dict:
    """Run `run_dataset(name, args, quiet)` for each of `args.datasets` (comma-separated), then
    write the markdown and the JSON of the whole run."""
    import sys
    import time

    import torch

    torch.set_num_threads(args.threads)
    quiet = not sys.stderr.isatty()
    began = time.perf_counter()
    results = {dataset: run_dataset(dataset, args, quiet) for dataset in args.datasets.split(",")}
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "md", "datasets")}
    document = {"benchmark": benchmark, "settings": settings, **extra, "results": results,
                "seconds": round(time.perf_counter() - began, 1)}
    write_markdown(args.md, markdown(document))
    return finish(document, args.json, show)
