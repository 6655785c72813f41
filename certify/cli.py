"""`certify`: measure the robustness of an ONNX classifier. Changes nothing.

The command parses its options into one `Run`; the dataset mode (`--eps`) and the VNN-LIB mode
(`--vnnlib`) are each a function of it, and both check and write their outputs the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from certify.common.cli import OneLineUsageErrors, parse_floats, run_cli
from certify.common.cli_options import Debug, Device, Mean, Quiet, Seed, Std, version_option
from certify.common.errors import UserError
from certify.common.progress import console, results_console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Certify the robustness of a classifier: per sample verified, falsified or unknown.")
Version = version_option("certify")
# Seconds of --radius bisection per sample unless --radius-budget says otherwise: a run over N samples
# then ends in about N times this at worst, and a budget only makes a radius less tight, never unsound.
DEFAULT_RADIUS_BUDGET = 30.0


@app.command(cls=OneLineUsageErrors)
def main_command(
    model: Optional[Path] = typer.Argument(None, help="ONNX model to certify (from `harden export`, or third-party with --data); may be left out with --vnnlib instances.csv."),
    eps: list[float] = typer.Option([], "--eps", help="Radius in pixel units (l-infinity, or l2 with --norm 2); repeat for several."),
    data: Optional[str] = typer.Option(None, "--data", help="mnist, fashion-mnist, cifar10 (your copy, see the README), file.npz or a folder of class folders; default: from the model's metadata."),
    split: Optional[str] = typer.Option(None, "--split", help="train or test (default test)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Certify only the first N samples."),
    method: Optional[str] = typer.Option(None, "--method", help="Force one bound method: lipschitz, ibp, crown, alpha-crown or bab (branch and bound), or a comma-separated cascade (default: lipschitz,ibp,crown,alpha-crown, then bab with --timeout)."),
    no_attack: bool = typer.Option(False, "--no-attack", help="Skip the PGD attack (samples that would be falsified become unknown)."),
    attack_steps: int = typer.Option(50, "--attack-steps", help="PGD steps per restart."),
    attack_restarts: Optional[int] = typer.Option(None, "--attack-restarts", help="PGD restarts (default 3; 5 with --vnnlib)."),
    radius: bool = typer.Option(False, "--radius", help="Also find each sample's largest certified eps, by bisection."),
    radius_tol: Optional[float] = typer.Option(None, "--radius-tol", help="Bisection tolerance of --radius (pixel units; default 1e-3)."),
    radius_max: Optional[float] = typer.Option(None, "--radius-max", help="Largest eps --radius searches (default: the width of the input range; with --norm 2 its l2 diameter)."),
    radius_budget: Optional[float] = typer.Option(None, "--radius-budget", help="Seconds of --radius bisection per sample (default 30); a sample out of time keeps the largest eps verified so far."),
    norm: Optional[str] = typer.Option(None, "--norm", help="inf (l-infinity boxes, the default) or 2 (l2 balls of radius eps in pixel units)."),
    vnnlib: list[str] = typer.Option([], "--vnnlib", help="Check VNN-LIB properties instead: a .vnnlib file, a folder of them or a VNN-COMP instances.csv; repeat for several."),
    cex_dir: Optional[Path] = typer.Option(None, "--cex-dir", help="Folder for the counterexamples of sat properties (default: next to --json)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds of branch and bound per sample (per property with --vnnlib, capped by what the instances.csv timeout column leaves after the bounds); adds bab to the default cascade."),
    max_domains: int = typer.Option(200_000, "--max-domains", help="Domains branch and bound may bound per sample or property."),
    branching: str = typer.Option("babsr", "--branching", help="Branch and bound's ReLU choice: babsr or fsb (filtered smart branching)."),
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", help="With --vnnlib: write one VNN-COMP result file per property here (unsat / sat + assignment / timeout / unknown)."),
    mean: Mean = None,
    std: Std = None,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples (or properties) bounded together (default 50; 16 with --vnnlib)."),
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (per-sample verdicts, sha256, spec, versions) as JSON; '-' for stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a plot (.png/.pdf/.svg): accuracy against eps, and certified radii with --radius."),
    fail_under: Optional[float] = typer.Option(None, "--fail-under", help="Exit with code 1 when the certified accuracy at any --eps (with --vnnlib: the verified fraction) is below this fraction, for CI gates."),
    quiet: Quiet = False,
    debug: Debug = False,
    version: Version = False,
) -> None:
    """Certify MODEL at each --eps (clean, attacked and certified accuracy, per-sample verdicts), or
    check VNN-LIB properties with --vnnlib (unsat / sat with a counterexample / unknown).

    Every option and every output path is checked before any work: a bad one is one line
    (`error: what -- what to do`), exit code 2, and nothing is written.

    `certify check REPORT.json` re-checks a report against a model file (see `certify check --help`).
    """
    options = Run(model=model, eps=list(eps), data=data, split=split, limit=limit, method=method,
                  attack=not no_attack, attack_steps=attack_steps, attack_restarts=attack_restarts, radius=radius,
                  radius_tol=radius_tol, radius_max=radius_max, radius_budget=radius_budget, vnnlib=list(vnnlib),
                  cex_dir=cex_dir, mean=mean, std=std, batch_size=batch_size, device=device, seed=seed,
                  json_out=json_out, plot=plot,
                  fail_under=fail_under, quiet=quiet, norm=norm, timeout=timeout, max_domains=max_domains,
                  branching=branching, results_dir=results_dir)
    failed: list[str] = []
    run_cli(lambda: failed.extend(_run(options)), debug)
    if failed:
        console.print(f"[bold red]fail:[/] {failed[0]}", highlight=False)
        raise typer.Exit(1)


@dataclass
class Run:
    """The options of one `certify` run, as given on the command line."""

    model: Optional[Path]
    eps: list[float]
    data: Optional[str]
    split: Optional[str]
    limit: Optional[int]
    method: Optional[str]
    attack: bool
    attack_steps: int
    attack_restarts: Optional[int]
    radius: bool
    radius_tol: Optional[float]
    radius_max: Optional[float]
    vnnlib: list[str]
    cex_dir: Optional[Path]
    mean: Optional[str]
    std: Optional[str]
    batch_size: Optional[int]
    device: str
    seed: int
    json_out: Optional[Path]
    plot: Optional[Path]
    fail_under: Optional[float]
    quiet: bool
    norm: Optional[str] = None
    radius_budget: Optional[float] = None
    timeout: Optional[float] = None
    max_domains: int = 200_000
    branching: str = "babsr"
    results_dir: Optional[Path] = None

    def bab_options(self) -> dict:
        return dict(timeout=self.timeout, max_domains=self.max_domains, branching=self.branching)

    @property
    def to_stdout(self) -> bool:
        return self.json_out is not None and str(self.json_out) == "-"

    @property
    def report_path(self) -> Optional[Path]:
        return None if self.json_out is None or self.to_stdout else self.json_out

    def cex_folder(self) -> Optional[Path]:
        if self.cex_dir is not None:
            return self.cex_dir
        if self.report_path is not None:
            return self.report_path.parent / f"{self.report_path.stem}.counterexamples"
        return None


def _run(options: Run) -> list[str]:
    """Parse, run the mode the options ask for; the --fail-under reason, if the gate failed."""
    from certify.reports.report import check_fail_under, validate_fail_under
    from certify.bounds.compat import require_auto_lirpa

    require_auto_lirpa()  # a pip-installed harden lacks it until `harden setup`: say so before anything else
    methods = parse_methods(options.method, bab=options.timeout is not None)
    validate_fail_under(options.fail_under, bool(options.eps), bool(options.vnnlib))
    means, stds = parse_floats(options.mean, "--mean"), parse_floats(options.std, "--std")
    if options.vnnlib:
        run = _check_vnnlib(options, methods, means, stds)
    else:
        if options.model is None:
            raise UserError("no model given", "certify MODEL.onnx --eps 0.1 (only --vnnlib instances.csv names its own models)")
        run = _certify_dataset(options, methods, means, stds)
    reason = check_fail_under(options.fail_under, run) if run is not None else None
    return [] if reason is None else [reason]


def _certify_dataset(o: Run, methods, means, stds):
    from certify.reports.report import radius_table, report_document, summary_table
    from certify.verdicts.dataset import certify_model, check_run_options

    if o.cex_dir is not None:
        raise UserError("--cex-dir applies to --vnnlib runs only", "leave it out, or give --vnnlib")
    if o.results_dir is not None:
        raise UserError("--results-dir applies to --vnnlib runs only", "leave it out, or give --vnnlib")
    if not o.radius and (o.radius_tol is not None or o.radius_max is not None or o.radius_budget is not None):
        given = "--radius-tol" if o.radius_tol is not None else "--radius-max" if o.radius_max is not None \
            else "--radius-budget"
        raise UserError(f"{given} applies only with --radius", "add --radius, or leave it out")
    options = dict(limit=o.limit, methods=methods, attack=o.attack,
                   batch_size=50 if o.batch_size is None else o.batch_size, device=o.device, mean=means, std=stds,
                   seed=o.seed, radius=o.radius, radius_tol=1e-3 if o.radius_tol is None else o.radius_tol,
                   radius_max=o.radius_max, attack_steps=o.attack_steps,
                   attack_restarts=3 if o.attack_restarts is None else o.attack_restarts, split=o.split or "test",
                   norm=o.norm or "inf")
    check_run_options(o.eps, **{k: v for k, v in options.items() if k != "attack"})
    data_path = Path(o.data) if o.data is not None and _is_path(o.data) else None
    _check_outputs(o, [o.model, data_path], cex=False)
    budget = DEFAULT_RADIUS_BUDGET if o.radius_budget is None else o.radius_budget
    run = certify_model(o.model, o.eps, data=o.data, quiet=o.quiet, radius_budget=budget, **options,
                        **o.bab_options())
    if run is None:  # a rank other than 0 under torchrun: rank 0 reports
        return None
    document = report_document(run)
    _write_outputs(o, document, run)
    if not _dump_to_stdout(o, document):
        tables = results_console()
        if run.results:
            tables.print(summary_table(run))
        if run.radius is not None:
            tables.print(radius_table(run))
        if o.report_path is not None:
            console.print(f"report written to {o.report_path}")
    if o.plot is not None:
        console.print(f"plot written to {o.plot}")
    return run


def _dump_to_stdout(o: Run, document: dict) -> bool:
    """`--json -`: the report on stdout (and no tables). True when it went there."""
    if not o.to_stdout:
        return False
    import json

    sys.stdout.write(json.dumps(document, indent=1) + "\n")
    return True


def _refuse_dataset_options(o: Run) -> None:
    not_applying = [name for name, given in (("--eps", bool(o.eps)), ("--radius", o.radius),
                                             ("--radius-tol", o.radius_tol is not None),
                                             ("--radius-max", o.radius_max is not None), ("--plot", o.plot is not None),
                                             ("--radius-budget", o.radius_budget is not None),
                                             ("--data", o.data is not None), ("--split", o.split is not None),
                                             ("--limit", o.limit is not None), ("--norm", o.norm is not None)) if given]
    if not_applying:
        raise UserError(f"--vnnlib takes its boxes from the files: {', '.join(not_applying)} "
                        f"{'does' if len(not_applying) == 1 else 'do'} not apply",
                        "leave them out, or certify on a dataset without --vnnlib")


def _check_vnnlib(o: Run, methods, means, stds):
    from certify.reports.report import vnnlib_document, vnnlib_property_table, vnnlib_table
    from certify.verdicts.vnnlib_check import check_properties, check_vnnlib_options

    _refuse_dataset_options(o)
    restarts = 5 if o.attack_restarts is None else o.attack_restarts
    batch_size = 16 if o.batch_size is None else o.batch_size
    check_vnnlib_options(methods=methods, batch_size=batch_size, attack_steps=o.attack_steps,
                         attack_restarts=restarts, seed=o.seed, mean=means, std=stds, device=o.device)
    folder = o.cex_folder()

    def check_outputs(pairs):
        inputs = [o.model, *(Path(t) for t in o.vnnlib), *(f for pair in pairs for f in pair)]
        _check_outputs(o, inputs, cex=True)
        if o.results_dir is not None and o.results_dir.exists() and not o.results_dir.is_dir():
            raise UserError(f"--results-dir {o.results_dir} is a file", "give a folder (it is created if missing)")
        if folder is not None:
            _check_counterexample_names(folder, pairs, inputs)

    run = check_properties(o.model, o.vnnlib, methods=methods, attack=o.attack, attack_steps=o.attack_steps,
                           attack_restarts=restarts, seed=o.seed, batch_size=batch_size, device=o.device,
                           mean=means, std=stds, quiet=o.quiet, check_outputs=check_outputs, **o.bab_options())
    if run is None:  # a rank other than 0 under torchrun: rank 0 reports
        return None
    sat = sum(p.result == "sat" for p in run.properties)
    if sat and folder is not None:
        _write_counterexamples(run, folder)
    if o.results_dir is not None:
        from certify.verdicts.vnnlib_bab import write_results

        write_results(run, o.results_dir)
    document = vnnlib_document(run)
    _write_outputs(o, document, None)
    if not _dump_to_stdout(o, document):
        tables = results_console()
        if len(run.properties) <= 100:
            tables.print(vnnlib_property_table(run))
        tables.print(vnnlib_table(run))
        if o.report_path is not None:
            console.print(f"report written to {o.report_path}")
    if sat:
        console.print(f"{sat} counterexample(s) written to {folder}" if folder is not None
                      else f"{sat} counterexample(s) found; give --cex-dir or --json to write them")
    return run


def _write_counterexamples(run, folder: Path) -> None:
    from certify.verdicts.vnnlib_check import write_counterexamples

    try:
        write_counterexamples(run, folder)
    except OSError as error:
        raise UserError(f"cannot write the counterexamples to {folder} ({error.strerror or error})",
                        "choose a writable --cex-dir") from None


def _check_outputs(o: Run, inputs, *, cex: bool) -> None:
    """Every output: not an input, not a folder, in a folder that can be written; and no two
    outputs on one path. Run before any certification work."""
    from certify.common.files import check_output_path

    inputs = [i for i in inputs if i is not None]
    report_path, plot = o.report_path, o.plot
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
    folder = o.cex_folder() if cex else None
    if folder is not None:
        option = "--cex-dir" if o.cex_dir is not None else "--json (its counterexample folder)"
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{option} {folder} is a file, not a folder", "give a folder for the counterexamples")
        # The folder may not exist yet: probe where it would be created (a file in the way is refused).
        check_output_path(folder / "probe.counterexample", inputs, option=option)
        if report_path is not None and _same_path(folder, report_path):
            raise UserError(f"--cex-dir and --json both name {folder}", "give them different paths")


def _write_outputs(o: Run, document: dict, run) -> None:
    """The report and the plot, each whole or not at all, renamed into place together."""
    import contextlib
    import json

    from certify.common.files import atomic_path

    report_path, plot = o.report_path, (o.plot if run is not None else None)
    targets = [p for p in (report_path, plot) if p is not None]
    if not targets:
        return
    try:
        with contextlib.ExitStack() as stack:
            temporary = {target: stack.enter_context(atomic_path(target)) for target in targets}
            if report_path is not None:
                temporary[report_path].write_text(json.dumps(document, indent=1))
            if plot is not None:
                from certify.reports.plot import draw_plot

                draw_plot(run, temporary[plot], plot.suffix.lower().lstrip("."))
    except OSError as error:
        raise UserError(f"cannot write {' / '.join(str(t) for t in targets)} ({error.strerror or error})",
                        "choose a writable folder with free space") from None


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


def parse_methods(text: Optional[str], *, bab: bool = False) -> tuple[str, ...]:
    """The --method list; by default the bound cascade, ending with branch and bound when `bab`."""
    from certify.bounds.bounder import METHODS
    from certify.verdicts.cascade import CASCADE_METHODS

    if text is None:
        return METHODS + ("bab",) if bab else METHODS
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [m for m in methods if m not in CASCADE_METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --method {text!r}", f"use one of {', '.join(CASCADE_METHODS)} (or a comma-separated list)")
    return methods


def main() -> None:
    if sys.argv[1:2] == ["check"]:  # `certify check REPORT.json`: a second command beside `certify MODEL`
        from certify.check_cli import check_app

        check_app(sys.argv[2:], prog_name="certify check")
        return
    app()


if __name__ == "__main__":
    main()
