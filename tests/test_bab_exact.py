"""Branch and bound against an exact answer, on a net small enough to solve exactly.

The net has 2 inputs and one hidden layer of 12 ReLUs, so g(x) = c . f(x) is piecewise linear on
the cells that the 12 lines w_i . x + b_i = 0 cut out of the box: its minimum over the box lies at
a vertex of some cell, and every such vertex is a box corner, a line crossing a box edge, or two
lines crossing inside the box. Evaluating g (in float64) at all of them gives the exact minimum.
Each box's threshold d is the exact minimum minus a random offset, so the property
"g(x) - d > 0 on the box" is true (unsat) exactly when the offset is positive; offsets stay away
from 0 by more than float32 rounding. Both searches (ReLU split and input split) must never
contradict the exact answer, and must decide nearly every box.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from certify.bab.input_search import search_input_splits
from certify.bab.outcome import SAT, UNKNOWN, UNSAT, Limits, Query
from certify.bab.relu_search import search_relu_splits
from certify.bab.relu_step import ReluBounding
from certify.bounds.bounder import MarginBounder

HIDDEN = 12


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2)).eval()


def exact_minimum(net: nn.Module, c: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> float:
    """min over the box [lower, upper] (2,) of c . net(x), by the vertex enumeration above."""
    w, b = net[0].weight.double(), net[0].bias.double()
    lo, hi = lower.double(), upper.double()
    points = [torch.tensor([x0, x1]) for x0 in (lo[0], hi[0]) for x1 in (lo[1], hi[1])]
    for i in range(HIDDEN):
        for axis in (0, 1):
            other = 1 - axis
            if abs(w[i, other]) < 1e-12:
                continue
            for fixed in (lo[axis], hi[axis]):
                point = torch.zeros(2, dtype=torch.float64)
                point[axis] = fixed
                point[other] = -(b[i] + w[i, axis] * fixed) / w[i, other]
                points.append(point)
    for i, j in itertools.combinations(range(HIDDEN), 2):
        matrix = torch.stack([w[i], w[j]])
        if abs(torch.linalg.det(matrix)) > 1e-12:
            points.append(torch.linalg.solve(matrix, -torch.stack([b[i], b[j]])))
    inside = [p for p in points if bool(((p >= lo - 1e-12) & (p <= hi + 1e-12)).all())]
    xs = torch.stack(inside).clamp(lo, hi)
    with torch.no_grad():
        y = copy.deepcopy(net).double()(xs)
    return float((y @ c.double()).min())


def _queries(net: nn.Module, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    c = torch.tensor([1.0, -1.0])
    for _ in range(count):
        centre = torch.rand(2, generator=generator) * 2 - 1
        half = 0.05 + 0.45 * torch.rand(2, generator=generator)
        lower, upper = centre - half, centre + half
        magnitude = 0.02 + 0.3 * float(torch.rand(1, generator=generator))
        offset = magnitude if float(torch.rand(1, generator=generator)) < 0.5 else -magnitude
        d = exact_minimum(net, c, lower, upper) - offset

        def confirm(x, lower=lower, upper=upper, d=d):
            inside = bool(((x >= lower) & (x <= upper)).all())
            with torch.no_grad():
                return inside and float(net(x.unsqueeze(0))[0] @ c) - d <= 0

        yield offset > 0, Query(lower.view(1, 2), upper.view(1, 2), c.view(1, 2), torch.tensor([d]), confirm)


def _agreement(search, boxes: int, seed: int) -> tuple[int, int]:
    """(boxes decided, boxes answered wrongly)."""
    net = tiny_net(seed)
    decided = wrong = 0
    for truth_unsat, query in _queries(net, boxes, seed):
        outcome = search(net, query, Limits(max_domains=4000, batch=32, iterations=5))
        if outcome.result != UNKNOWN:
            decided += 1
            wrong += (outcome.result == UNSAT) != truth_unsat
        if outcome.result == SAT:
            assert query.confirm(outcome.x)
    return decided, wrong


def test_relu_split_agrees_with_the_exact_answer():
    boundings = {}

    def search(net, query, limits):
        # Keyed by the net itself (held alive): an id() of a freed net can name the next one.
        if net not in boundings:
            boundings[net] = ReluBounding(net, (2,), device=torch.device("cpu"), iterations=5)
        return search_relu_splits(boundings[net], net, query, limits)

    for seed in (0, 1):
        decided, wrong = _agreement(search, 150, seed)
        assert wrong == 0
        assert decided >= 140


def test_input_split_agrees_with_the_exact_answer():
    bounders = {}

    def search(net, query, limits):
        if net not in bounders:
            bounders[net] = MarginBounder(net, (2,))
        return search_input_splits(bounders[net], net, query, limits)

    for seed in (2, 3):
        decided, wrong = _agreement(search, 100, seed)
        assert wrong == 0
        assert decided >= 95
