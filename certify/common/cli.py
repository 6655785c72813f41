"""What both command lines share: one-line errors, exit codes, usage errors, number lists.

Exit codes: 0 done, 1 a --fail-under gate failed, 2 a problem the user can fix (UserError or a
usage error), 3 a bug in this tool (one line; the traceback with --debug), 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from certify.common.errors import UserError
from certify.common.progress import console

try:  # typer vendors click from 0.17 on; older releases use the click package
    from typer._click.exceptions import UsageError as _UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError as _UsageError

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
        error_line(str(error))
        raise typer.Exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        error_line("interrupted -- no output was written; run the command again")
        raise typer.Exit(130)
    except MemoryError:
        if debug:
            raise
        error_line("out of memory -- lower --batch-size or --limit, or use a machine with more memory")
        raise typer.Exit(2)
    except Exception as error:  # noqa: BLE001 -- the last line of defence against tracebacks
        if debug:
            raise
        first = str(error).splitlines()[0][:300] if str(error) else ""
        error_line(f"internal error ({type(error).__name__}{': ' + first if first else ''}) -- this is a bug; "
                    f"please report it at {BUG_REPORT} with the output of the same command run with --debug")
        raise typer.Exit(3)


def error_line(message: str) -> None:
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


def hide_flag_types(command, ctx) -> None:
    """Flags (--quiet, --help, ...) take no value: typer's help would show them a `<bool>` type column."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class OneLineUsageErrors(TyperCommand):
    """Usage errors (an unknown option, a value that is not a number) as the one line that every
    other error is: `error: what -- hint`, exit code 2 (click prints a usage block instead)."""

    def format_help(self, ctx, formatter) -> None:
        hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # no arguments: the help is the answer
                raise
            error_line(usage_error_message(error, "certify"))
            raise typer.Exit(2) from None


def usage_error_message(error, program: str) -> str:
    """A click usage error as one line that says where the help is."""
    command = error.ctx.command_path if getattr(error, "ctx", None) is not None else program
    return f"{' '.join(error.format_message().split())} -- see '{command} --help'"


class OneLineErrorsGroup(TyperGroup):
    """Usage errors (a missing option, a value that is not a number, an unknown option) come out as
    ONE line with exit code 2, like every other error, instead of typer's framed block."""

    def format_help(self, ctx, formatter) -> None:
        hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:  # the subcommand's help shows no `<bool>` either
            hide_flag_types(command, ctx)
        return command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # `harden` alone: the help text
                error.show()
                sys.exit(error.exit_code)
            error_line(usage_error_message(error, "harden"))
            sys.exit(error.exit_code)
        except typer.Abort:
            error_line("aborted -- no output was written")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


