"""VNN-LIB properties: one input box and a counterexample region over the outputs.

A VNN-LIB file (the SMT-LIB subset of VNN-COMP) declares inputs `X_0..X_{n-1}` and outputs
`Y_0..Y_{m-1}` and asserts constraints whose conjunction describes a COUNTEREXAMPLE: the property is
`sat` when some x in the input box gives an output y that meets the output constraints, `unsat`
(verified) when none does.

Supported forms: `;` comments, `(declare-const X_i Real)`, `(assert F)` where F is built from
`and`, `or` and the comparisons `<= >= < > =` (chains allowed) between linear terms (numbers,
declared variables, `+`, `-`, `*` by a constant). Strict comparisons are read as non-strict: the
closed region is empty only if the strict one is, so `unsat` stays sound (only a point exactly on a
strict boundary would be reported as a counterexample). Input constraints
must be per-variable bounds, i.e. one box; several asserts AND together; an `or` may repeat the
same input bounds in every branch (as vnncomp_test_tiny does) but not describe different boxes.
Every parse error is a `UserError` that names the file and line.

Precision and the decision threshold: the input box (`lower`, `upper`) and the region's `C` and `d`
are float64, the values written in the file read to the nearest float64, and are never cast to
float32 here. A model that computes in float32 is bounded on the box rounded OUTWARD
(`certify.specs.rounding.outward_box`, the one rounding of every box) and attacked inside the box
rounded inward (`inward_box`). A property is proved (`unsat`) only when, for EVERY item of
`unsafe`, SOME row r has a certified lower bound of C_r y - d_r that is strictly > 0: the bound is
for the float64 row C_r as written (a coefficient float32 cannot hold is not rounded first), and the
margin is formed in float64 against the float64 d_r. A margin of exactly 0 proves nothing (the
closed region may touch the output set).

The reading runs in order: `vnnlib_sexpr` (file text, s-expressions), `vnnlib_property` (the
result type), `vnnlib_parser` (the property parser), `vnnlib_instances` (which files to check) and
`vnnlib_counterexample` (result files). This module is the public face of all of them.
"""

from __future__ import annotations

from certify.specs.vnnlib_counterexample import read_counterexample, write_counterexample
from certify.specs.vnnlib_instances import find_properties, read_instances
from certify.specs.vnnlib_parser import parse_vnnlib
from certify.specs.vnnlib_property import OutputConstraint, VnnlibProperty

__all__ = [
    "OutputConstraint",
    "VnnlibProperty",
    "parse_vnnlib",
    "find_properties",
    "read_instances",
    "write_counterexample",
    "read_counterexample",
]
