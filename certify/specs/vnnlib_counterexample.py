"""VNN-COMP counterexample files: `sat` and the assignment ((X_0 v) ... (Y_0 v) ...)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from certify.common.files import atomic_path
from certify.specs.vnnlib_parser import _NUMBER, _VARIABLE
from certify.specs.vnnlib_sexpr import _fail, _List, _read_forms, _read_text


def write_counterexample(path: str | Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """Write a VNN-COMP result file for a counterexample, atomically.

    Format (as the VNN-COMP scoring scripts read it): the verdict line `sat`, then one s-expression
    `((X_0 v)\\n (X_1 v)\\n ... (Y_0 v)\\n ... (Y_{m-1} v))`. x is flattened row-major (the order of
    the X_i), y likewise; values are written as the shortest text that reads back to the same float.
    """
    xs = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten().tolist()
    ys = torch.as_tensor(y).detach().to("cpu", torch.float64).flatten().tolist()
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError("a counterexample must be finite")
    entries = [f"(X_{i} {v!r})" for i, v in enumerate(xs)] + [f"(Y_{j} {v!r})" for j, v in enumerate(ys)]
    with atomic_path(path) as tmp:
        tmp.write_text("sat\n(" + "\n ".join(entries) + ")\n", encoding="utf-8")


def read_counterexample(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a counterexample written by `write_counterexample` (or by another VNN-COMP tool).

    Accepts the result file (leading `sat` line) or the bare `((X_0 v) ...)` s-expression; returns
    float64 tensors x (n_inputs,) and y (n_outputs,).
    """
    path = Path(path)
    forms = _read_forms(_read_text(path, "counterexample file"), path).args_all()
    if forms and forms[0][0] == "sat":
        forms = forms[1:]
    if len(forms) != 1 or not isinstance(forms[0][0], _List):
        line = forms[0][1] if forms else 1
        raise _fail(path, line, "expected one list ((X_0 v) ... (Y_0 v) ...)", "write 'sat' then the assignment")
    values: dict[str, list[float]] = {"X": [], "Y": []}
    for entry, line in forms[0][0].args_all():
        ok = isinstance(entry, _List) and len(entry.items) == 2 and all(isinstance(i, str) for i in entry.items)
        match = _VARIABLE.match(entry.items[0]) if ok else None
        if not ok or match is None or not _NUMBER.match(entry.items[1]):
            raise _fail(path, line, "expected (X_<i> <number>) or (Y_<j> <number>)", "fix this entry")
        kind, index = match.group(1), int(match.group(2))
        if index != len(values[kind]):
            raise _fail(path, line, f"{kind}_{index} out of order", f"expected {kind}_{len(values[kind])}")
        values[kind].append(float(entry.items[1]))
    return torch.tensor(values["X"], dtype=torch.float64), torch.tensor(values["Y"], dtype=torch.float64)
