"""Branch and bound on l2 balls: every proof survives PGD-l2 and dense sampling of the ball, every
counterexample lies in the ball, and on a net small enough to solve exactly the search agrees with
the exact minimum over the disk.

Exact minimum over a disk: g(x) = c . f(x) for a one-hidden-layer ReLU net of 2 inputs is linear on
each cell of the arrangement of the hidden units' lines. On a cell meeting the disk, the minimum of
a linear function lies at a vertex of the cell inside the disk, where an edge line meets the circle,
or at centre - r * grad / ||grad|| (the circle's lowest point for that cell's gradient). Every one
of those points lies in the disk, so g at all of them, with the gradients of every activation
pattern, contains the exact minimum (and nothing below it).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from certify.attacks.gradient import find_adversarial
from certify.bab.outcome import SAT, UNKNOWN, UNSAT, Limits, Query
from certify.bab.relu_search import search_relu_splits
from certify.bab.relu_step import ReluBounding
from certify.bab.search import search_all
from certify.bounds.bounder import MarginBounder
from certify.verdicts.cascade import VERIFIED, CascadeOptions, certify_batch

INPUTS, HIDDEN = 16, 12


def relu_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(INPUTS, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)).eval()


def _ball_points(centre: torch.Tensor, radius: float, count: int, seed: int) -> torch.Tensor:
    """Points of the ball clipped to [0, 1] (clipping never leaves the ball): half on the sphere."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(count, centre.numel(), generator=generator)
    direction /= direction.norm(dim=1, keepdim=True)
    scale = torch.rand(count, 1, generator=generator)
    scale[: count // 2] = 1.0
    return (centre.reshape(1, -1) + radius * scale * direction).clamp(0, 1)


def test_the_cascade_searches_l2_balls_and_every_proof_survives_pgd_l2_and_sampling():
    net = relu_net(6)
    torch.manual_seed(5)
    x = torch.rand(10, INPUTS)
    with torch.no_grad():
        labels = net(x).argmax(1)
    radius = 1.0
    radii = torch.full((10,), radius, dtype=torch.float64)
    box = ((x - radius).clamp(0, 1), (x + radius).clamp(0, 1))
    bounder = MarginBounder(net, (INPUTS,))
    plain = certify_batch(net, bounder, x, labels, box, list(range(10)),
                          CascadeOptions(methods=("crown",), attack_restarts=2), l2_radii=radii)
    searched = certify_batch(net, bounder, x, labels, box, list(range(10)),
                             CascadeOptions(methods=("crown", "bab"), attack_restarts=2, timeout=5.0), l2_radii=radii)
    gained = [i for i, (a, b) in enumerate(zip(plain, searched)) if a.verdict == UNKNOWN and b.method == "bab"]
    assert gained, "radius 1 leaves samples that CROWN cannot verify but the search can"
    for before, after in zip(plain, searched):
        if before.verdict != UNKNOWN:
            assert after.verdict == before.verdict
    proved = [i for i, v in enumerate(searched) if v.verdict == VERIFIED and v.method == "bab"]
    assert proved
    for i in proved:
        assert searched[i].bab["result"] == "unsat" and searched[i].bab["lower_bound"] > 0
        rows = torch.tensor([i] * 4)
        found, _ = find_adversarial(net, x[rows], labels[rows], box[0][rows], box[1][rows], steps=100, restarts=5,
                                    seed=i, l2_ball=(x[rows], radii[rows]))
        assert not found.any()
        with torch.no_grad():
            predicted = net(_ball_points(x[i], radius, 20_000, seed=i)).argmax(1)
        assert bool((predicted == labels[i]).all())


def test_an_l2_counterexample_lies_in_the_ball_and_the_box():
    net = relu_net(1)
    centre = torch.full((1, INPUTS), 0.5)
    with torch.no_grad():
        label = int(net(centre).argmax())
    other = next(j for j in range(3) if j != label)
    c = torch.zeros(1, 3)
    c[0, label], c[0, other] = 1.0, -1.0
    seen = []

    def confirm(point):
        inside = float((point - centre[0]).norm()) <= radius and bool(((point >= 0) & (point <= 1)).all())
        with torch.no_grad():
            below = float(net(point.unsqueeze(0))[0] @ c[0]) <= 0
        seen.append(inside)
        return inside and below

    # A radius large enough that the far side of the ball holds counterexamples: PGD-l2 finds one.
    radius = 3.0
    found, _ = find_adversarial(net, centre, torch.tensor([label]), torch.zeros(1, INPUTS), torch.ones(1, INPUTS),
                                steps=100, restarts=5, seed=0, l2_ball=(centre, torch.tensor([radius])))
    assert found.all()
    query = Query(torch.zeros(1, INPUTS), torch.ones(1, INPUTS), c, torch.zeros(1), confirm, (centre, radius))
    summary = search_all(MarginBounder(net, (INPUTS,)), net, [query], Limits(max_domains=4000, batch=32, iterations=5))
    assert summary.result == SAT and confirm(summary.x)
    assert summary.method == "bab"  # 16 inputs, but a ball is never split on its input


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2)).eval()


def exact_disk_minimum(net: nn.Module, c: torch.Tensor, centre: torch.Tensor, radius: float) -> float:
    """min over the disk of c . net(x), from the candidate points of the module docstring."""
    w, b = net[0].weight.double(), net[0].bias.double()
    v = (net[2].weight.double().t() @ c.double())  # each hidden unit's weight in g
    centre = centre.double()
    points = []
    for i, j in itertools.combinations(range(HIDDEN), 2):  # vertices: two lines crossing in the disk
        matrix = torch.stack([w[i], w[j]])
        if abs(torch.linalg.det(matrix)) > 1e-12:
            point = torch.linalg.solve(matrix, -torch.stack([b[i], b[j]]))
            if float((point - centre).norm()) <= radius:
                points.append(point)
    for i in range(HIDDEN):  # a line meets the circle: foot of the perpendicular +- half chord
        normal = w[i] / w[i].norm()
        distance = float(w[i] @ centre + b[i]) / float(w[i].norm())
        if abs(distance) <= radius:
            foot = centre - distance * normal
            half = (radius ** 2 - distance ** 2) ** 0.5
            along = torch.stack([-normal[1], normal[0]])
            points += [foot + half * along, foot - half * along]
    for pattern in itertools.product((0.0, 1.0), repeat=HIDDEN):  # every cell's lowest circle point
        gradient = w.t() @ (torch.tensor(pattern, dtype=torch.float64) * v)
        if float(gradient.norm()) > 1e-12:
            points.append(centre - radius * gradient / gradient.norm())
    xs = torch.stack(points)
    # Rounding may put a point a hair outside the disk; pull it back in.
    offsets = xs - centre
    xs = centre + offsets * torch.clamp(radius / offsets.norm(dim=1, keepdim=True).clamp(min=1e-300), max=1.0)
    with torch.no_grad():
        y = copy.deepcopy(net).double()(xs)
    return float((y @ c.double()).min())


def test_relu_split_on_disks_agrees_with_the_exact_answer():
    c = torch.tensor([1.0, -1.0])
    for seed in (0, 1):
        net = tiny_net(seed)
        bounding = ReluBounding(net, (2,), device=torch.device("cpu"), iterations=5)
        generator = torch.Generator().manual_seed(seed)
        decided = wrong = 0
        for _ in range(75):
            centre = torch.rand(2, generator=generator) * 2 - 1
            radius = 0.05 + 0.45 * float(torch.rand(1, generator=generator))
            magnitude = 0.02 + 0.3 * float(torch.rand(1, generator=generator))
            offset = magnitude if float(torch.rand(1, generator=generator)) < 0.5 else -magnitude
            d = exact_disk_minimum(net, c, centre, radius) - offset

            def confirm(x, centre=centre, radius=radius, d=d):
                with torch.no_grad():
                    value = float(net(x.unsqueeze(0))[0] @ c) - d
                return float((x.double() - centre.double()).norm()) <= radius and value <= 0

            # The box holds the whole disk: the region searched is exactly the disk.
            query = Query((centre - radius - 1).view(1, 2), (centre + radius + 1).view(1, 2), c.view(1, 2),
                          torch.tensor([d]), confirm, (centre.view(1, 2), radius))
            outcome = search_relu_splits(bounding, net, query, Limits(max_domains=4000, batch=32, iterations=5))
            if outcome.result != UNKNOWN:
                decided += 1
                wrong += (outcome.result == UNSAT) != (offset > 0)
            if outcome.result == SAT:
                assert confirm(outcome.x)
        assert wrong == 0
        assert decided >= 70, decided
