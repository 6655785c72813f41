"""A VNN-LIB property is proved as written, in float64: a coefficient that float32 cannot hold must
not be rounded before it is bounded (the rounded property can be empty where the real one is not)."""

from __future__ import annotations

import torch
from torch import nn

from certify.verdicts.vnnlib_check import check_properties

# y0 = x on the single point x = 1: 0.1 * y0 <= 0.1 holds exactly (a counterexample), but with 0.1
# rounded to float32 (0.100000001...) the bound 0.1f * 1 > 0.1 would call it unsat.
PROPERTY = """(declare-const X_0 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (>= X_0 1.0))
(assert (<= X_0 1.0))
(assert (<= (* {c} Y_0) {d}))
"""


def _identity_net(path):
    net = nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0], [0.0]]))
        net.bias.zero_()
    torch.onnx.export(net.eval(), torch.zeros(1, 1), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})


def _check(tmp_path, c: str, d: str, methods=("ibp", "crown")):
    _identity_net(tmp_path / "net.onnx")
    (tmp_path / "p.vnnlib").write_text(PROPERTY.format(c=c, d=d))
    run = check_properties(tmp_path / "net.onnx", [tmp_path / "p.vnnlib"], methods=methods, attack=False, quiet=True)
    return run.properties[0].result


def test_a_coefficient_float32_cannot_hold_is_not_rounded_into_a_proof(tmp_path):
    assert _check(tmp_path, "0.1", "0.1") != "unsat"


def test_exact_coefficients_still_prove_what_holds(tmp_path):
    # 0.1 * y0 <= 0.09 has no solution at y0 = 1 (the float64 and the float32 path agree).
    assert _check(tmp_path, "0.1", "0.09") == "unsat"
    assert _check(tmp_path, "0.5", "0.25") == "unsat"
