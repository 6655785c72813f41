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


BUG_REPORT = "https://github.com/harden-certify/harden/issues"


def run_cli(function, debug: bool) -> None:
    """Run a command body; every failure becomes one line (the traceback only with --debug).

    A UserError (bad input the user can fix) exits with code 2. Anything else is a bug in this
    tool: one line that names the exception and where to report it, exit code 3.
    """
    try:
        function()
    except typer.Exit:
        raise
    except UserError as error:
        if debug:
            raise
        _error_line(str(error))
        raise typer.Exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        _error_line("interrupted -- no output was written; run the command again")
        raise typer.Exit(130)
    except MemoryError:
        if debug:
            raise
        _error_line("out of memory -- lower --batch-size or --limit, or use a machine with more memory")
        raise typer.Exit(2)
    except Exception as error:  # noqa: BLE001 -- the last line of defence against tracebacks
        if debug:
            raise
        first = str(error).splitlines()[0][:300] if str(error) else ""
        _error_line(f"internal error ({type(error).__name__}{': ' + first if first else ''}) -- this is a bug; "
                    f"please report it at {BUG_REPORT} with the output of the same command run with --debug")
        raise typer.Exit(3)


def _error_line(message: str) -> None:
    # soft_wrap: the message stays ONE line whatever the terminal width (scripts grep it).
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def parse_floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{option} '{text}' is not a comma-separated list of numbers", f"e.g. {option} 0.1307") from None


@app.command()
def main_command(
    model: Optional[Path] = typer.Argument(None, help="ONNX model to certify (from `harden export`, or third-party with --data); may be left out with --vnnlib instances.csv."),
    eps: list[float] = typer.Option([], "--eps", help="l-infinity radius in pixel units; repeat for several."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist, fashion-mnist, file.npz or a folder of class folders; default: from the model's metadata."),
    split: str = typer.Option("test", "--split", help="train or test."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Certify only the first N samples."),
    method: Optional[str] = typer.Option(None, "--method", help="Force one bound method: ibp, crown or alpha-crown (or a comma-separated cascade; default: ibp,crown,alpha-crown)."),
    no_attack: bool = typer.Option(False, "--no-attack", help="Skip the PGD attack (samples that would be falsified become unknown)."),
    attack_steps: int = typer.Option(50, "--attack-steps", help="PGD steps per restart."),
    attack_restarts: Optional[int] = typer.Option(None, "--attack-restarts", help="PGD restarts (default 3; 5 with --vnnlib)."),
    radius: bool = typer.Option(False, "--radius", help="Also find each sample's largest certified eps, by bisection."),
    radius_tol: float = typer.Option(1e-3, "--radius-tol", help="Bisection tolerance of --radius (pixel units)."),
    radius_max: Optional[float] = typer.Option(None, "--radius-max", help="Largest eps --radius searches (default: the width of the input range)."),
    vnnlib: list[str] = typer.Option([], "--vnnlib", help="Check VNN-LIB properties instead: a .vnnlib file, a folder of them or a VNN-COMP instances.csv; repeat for several."),
    cex_dir: Optional[Path] = typer.Option(None, "--cex-dir", help="Folder for the counterexamples of sat properties (default: next to --json)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel input mean the model expects, e.g. 0.1307."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel input std the model expects, e.g. 0.3081."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples (or properties) bounded together (default 50; 16 with --vnnlib)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    seed: int = typer.Option(0, "--seed", help="Seed of the attack's random starts: the same seed repeats a run exactly."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (per-sample verdicts, sha256, spec, versions) as JSON; '-' for stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a plot (.png/.pdf/.svg): accuracy against eps, and certified radii with --radius."),
    fail_under: Optional[float] = typer.Option(None, "--fail-under", help="Exit with code 1 when the certified accuracy at any --eps (with --vnnlib: the verified fraction) is below this fraction, for CI gates."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Certify MODEL at each --eps (clean, attacked and certified accuracy, per-sample verdicts), or
    check VNN-LIB properties with --vnnlib (unsat / sat with a counterexample / unknown)."""
    failed: list[str] = []

    def body():
        from certify.report import check_fail_under, validate_fail_under

        methods = parse_methods(method)
        validate_fail_under(fail_under, bool(eps), bool(vnnlib))
        if plot is not None:
            from certify.plot import check_plot_path

            check_plot_path(plot)
        if vnnlib:
            run = _check_vnnlib(model, methods)
        else:
            if model is None:
                raise UserError("no model given", "certify MODEL.onnx --eps 0.1 (only --vnnlib instances.csv names its own models)")
            run = _certify_dataset(model, methods)
        if run is not None:
            reason = check_fail_under(fail_under, run)
            if reason is not None:
                failed.append(reason)

    def _certify_dataset(model_path: Path, methods):
        from certify.engine import certify_model
        from certify.report import radius_table, report_document, summary_table, write_json

        run = certify_model(model_path, list(eps), data=data, split=split, limit=limit, methods=methods,
                            attack=not no_attack, batch_size=50 if batch_size is None else batch_size,
                            device=device, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                            seed=seed, quiet=quiet, radius=radius, radius_tol=radius_tol, radius_max=radius_max,
                            attack_steps=attack_steps, attack_restarts=3 if attack_restarts is None else attack_restarts)
        if run is None:  # a rank other than 0 under torchrun: rank 0 reports
            return None
        document = report_document(run)
        if plot is not None:
            from certify.plot import plot_run

            plot_run(run, plot)
        if json_out is not None and str(json_out) == "-":
            import json

            sys.stdout.write(json.dumps(document, indent=1) + "\n")
        else:
            if run.results:
                console.print(summary_table(run))
            if run.radius is not None:
                console.print(radius_table(run))
            if json_out is not None:
                write_json(document, json_out)
                console.print(f"report written to {json_out}")
        if plot is not None:
            console.print(f"plot written to {plot}")
        return run

    def _check_vnnlib(model_path: Optional[Path], methods):
        from certify.report import vnnlib_document, vnnlib_property_table, vnnlib_table, write_json
        from certify.vnnlib_check import check_properties, write_counterexamples

        if eps or radius or plot is not None:
            raise UserError("--vnnlib takes its boxes from the files: --eps, --radius and --plot do not apply",
                            "leave them out, or certify on a dataset without --vnnlib")
        run = check_properties(model_path, list(vnnlib), methods=methods, attack=not no_attack,
                               attack_steps=attack_steps, attack_restarts=5 if attack_restarts is None else attack_restarts,
                               seed=seed, batch_size=16 if batch_size is None else batch_size, device=device,
                               mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), quiet=quiet)
        if run is None:  # a rank other than 0 under torchrun: rank 0 reports
            return None
        folder = cex_dir
        if folder is None and json_out is not None and str(json_out) != "-":
            folder = json_out.parent / f"{json_out.stem}.counterexamples"
        sat = sum(p.result == "sat" for p in run.properties)
        if sat and folder is not None:
            write_counterexamples(run, folder)
        document = vnnlib_document(run)
        if json_out is not None and str(json_out) == "-":
            import json

            sys.stdout.write(json.dumps(document, indent=1) + "\n")
        else:
            if len(run.properties) <= 100:
                console.print(vnnlib_property_table(run))
            console.print(vnnlib_table(run))
            if json_out is not None:
                write_json(document, json_out)
                console.print(f"report written to {json_out}")
        if sat:
            console.print(f"{sat} counterexample(s) written to {folder}" if folder is not None
                          else f"{sat} counterexample(s) found; give --cex-dir or --json to write them")
        return run

    run_cli(body, debug)
    if failed:
        console.print(f"[bold red]fail:[/] {failed[0]}", highlight=False)
        raise typer.Exit(1)


def parse_methods(text: Optional[str]) -> tuple[str, ...]:
    from certify.bounds import METHODS

    if text is None:
        return METHODS
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --method {text!r}", f"use one of {', '.join(METHODS)} (or a comma-separated list)")
    return methods


def main() -> None:
    app()


if __name__ == "__main__":
    main()
