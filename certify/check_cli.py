"""`certify check REPORT.json [--model model.onnx] [--all] [--sample N]`: does a certificate still hold?

Exit code 0 when it holds for the file, 1 when it does not (the first reason on one line), 2 for
bad input (a damaged report, a missing file). certify.cli sends `certify check ...` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from certify.common.cli import OneLineUsageErrors, run_cli
from certify.common.cli_options import Debug, Quiet, Seed
from certify.common.progress import console, results_console

check_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@check_app.command(cls=OneLineUsageErrors)
def check_command(
    report: Path = typer.Argument(..., help="The JSON report of a `certify MODEL --eps ... --json REPORT.json` run."),
    model: Optional[Path] = typer.Option(None, "--model", help="The model file to check it for (default: the file the report names)."),
    every: bool = typer.Option(False, "--all", help="Recompute every verdict, not a sample."),
    sample: int = typer.Option(20, "--sample", help="Verified verdicts (and counterexamples) recomputed, drawn at random with --seed."),
    seed: Seed = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Re-check a certificate: re-hash the model file, re-read the spec, recompute a sample of the
    verified verdicts with the recorded bound method and the counterexamples with onnxruntime.
    Exit 0: the certificate holds for this file; 1: it does not; 2: bad input."""
    outcome = []

    def work() -> None:
        from certify.reports.check import check_certificate

        outcome.append(check_certificate(report, model=model, sample=sample, every=every, seed=seed, quiet=True))

    run_cli(work, debug)
    result = outcome[0]
    if not quiet:
        for line in result.checked:
            console.print(f"ok: {line}", highlight=False, soft_wrap=True)
    if not result.holds:
        console.print(f"[bold red]fail:[/] the certificate does not hold for {result.model_path}: {result.failures[0]}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    results_console().print(f"the certificate holds for {result.model_path}", highlight=False, soft_wrap=True)
