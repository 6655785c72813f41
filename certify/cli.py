"""`certify`: measure the robustness of an ONNX classifier. Changes nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from certify.errors import UserError
from certify.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Certify the robustness of a classifier: per sample verified, falsified or unknown.")


def run_cli(function, debug: bool) -> None:
    """Run a command body; user errors become one line and exit code 2 (traceback only with --debug)."""
    try:
        function()
    except UserError as error:
        if debug:
            raise
        # soft_wrap: the message stays ONE line whatever the terminal width (scripts grep it).
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


def parse_floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{option} '{text}' is not a comma-separated list of numbers", f"e.g. {option} 0.1307") from None


@app.command()
def main_command(
    model: Path = typer.Argument(..., help="ONNX model to certify (from `harden export`, or third-party with --data)."),
    eps: list[float] = typer.Option([], "--eps", help="l-infinity radius in pixel units; repeat for several."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist, fashion-mnist, file.npz or a folder of class folders; default: from the model's metadata."),
    split: str = typer.Option("test", "--split", help="train or test."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Certify only the first N samples."),
    method: Optional[str] = typer.Option(None, "--method", help="Force one bound method: ibp, crown or alpha-crown (default: the cascade ibp -> crown -> alpha-crown)."),
    no_attack: bool = typer.Option(False, "--no-attack", help="Skip the PGD attack (samples that would be falsified become unknown)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel input mean the model expects, e.g. 0.1307."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel input std the model expects, e.g. 0.3081."),
    batch_size: int = typer.Option(50, "--batch-size", help="Samples bounded together."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    seed: int = typer.Option(0, "--seed", help="Seed of the attack's random starts."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (per-sample verdicts, sha256, spec, versions) as JSON; '-' for stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Certify MODEL at each --eps: clean, attacked and certified accuracy, per-sample verdicts."""

    def body():
        from certify.bounds import METHODS
        from certify.engine import certify_model
        from certify.report import report_document, summary_table, write_json

        methods = METHODS if method is None else (method,)
        run = certify_model(model, list(eps), data=data, split=split, limit=limit, methods=methods,
                            attack=not no_attack, batch_size=batch_size, device=device,
                            mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                            seed=seed, quiet=quiet)
        document = report_document(run)
        if json_out is not None and str(json_out) == "-":
            import json

            sys.stdout.write(json.dumps(document, indent=1) + "\n")
        else:
            console.print(summary_table(run))
            if json_out is not None:
                write_json(document, json_out)
                console.print(f"report written to {json_out}")

    run_cli(body, debug)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
