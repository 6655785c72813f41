"""The counterexample region of a batch of VNN-LIB properties, and the PGD that searches a box for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from certify.attacks.gradient import search_box
from certify.common.seeds import generator, stream_seed
from certify.specs.vnnlib import VnnlibProperty

# Stands for +-infinity inside the attack objective (a true inf would give NaN gradients).
_BIG = 1e30


@dataclass
class Region:
    """The counterexample regions of a batch of properties, padded to common sizes:
    c (n, K, R, m), d (n, K, R); padded rows are all-zero and invalid, padded disjuncts invalid."""

    c: torch.Tensor
    d: torch.Tensor
    row_valid: torch.Tensor
    disjunct_valid: torch.Tensor

    @property
    def disjuncts(self) -> int:
        return self.c.shape[1]

    @property
    def rows(self) -> int:
        return self.c.shape[2]

    @staticmethod
    def stack(props: list[VnnlibProperty], outputs: int) -> "Region":
        k = max(max(len(p.unsafe) for p in props), 1)
        r = max(max((item.C.shape[0] for p in props for item in p.unsafe), default=1), 1)
        n = len(props)
        c = torch.zeros(n, k, r, outputs, dtype=torch.float64)
        d = torch.zeros(n, k, r, dtype=torch.float64)
        row_valid = torch.zeros(n, k, r, dtype=torch.bool)
        disjunct_valid = torch.zeros(n, k, dtype=torch.bool)
        for i, prop in enumerate(props):
            for j, (C, dd) in enumerate(prop.unsafe):
                rows = C.shape[0]
                c[i, j, :rows], d[i, j, :rows] = C, dd
                row_valid[i, j, :rows] = True
                disjunct_valid[i, j] = True
        return Region(c, d, row_valid, disjunct_valid)

    def subset(self, rows: torch.Tensor) -> "Region":
        return Region(self.c[rows], self.d[rows], self.row_valid[rows], self.disjunct_valid[rows])

    def to(self, device) -> "Region":
        return Region(self.c.to(device, torch.float32), self.d.to(device, torch.float32),
                       self.row_valid.to(device), self.disjunct_valid.to(device))

    def objective(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) = min_k max_r (C_kr y - d_kr) per sample: <= 0 exactly in the counterexample region.
        A disjunct without rows holds for any output (-BIG); a padded one never (+BIG)."""
        value = torch.einsum("nkrm,nm->nkr", self.c, y) - self.d
        value = torch.where(self.row_valid, value, torch.full_like(value, -_BIG))
        per_disjunct = value.amax(dim=2)
        per_disjunct = torch.where(self.disjunct_valid, per_disjunct, torch.full_like(per_disjunct, _BIG))
        return per_disjunct.amin(dim=1)

    def certificate(self, lower: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """min_k max_r (lower_kr - d_kr) for the given properties; > 0 proves the region empty.
        An empty region (no disjunct) is +inf: nothing to refute."""
        value = lower - self.d[rows]
        value = torch.where(self.row_valid[rows], value, torch.full_like(value, -float("inf")))
        per_disjunct = value.amax(dim=2)
        per_disjunct = torch.where(self.disjunct_valid[rows], per_disjunct,
                                   torch.full_like(per_disjunct, float("inf")))
        return per_disjunct.amin(dim=1)


def find_in_region(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor, region: Region, *,
                   steps: int = 50, restarts: int = 5, seed: int = 0,
                   from_centre: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD inside per-sample boxes toward the counterexample region (certify.attacks.gradient.
    search_box, minimizing region.objective).

    Returns (found, x): found[i] when the module's output at x[i] lies in the region (confirm it
    elsewhere before trusting it). The first restart starts at the box centre (unless not
    `from_centre`: then at a random point of its own seed stream), the others at uniform random
    points (seeded).
    """
    if from_centre:
        start = (lower + upper) / 2
    else:
        noise = torch.rand(lower.shape, generator=generator(seed, 0), dtype=lower.dtype).to(lower.device)
        start = lower + noise * (upper - lower)
    return search_box(module, start, lower, upper, lambda y, rows: -region.subset(rows).objective(y),
                      steps=steps, restarts=restarts, seed=stream_seed(seed, 1), inclusive=True,
                      random_start=not from_centre)
