"""`certify`: measure the robustness of an ONNX classifier. Changes nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from certify.common.cli import OneLineUsageErrors, parse_floats, run_cli
from certify.common.errors import UserError
from certify.common.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Certify the robustness of a classifier: per sample verified, falsified or unknown.")


@app.command(cls=OneLineUsageErrors)
def main_command(
    model: Optional[Path] = typer.Argument(None, help="ONNX model to certify (from `harden export`, or third-party with --data); may be left out with --vnnlib instances.csv."),
    eps: list[float] = typer.Option([], "--eps", help="l-infinity radius in pixel units; repeat for several."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist, fashion-mnist, file.npz or a folder of class folders; default: from the model's metadata."),
    split: Optional[str] = typer.Option(None, "--split", help="train or test (default test)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Certify only the first N samples."),
    method: Optional[str] = typer.Option(None, "--method", help="Force one bound method: ibp, crown or alpha-crown (or a comma-separated cascade; default: ibp,crown,alpha-crown)."),
    no_attack: bool = typer.Option(False, "--no-attack", help="Skip the PGD attack (samples that would be falsified become unknown)."),
    attack_steps: int = typer.Option(50, "--attack-steps", help="PGD steps per restart."),
    attack_restarts: Optional[int] = typer.Option(None, "--attack-restarts", help="PGD restarts (default 3; 5 with --vnnlib)."),
    radius: bool = typer.Option(False, "--radius", help="Also find each sample's largest certified eps, by bisection."),
    radius_tol: Optional[float] = typer.Option(None, "--radius-tol", help="Bisection tolerance of --radius (pixel units; default 1e-3)."),
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
    check VNN-LIB properties with --vnnlib (unsat / sat with a counterexample / unknown).

    Every option and every output path is checked before any work: a bad one is one line
    (`error: what -- what to do`), exit code 2, and nothing is written.
    """
    failed: list[str] = []
    to_stdout = json_out is not None and str(json_out) == "-"
    report_path = None if json_out is None or to_stdout else json_out

    def body():
        from certify.reports.report import check_fail_under, validate_fail_under

        methods = parse_methods(method)
        validate_fail_under(fail_under, bool(eps), bool(vnnlib))
        means, stds = parse_floats(mean, "--mean"), parse_floats(std, "--std")
        if vnnlib:
            run = _check_vnnlib(model, methods, means, stds)
        else:
            if model is None:
                raise UserError("no model given", "certify MODEL.onnx --eps 0.1 (only --vnnlib instances.csv names its own models)")
            run = _certify_dataset(model, methods, means, stds)
        if run is not None:
            reason = check_fail_under(fail_under, run)
            if reason is not None:
                failed.append(reason)

    def _certify_dataset(model_path: Path, methods, means, stds):
        from certify.verdicts.dataset import certify_model, check_run_options
        from certify.reports.report import radius_table, report_document, summary_table

        if cex_dir is not None:
            raise UserError("--cex-dir applies to --vnnlib runs only", "leave it out, or give --vnnlib")
        if not radius and (radius_tol is not None or radius_max is not None):
            given = "--radius-tol" if radius_tol is not None else "--radius-max"
            raise UserError(f"{given} applies only with --radius", "add --radius, or leave it out")
        options = dict(limit=limit, methods=methods, attack=not no_attack,
                       batch_size=50 if batch_size is None else batch_size, device=device, mean=means, std=stds,
                       seed=seed, radius=radius, radius_tol=1e-3 if radius_tol is None else radius_tol,
                       radius_max=radius_max, attack_steps=attack_steps,
                       attack_restarts=3 if attack_restarts is None else attack_restarts, split=split or "test")
        check_run_options(list(eps), **{k: v for k, v in options.items() if k != "attack"})
        data_path = Path(data) if data is not None and _is_path(data) else None
        _check_outputs([model_path, data_path], cex=False)
        run = certify_model(model_path, list(eps), data=data, quiet=quiet, **options)
        if run is None:  # a rank other than 0 under torchrun: rank 0 reports
            return None
        document = report_document(run)
        _write_outputs(document, run)
        if to_stdout:
            import json

            sys.stdout.write(json.dumps(document, indent=1) + "\n")
        else:
            if run.results:
                console.print(summary_table(run))
            if run.radius is not None:
                console.print(radius_table(run))
            if report_path is not None:
                console.print(f"report written to {report_path}")
        if plot is not None:
            console.print(f"plot written to {plot}")
        return run

    def _check_vnnlib(model_path: Optional[Path], methods, means, stds):
        from certify.reports.report import vnnlib_document, vnnlib_property_table, vnnlib_table
        from certify.verdicts.vnnlib_check import check_properties, check_vnnlib_options, write_counterexamples

        not_applying = [name for name, given in (("--eps", bool(eps)), ("--radius", radius),
                                                 ("--radius-tol", radius_tol is not None),
                                                 ("--radius-max", radius_max is not None), ("--plot", plot is not None),
                                                 ("--data", data is not None), ("--split", split is not None),
                                                 ("--limit", limit is not None)) if given]
        if not_applying:
            raise UserError(f"--vnnlib takes its boxes from the files: {', '.join(not_applying)} "
                            f"{'does' if len(not_applying) == 1 else 'do'} not apply",
                            "leave them out, or certify on a dataset without --vnnlib")
        restarts = 5 if attack_restarts is None else attack_restarts
        check_vnnlib_options(methods=methods, batch_size=16 if batch_size is None else batch_size,
                             attack_steps=attack_steps, attack_restarts=restarts, seed=seed, mean=means, std=stds,
                             device=device)
        folder = _cex_folder()

        def check_outputs(pairs):
            inputs = [model_path, *(Path(t) for t in vnnlib), *(f for pair in pairs for f in pair)]
            _check_outputs(inputs, cex=True)
            if folder is not None:
                _check_counterexample_names(folder, pairs, inputs)

        run = check_properties(model_path, list(vnnlib), methods=methods, attack=not no_attack,
                               attack_steps=attack_steps, attack_restarts=restarts,
                               seed=seed, batch_size=16 if batch_size is None else batch_size, device=device,
                               mean=means, std=stds, quiet=quiet, check_outputs=check_outputs)
        if run is None:  # a rank other than 0 under torchrun: rank 0 reports
            return None
        sat = sum(p.result == "sat" for p in run.properties)
        if sat and folder is not None:
            try:
                write_counterexamples(run, folder)
            except OSError as error:
                raise UserError(f"cannot write the counterexamples to {folder} ({error.strerror or error})",
                                "choose a writable --cex-dir") from None
        document = vnnlib_document(run)
        _write_outputs(document, None)
        if to_stdout:
            import json

            sys.stdout.write(json.dumps(document, indent=1) + "\n")
        else:
            if len(run.properties) <= 100:
                console.print(vnnlib_property_table(run))
            console.print(vnnlib_table(run))
            if report_path is not None:
                console.print(f"report written to {report_path}")
        if sat:
            console.print(f"{sat} counterexample(s) written to {folder}" if folder is not None
                          else f"{sat} counterexample(s) found; give --cex-dir or --json to write them")
        return run

    def _cex_folder() -> Optional[Path]:
        if cex_dir is not None:
            return cex_dir
        if report_path is not None:
            return report_path.parent / f"{report_path.stem}.counterexamples"
        return None

    def _check_outputs(inputs, *, cex: bool) -> None:
        """Every output: not an input, not a folder, in a folder that can be written; and no two
        outputs on one path. Run before any certification work."""
        from certify.common.files import check_output_path

        inputs = [i for i in inputs if i is not None]
        for option, path in (("--json", report_path), ("--plot", plot)):
            if path is not None and path.exists() and not path.is_dir() and not path.is_file():
                # A device, a pipe or a socket: renaming the report onto it would replace it.
                raise UserError(f"{option} {path} is not a regular file", f"give a file name for {option}")
        if report_path is not None:
            check_output_path(report_path, inputs, option="--json")
        if plot is not None:
            from certify.reports.plot import PLOT_SUFFIXES, check_plot_path

            check_plot_path(plot)
            check_output_path(plot, inputs, option="--plot", suffixes=PLOT_SUFFIXES)
            if report_path is not None and _same_path(plot, report_path):
                raise UserError(f"--plot and --json both name {plot}", "give them different files")
        folder = _cex_folder() if cex else None
        if folder is not None:
            option = "--cex-dir" if cex_dir is not None else "--json (its counterexample folder)"
            if folder.exists() and not folder.is_dir():
                raise UserError(f"{option} {folder} is a file, not a folder", "give a folder for the counterexamples")
            # The folder may not exist yet: probe where it would be created (a file in the way is refused).
            check_output_path(folder / "probe.counterexample", inputs, option=option)
            if report_path is not None and _same_path(folder, report_path):
                raise UserError(f"--cex-dir and --json both name {folder}", "give them different paths")

    def _write_outputs(document: dict, run) -> None:
        """The report and the plot, each whole or not at all, renamed into place together."""
        import contextlib
        import json

        from certify.common.files import atomic_path

        targets = [p for p in (report_path, plot if run is not None else None) if p is not None]
        if not targets:
            return
        try:
            with contextlib.ExitStack() as stack:
                temporary = {target: stack.enter_context(atomic_path(target)) for target in targets}
                if report_path is not None:
                    temporary[report_path].write_text(json.dumps(document, indent=1))
                if plot is not None and run is not None:
                    from certify.reports.plot import draw_plot

                    draw_plot(run, temporary[plot], plot.suffix.lower().lstrip("."))
        except OSError as error:
            raise UserError(f"cannot write {' / '.join(str(t) for t in targets)} ({error.strerror or error})",
                            "choose a writable folder with free space") from None

    run_cli(body, debug)
    if failed:
        console.print(f"[bold red]fail:[/] {failed[0]}", highlight=False)
        raise typer.Exit(1)


def _is_path(text: str) -> bool:
    from certify.data.datasets import KNOWN_DATASETS

    if text.lower() in KNOWN_DATASETS:
        return False
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return str(a) == str(b)


def _check_counterexample_names(folder: Path, pairs, inputs) -> None:
    """The counterexample files a run may write: none may be an input or stand where a folder is."""
    import os

    from certify.verdicts.vnnlib_check import counterexample_name

    if not folder.is_dir():
        return  # created by the run: nothing stands in the way
    resolved = set()
    for item in inputs:
        try:
            resolved.add(os.path.realpath(item))
        except (OSError, ValueError):
            pass
    for onnx, prop in pairs:
        target = folder / counterexample_name(onnx, prop)
        if target.is_dir() or os.path.realpath(target) in resolved:
            raise UserError(f"the counterexample of {prop} would be written to {target}, which is "
                            f"{'a folder' if target.is_dir() else 'an input of this run'}",
                            "choose another --cex-dir")


def parse_methods(text: Optional[str]) -> tuple[str, ...]:
    from certify.bounds.bounder import METHODS

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
