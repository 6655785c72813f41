"""The command-line options both programs share, declared once: every command that takes one of them
uses the alias below, so its name, help and meaning are the same everywhere.

`version_option(program)` is the eager `--version` of an app: it prints the installed package's
version and exits 0 before any other option is looked at.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda where present).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of every random choice: the same seed repeats a run "
                                                  "exactly on the same machine.")]
Mean = Annotated[Optional[str], typer.Option(
    "--mean", help="Input normalization (x - mean) / std the model expects: one mean per input channel, "
                   "comma-separated, or ONE value for every channel, e.g. 0.1307.")]
Std = Annotated[Optional[str], typer.Option(
    "--std", help="The standard deviations of that normalization (> 0): as many values as --mean, e.g. 0.3081.")]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("harden")  # one distribution holds both packages
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def version_option(program: str):
    """The Annotated type of an app's `--version` flag for `program` (its callback exits 0)."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{program} {package_version()}")
            raise typer.Exit(0)

    return Annotated[bool, typer.Option("--version", callback=show, is_eager=True,
                                        help=f"Print the version of {program} and exit.")]
