"""The parsed VNN-LIB property: one input box and a counterexample region C y <= d (float64)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch


class OutputConstraint(NamedTuple):
    """One conjunct of the counterexample region: every row of `C @ y <= d` holds.

    `C` is (rows, n_outputs) and `d` is (rows,), both float64. A NamedTuple so that
    `for C, d in prop.unsafe` works. Zero rows means "any output".
    """

    C: torch.Tensor
    d: torch.Tensor

    def holds(self, y: torch.Tensor) -> torch.Tensor:
        """For outputs `y` of shape (batch, n_outputs): a (batch,) bool tensor, row-wise AND."""
        return (y @ self.C.T <= self.d).all(dim=-1)


@dataclass
class VnnlibProperty:
    """A parsed VNN-LIB property.

    lower, upper: (n_inputs,) float64 input box, in the order X_0..X_{n-1} (row-major order of the
        ONNX input tensor). Values are kept as written in the file.
    n_outputs: number of declared outputs Y_0..Y_{m-1}.
    unsafe: the counterexample region is the OR over the items; an item (C, d) is the AND of its
        rows `C @ y <= d`. An empty list means the region is empty (trivially unsat).
    label: for robustness properties "Y_j >= Y_label for some j != label", over ALL other outputs,
        the label; else None. With a label, a counterexample is exactly "argmax is not uniquely
        the label", so margin-based certifiers and falsifiers may use it instead of `unsafe`.
    """

    path: Path
    lower: torch.Tensor
    upper: torch.Tensor
    n_outputs: int
    unsafe: list[OutputConstraint] = field(default_factory=list)
    label: int | None = None
    sha256: str | None = None  # of the file's bytes as parsed (parse_vnnlib)

    @property
    def n_inputs(self) -> int:
        return int(self.lower.numel())

    def counterexample_mask(self, ys: torch.Tensor) -> torch.Tensor:
        """For outputs of shape (batch, n_outputs): which rows lie in the counterexample region."""
        ys = torch.as_tensor(ys).detach().to("cpu", torch.float64)
        if ys.dim() != 2 or ys.shape[1] != self.n_outputs:
            raise ValueError(f"expected outputs of shape (batch, {self.n_outputs}), got {tuple(ys.shape)}")
        mask = torch.zeros(ys.shape[0], dtype=torch.bool)
        for item in self.unsafe:
            mask |= item.holds(ys)
        return mask

    def is_counterexample(self, y: torch.Tensor) -> bool:
        """Whether one output vector (any shape with n_outputs elements) meets the region."""
        y = torch.as_tensor(y).detach().reshape(1, -1)
        return bool(self.counterexample_mask(y)[0])


def _detect_label(unsafe: list[OutputConstraint], n_outputs: int) -> int | None:
    """The label L if the region is exactly OR over all j != L of (a * Y_L - a * Y_j <= 0), a > 0."""
    if n_outputs < 2 or len(unsafe) != n_outputs - 1:
        return None
    label: int | None = None
    others: set[int] = set()
    for C, d in unsafe:
        if C.shape[0] != 1 or d[0] != 0:
            return None
        row = C[0]
        nonzero = torch.nonzero(row).flatten().tolist()
        if len(nonzero) != 2:
            return None
        a, b = nonzero
        pos, neg = (a, b) if row[a] > 0 else (b, a)
        if not (row[pos] > 0 and row[neg] == -row[pos]):
            return None
        if label is None:
            label = pos
        elif pos != label:
            return None
        others.add(neg)
    if label is None or others != set(range(n_outputs)) - {label}:
        return None
    return label
