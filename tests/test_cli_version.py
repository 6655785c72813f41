"""`harden --version` and `certify --version`: the installed package's version, exit code 0, before any
other option is looked at; and every harden command that reads a model takes the same loading options."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from certify.cli import app as certify_app
from harden.cli import app as harden_app


@pytest.mark.parametrize("program, app", [("harden", harden_app), ("certify", certify_app)])
def test_version_prints_the_package_version(program, app):
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{program} {version('harden')}"


def test_certify_version_comes_before_the_other_checks():
    # No model, no --eps: --version still answers and exits 0.
    result = CliRunner().invoke(certify_app, ["--version", "--method", "no-such-method"])
    assert result.exit_code == 0 and result.output.startswith("certify ")


@pytest.mark.parametrize("command", ["convert", "export", "inspect", "finetune", "prune"])
def test_every_model_reading_command_takes_the_loading_options(command):
    result = CliRunner().invoke(harden_app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--input-shape", "--arch", "--trust-pickle", "--trust-code", "--debug"):
        assert option in result.output
