"""The cascade's stages and its one runner, shared by the dataset cascade and the VNN-LIB checks.

A stage is a small object with a `name` (what a verdict records as its deciding method) and a
`run(problem, rows)` that may decide some of the open rows. A problem (one batch of samples or of
properties) says how to attack and how to bound its own rows; the stages only say what runs, in
which order. Bound methods are registered in BOUND_STAGES, cheapest first: a new bound method is
one small class added there.
"""

from __future__ import annotations

import time
from typing import ClassVar, Protocol

import torch


class Problem(Protocol):
    """What the runner needs from a batch: its open rows, a per-row cost, an attack and a bound."""

    cost: torch.Tensor

    def open_rows(self) -> torch.Tensor: ...

    def attack(self, rows: torch.Tensor, restarts: int, attempt: int) -> None: ...

    def bound(self, rows: torch.Tensor, method: str) -> None: ...


class Stage(Protocol):
    name: str

    def run(self, problem: Problem, rows: torch.Tensor) -> None: ...


class Attack:
    """PGD restarts on the open rows; `attempt` numbers the attack stages of one cascade, so each
    draws its random starts from its own seed stream."""

    name = "pgd"

    def __init__(self, restarts: int, attempt: int):
        self.restarts, self.attempt = restarts, attempt

    def run(self, problem: Problem, rows: torch.Tensor) -> None:
        problem.attack(rows, self.restarts, self.attempt)


class Bound:
    """A sound bound by certify.bounds.bounder under this stage's name."""

    name: ClassVar[str]

    def run(self, problem: Problem, rows: torch.Tensor) -> None:
        problem.bound(rows, self.name)


class IBP(Bound):
    name = "ibp"


class CROWN(Bound):
    name = "crown"


class AlphaCROWN(Bound):
    name = "alpha-crown"


# Cheapest first. Attack restarts beyond the first run after the last of the `CHEAP` bounds: on a
# robust sample every restart runs all its steps, several CROWN passes' worth, while alpha-CROWN
# is the most expensive by far.
BOUND_STAGES: dict[str, type[Bound]] = {stage.name: stage for stage in (IBP, CROWN, AlphaCROWN)}
CHEAP = ("ibp", "crown")


def cascade_stages(methods: tuple[str, ...], *, attack: bool, restarts: int) -> list[Stage]:
    """The stages in the order they run: one attack restart (it catches most falsifiable samples),
    the cheap bounds, the remaining attack restarts, then the expensive bounds."""
    chosen = [name for name in BOUND_STAGES if name in methods]
    stages: list[Stage] = [Attack(1, 0)] if attack else []
    stages += [BOUND_STAGES[name]() for name in chosen if name in CHEAP]
    if attack and restarts > 1:
        stages.append(Attack(restarts - 1, 1))
    stages += [BOUND_STAGES[name]() for name in chosen if name not in CHEAP]
    return stages


def run_stages(stages: list[Stage], problem: Problem) -> None:
    """Run each stage on the rows still open, until none is; each row is charged its share of the
    time of every stage it took part in."""
    for stage in stages:
        rows = problem.open_rows()
        if rows.numel() == 0:
            break
        started = time.perf_counter()
        stage.run(problem, rows)
        problem.cost[rows] += (time.perf_counter() - started) / len(rows)
