"""What one branch-and-bound search is asked (a Query), under which limits, and what it answers.

A query is one search tree: an input region (a box, or an l2 ball) and the rows
g_r(x) = c_r . y(x) - d_r of ONE AND clause of the counterexample region (a robustness query
against one competing class has one row, the margin). The region is empty over the input region
exactly when max_r g_r(x) > 0 for every x in it: that is what the search proves (unsat), or it
finds an x with every g_r(x) <= 0 (sat).

An l2 query (`ball` set) asks about the ball intersected with the box: the bounds hold on the
whole ball (which contains the intersection, so an unsat answer is sound), and a counterexample
must lie in both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

UNSAT, SAT, UNKNOWN = "unsat", "sat", "unknown"
# Why a search stopped without an answer.
TIMEOUT, DOMAIN_LIMIT, ALL_SPLIT, NO_SPLIT = "timeout", "domain limit", "all neurons split", "no split possible"


@dataclass
class Query:
    lower: torch.Tensor          # (1, *input_shape) float32, covering the whole box
    upper: torch.Tensor
    c: torch.Tensor              # (rows, outputs) float32
    d: torch.Tensor              # (rows,) float32
    # Whether a candidate input (*input_shape) is a real counterexample: in the box, and the ONNX
    # file's own output in the region. Only confirmed candidates are reported.
    confirm: Callable[[torch.Tensor], bool]
    # (centre (1, *input_shape), radius): the region is this l2 ball within the box, and the box is
    # then the ball's bounding box clipped to the input range. None: the region is the box.
    ball: tuple[torch.Tensor, float] | None = None


@dataclass
class Limits:
    deadline: float = float("inf")   # time.perf_counter() value at which the search stops
    max_domains: int = 200_000       # domains bounded, all trees of one sample/property together
    batch: int = 64                  # domains split per step (each gives two children)
    iterations: int = 10             # alpha/beta optimisation steps per batch
    branching: str = "babsr"         # or "fsb": filtered smart branching
    fsb_candidates: int = 3
    visited: list[int] = field(default_factory=lambda: [0])  # shared count of domains bounded

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    def stop_reason(self) -> str | None:
        if self.expired():
            return TIMEOUT
        if self.visited[0] >= self.max_domains:
            return DOMAIN_LIMIT
        return None


@dataclass
class Outcome:
    result: str                      # unsat / sat / unknown
    method: str                      # bab or bab-input
    lower_bound: float               # best sound lower bound of max_r g_r over the box reached
    domains: int                     # domains bounded by this search
    reason: str | None = None        # why unknown
    x: torch.Tensor | None = None    # the confirmed counterexample (sat)
