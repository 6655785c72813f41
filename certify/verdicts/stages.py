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

from certify.common.errors import UserError
from certify.common.progress import say

# alpha-CROWN tightens CROWN's relaxation, but its bound never exceeds the true minimum margin over
# the box, which is at most the margin at the sample itself. A sample whose CROWN bound is so far
# below zero that alpha-CROWN would have to close more than this fraction of the gap between that
# bound and the sample's own margin is left unknown without trying. A heuristic that only decides
# what to try, never a verdict; benchmarks/alpha_skip.py measures what it costs and saves.
HOPELESS_GAP_FRACTION = 0.4


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


class Lipschitz(Bound):
    """Margins at the centre minus Lipschitz constant x radius: one forward pass, cheaper than IBP."""

    name = "lipschitz"


class IBP(Bound):
    name = "ibp"


class CROWN(Bound):
    name = "crown"


class AlphaCROWN(Bound):
    name = "alpha-crown"
    # The hopeless test judges CROWN's bound: with IBP's alone it would skip samples CROWN can verify.
    after_crown = False

    def run(self, problem: Problem, rows: torch.Tensor) -> None:
        if self.after_crown:
            rows = rows[~hopeless(problem, rows)]
        if rows.numel():
            problem.bound(rows, self.name)


class BranchAndBound(Bound):
    """Complete verification (certify.bab) of what every bound left open, under the problem's own
    limits (--timeout, --max-domains): the problem's `branch_and_bound(rows)`."""

    name = "bab"

    def run(self, problem: Problem, rows: torch.Tensor) -> None:
        problem.branch_and_bound(rows)


def hopeless(problem: Problem, rows: torch.Tensor, fraction: float | None = None) -> torch.Tensor:
    """Per row: True where the best bound so far is too far below zero for a tighter relaxation of
    the same network (see HOPELESS_GAP_FRACTION). Only a batch of samples with their clean inputs
    can say; for any other problem no row is hopeless."""
    best, clean_margins = getattr(problem, "best", None), getattr(problem, "clean_margins", None)
    if best is None or best.dim() != 2 or clean_margins is None:
        return torch.zeros(len(rows), dtype=torch.bool)
    margins = clean_margins(rows).to(best.dtype)
    lower, fraction = best[rows], HOPELESS_GAP_FRACTION if fraction is None else fraction
    needed = torch.where(torch.isfinite(lower) & (lower < 0), -lower / (margins - lower), torch.zeros_like(lower))
    return (needed > fraction).any(1)


# Cheapest first. Attack restarts beyond the first run after the last of the `CHEAP` bounds: on a
# robust sample every restart runs all its steps, several CROWN passes' worth, while alpha-CROWN
# is the most expensive by far.
#
# What the bounds leave open for branch and bound first gets this many more attack restarts: the
# search runs only with a time budget, and a counterexample that an attack finds in a second saves
# the whole budget. On VNN-COMP's flat mnist-net_256x4 rows about 1 diversified restart in 5 finds
# one, so the cascade's 2-4 random restarts miss it about half the time.
SEARCH_ATTACK_RESTARTS = 20
BOUND_STAGES: dict[str, type[Bound]] = {stage.name: stage for stage in (Lipschitz, IBP, CROWN, AlphaCROWN, BranchAndBound)}
CHEAP = ("lipschitz", "ibp", "crown")


def cascade_stages(methods: tuple[str, ...], *, attack: bool, restarts: int) -> list[Stage]:
    """The stages in the order they run: one attack restart (it catches most falsifiable samples),
    the cheap bounds, the remaining attack restarts, the expensive bounds, and before branch and
    bound a longer attack (SEARCH_ATTACK_RESTARTS)."""
    chosen = [name for name in BOUND_STAGES if name in methods]
    stages: list[Stage] = [Attack(1, 0)] if attack else []
    stages += [BOUND_STAGES[name]() for name in chosen if name in CHEAP]
    if attack and restarts > 1:
        stages.append(Attack(restarts - 1, 1))
    for name in chosen:
        if name in CHEAP:
            continue
        if name == BranchAndBound.name and attack:
            stages.append(Attack(SEARCH_ATTACK_RESTARTS, 2))
        stages.append(BOUND_STAGES[name]())
    for stage in stages:
        if isinstance(stage, AlphaCROWN):
            stage.after_crown = "crown" in chosen
    return stages


def run_stages(stages: list[Stage], problem: Problem) -> None:
    """Run each stage on the rows still open, until none is; each row is charged its share of the
    time of every stage it took part in."""
    for stage in stages:
        rows = problem.open_rows()
        if rows.numel() == 0:
            break
        started = time.perf_counter()
        try:
            stage.run(problem, rows)
        except UserError:
            raise
        except Exception as error:  # a bound method's own failure ends that method, not the run
            if not isinstance(stage, Bound):
                raise
            say(f"warning: {stage.name} failed on a batch of {len(rows)} ({describe(error)}); "
                "those samples keep the best verdict found before it")
        problem.cost[rows] += (time.perf_counter() - started) / len(rows)


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__
