"""The branch-and-bound options on the command line: accepted, refused with one line, and the
default cascade that gains "bab" only with --timeout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from certify.bounds.bounder import METHODS
from certify.cli import app, parse_methods
from certify.common.errors import UserError

TINY = Path(__file__).resolve().parents[2] / "shared" / "vnncomp" / "vnncomp_test_tiny"


def test_bab_joins_the_default_cascade_only_with_a_timeout():
    assert parse_methods(None) == METHODS
    assert parse_methods(None, bab=True) == METHODS + ("bab",)
    assert parse_methods("crown,bab") == ("crown", "bab")
    with pytest.raises(UserError):
        parse_methods("crown,babs")


@pytest.mark.parametrize("options, message", [
    (["--timeout", "-1"], "--timeout"),
    (["--timeout", "0"], "--timeout"),
    (["--max-domains", "0"], "--max-domains"),
    (["--branching", "random"], "--branching"),
])
def test_bad_options_are_one_line(tmp_path, options, message):
    result = CliRunner().invoke(app, [str(TINY / "test_unsat.onnx"), "--vnnlib", str(TINY / "test_prop.vnnlib"),
                                      "--json", str(tmp_path / "r.json"), *options])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not TINY.is_dir(), reason="shared VNN-COMP benchmarks not present")
def test_vnncomp_mode_writes_one_result_per_row(tmp_path):
    for name in ("test_sat.onnx", "test_unsat.onnx", "test_prop.vnnlib"):
        shutil.copy(TINY / name, tmp_path / name)
    (tmp_path / "instances.csv").write_text("test_sat.onnx,test_prop.vnnlib,60\ntest_unsat.onnx,test_prop.vnnlib,60\n")
    result = CliRunner().invoke(app, ["--vnnlib", str(tmp_path / "instances.csv"), "--method", "ibp,bab",
                                      "--no-attack", "--timeout", "20", "--results-dir", str(tmp_path / "results"),
                                      "--json", str(tmp_path / "r.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "test_unsat__test_prop.result").read_text() == "unsat\n"
    assert (tmp_path / "results" / "test_sat__test_prop.result").read_text().startswith("sat\n((X_0 ")
    report = json.loads((tmp_path / "r.json").read_text())
    methods = sorted(p["method"] for p in report["properties"])
    assert methods == ["bab-input", "bab-input"]
    assert all(p["bab"]["domains"] >= 0 for p in report["properties"])
