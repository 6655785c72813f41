"""Branch and bound on the third-party VNN-COMP 2021 nets (../shared/vnncomp): never unsat where
the competition found a counterexample (with the attack off, so the search itself meets those
rows), every sat confirmed on the file, input splitting on the tiny nets, the instances.csv timeout
column, and the competition's result files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from certify.specs.vnnlib import parse_vnnlib, read_counterexample
from certify.specs.vnnlib_instances import read_instance_rows
from certify.verdicts.vnnlib_bab import (competition_verdict,
                                         instance_timeouts, property_timeout,
                                         result_name, write_results)
from certify.verdicts.vnnlib_check import SAT, UNSAT, check_properties

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"
pytestmark = pytest.mark.skipif(not VNNCOMP.is_dir(), reason="shared VNN-COMP benchmarks not present")
MNISTFC = VNNCOMP / "mnistfc"
# Rows the 2021 majority calls sat whose alpha-CROWN margin is closest to 0 (expected_results.csv).
SAT_ROWS = (("mnist-net_256x2.onnx", "prop_14_0.03.vnnlib"), ("mnist-net_256x4.onnx", "prop_2_0.03.vnnlib"))


@pytest.mark.parametrize("onnx, vnnlib", SAT_ROWS)
def test_sat_rows_are_never_unsat_without_the_attack(onnx, vnnlib):
    run = check_properties(MNISTFC / onnx, [MNISTFC / "vnnlib" / vnnlib], methods=("crown", "bab"), attack=False,
                           timeout=8.0, quiet=True)
    (result,) = run.properties
    assert result.result != UNSAT
    if result.result == SAT:
        assert result.method == "bab"
        prop = parse_vnnlib(result.vnnlib)
        assert ((result.x.double().flatten() >= prop.lower) & (result.x.double().flatten() <= prop.upper)).all()
        assert prop.is_counterexample(result.y)


def test_a_row_alpha_crown_leaves_open_is_proved():
    run = check_properties(MNISTFC / "mnist-net_256x2.onnx", [MNISTFC / "vnnlib" / "prop_0_0.03.vnnlib"],
                           methods=("alpha-crown", "bab"), timeout=60.0, quiet=True)
    (result,) = run.properties
    assert result.result == UNSAT and result.method == "bab"
    assert result.bab["lower_bound"] > 0 and result.bab["domains"] > 0


def test_input_split_decides_the_tiny_nets(tmp_path):
    tiny = VNNCOMP / "vnncomp_test_tiny"
    csv = tmp_path / "instances.csv"
    for name in ("test_sat.onnx", "test_unsat.onnx", "test_prop.vnnlib"):
        shutil.copy(tiny / name, tmp_path / name)
    csv.write_text("test_sat.onnx,test_prop.vnnlib,60\ntest_unsat.onnx,test_prop.vnnlib,7.5\n")
    # IBP alone decides neither and the attack is off: the input-split search answers both.
    run = check_properties(None, [csv], methods=("ibp", "bab"), attack=False, quiet=True)
    by_model = {Path(p.onnx).name: p for p in run.properties}
    assert by_model["test_unsat.onnx"].result == UNSAT and by_model["test_unsat.onnx"].method == "bab-input"
    assert by_model["test_sat.onnx"].result == SAT and by_model["test_sat.onnx"].method == "bab-input"

    written = write_results(run, tmp_path / "results")
    assert written == 2
    unsat_file = tmp_path / "results" / result_name("test_unsat.onnx", "test_prop.vnnlib")
    assert unsat_file.read_text() == "unsat\n"
    sat_file = tmp_path / "results" / result_name("test_sat.onnx", "test_prop.vnnlib")
    assert sat_file.read_text().startswith("sat\n((X_0 ")
    x, y = read_counterexample(sat_file)
    assert parse_vnnlib(tmp_path / "test_prop.vnnlib").is_counterexample(y)

    timeouts = instance_timeouts([csv])
    assert sorted(timeouts.values()) == [7.5, 60.0]


def test_the_timeout_column_is_read_and_capped():
    rows, _ = read_instance_rows(MNISTFC / "instances.csv", skip_missing=True)
    seconds = {(onnx.name, vnnlib.name): value for onnx, vnnlib, value in rows}
    assert seconds[("mnist-net_256x2.onnx", "prop_0_0.03.vnnlib")] == 120.0
    assert seconds[("mnist-net_256x4.onnx", "prop_0_0.03.vnnlib")] == 300.0
    assert property_timeout(120.0, 20.0) == 20.0
    assert property_timeout(None, 20.0) == 20.0
    assert property_timeout(120.0, None) == 120.0
    assert property_timeout(None, None) is None
    # The row's timeout covers the stages before the search too; --timeout is the search's own.
    assert property_timeout(120.0, None, spent=30.0) == 90.0
    assert property_timeout(120.0, 100.0, spent=30.0) == 90.0
    assert property_timeout(120.0, 20.0, spent=30.0) == 20.0
    assert property_timeout(None, 20.0, spent=30.0) == 20.0
    assert property_timeout(10.0, None, spent=30.0) == 0.0
    assert competition_verdict("unknown", {"reason": "timeout"}) == "timeout"
    assert competition_verdict("unknown", {"reason": "domain limit"}) == "unknown"
    assert competition_verdict("unknown", None) == "unknown"
    assert competition_verdict("unsat", None) == "unsat"
