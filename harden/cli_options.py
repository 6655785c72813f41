"""The options of harden's commands, declared once: every command that takes one of them uses the
alias below (the options both programs share are in certify.common.cli_options), and every command
that reads a model gets --input-shape, --arch, --trust-pickle and --trust-code from `reads_model`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from inspect import Parameter, signature as inspect_signature
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from certify.common.cli import run_cli
from certify.common.cli_options import Debug, version_option
from harden.cli_checks import load, parse_shape

ARCH_HELP = "Architecture for weights-only files: small-cnn, small-cnn-bn, wide-cnn-bn, medium-cnn-bn, mlp, mlp-elu-512 or package.module:factory."
Model = Annotated[Path, typer.Argument(help="Model file (any accepted format; ONNX too for inspect).")]
_OUTPUT = typer.Option("-o", "--output", help="Where to write the result: a .safetensors bundle (.onnx for export).")
Output = Annotated[Path, _OUTPUT]
MaybeOutput = Annotated[Optional[Path], _OUTPUT]
Data = Annotated[Optional[str], typer.Option(
    "--data", help="mnist, fashion-mnist, file.npz or a folder of class folders (default: the model's; mnist for train).")]
Arch = Annotated[Optional[str], typer.Option("--arch", help=ARCH_HELP)]
InputShape = Annotated[Optional[str], typer.Option(
    "--input-shape", help="Per-sample input shape C,H,W (for formats that do not record it).")]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow what can run code from the file: a fully pickled module, torch.export.load "
                           "of a .pt2, TorchScript that reads or writes files.")]
TrustCode = Annotated[bool, typer.Option(
    "--trust-code", help="Allow the architecture factory recorded in a bundle to be imported and called "
                         "(runs code named by the file).")]
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the training set.")]
Lr = Annotated[float, typer.Option("--lr", help="Adam learning rate.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Global batch (split across processes under torchrun).")]
Steps = Annotated[int, typer.Option("--steps", help="PGD/TRADES attack steps (step size 2.5 * eps / steps).")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Train on the first N training samples only.")]
Resume = Annotated[Optional[Path], typer.Option(
    "--resume", help="Continue from a checkpoint (same MODEL, data and options).")]
CheckpointDir = Annotated[Optional[Path], typer.Option(
    "--checkpoint-dir", help="Keep one checkpoint per epoch here (default: one file OUT.ckpt.safetensors, rewritten each epoch).")]
EvalLimit = Annotated[Optional[int], typer.Option("--eval-limit", help="Evaluate on the first N test samples only.")]
Version = version_option("harden")


@dataclass
class ModelFile:
    """MODEL and how to read it: the options every command that loads a model takes."""

    path: Path
    input_shape: Optional[str]
    arch: Optional[str]
    trust_pickle: bool
    trust_code: bool

    def load(self):
        return load(self.path, self.arch, self.trust_pickle, self.trust_code, parse_shape(self.input_shape))


_MODEL_OPTIONS = (("input_shape", InputShape, None), ("arch", Arch, None), ("trust_pickle", TrustPickle, False),
                  ("trust_code", TrustCode, False))


def reads_model(command):
    """Give `command` the options that say how to read MODEL (declared once, in _MODEL_OPTIONS); it
    receives them, with MODEL, as one ModelFile `model`."""

    def call(given: dict):
        options = {name: given.pop(name) for name, _, _ in _MODEL_OPTIONS}
        return command(**{**given, "model": ModelFile(given["model"], **options)})

    return _with_options(command, _MODEL_OPTIONS, call)


def one_line_errors(command):
    """Give `command` --debug and run it the way every command runs: each failure one line with its
    exit code (certify.common.cli.run_cli), the traceback only with --debug."""

    def call(given: dict):
        debug = given.pop("debug")
        return run_cli(lambda: command(**given), debug)

    return _with_options(command, (("debug", Debug, False),), call)


def _with_options(command, options, call):
    """`command` as typer sees it with the keyword options (name, Annotated type, default) added;
    `call(given)` receives every value given and runs it."""
    hints = get_type_hints(command, include_extras=True)  # typer reads the Annotated options from these
    signature = inspect_signature(command)
    parameters = [p.replace(kind=Parameter.KEYWORD_ONLY, annotation=hints[p.name]) for p in signature.parameters.values()]
    parameters += [Parameter(name, Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                   for name, annotation, default in options]

    @functools.wraps(command)
    def wrapper(**given):
        return call(given)

    wrapper.__signature__ = signature.replace(parameters=parameters)
    wrapper.__annotations__ = {**hints, **{name: annotation for name, annotation, _ in options}}
    return wrapper
