"""Branch and bound (certify.bab) in the cascade: soundness against attacks and dense sampling,
what it reports when it stops, the nets it does not apply to, and its out-of-memory back-off."""

from __future__ import annotations

import torch
from torch import nn

from certify.attacks.gradient import search_box
from certify.bab.outcome import SAT, TIMEOUT, UNKNOWN, UNSAT, Limits, Query
from certify.bab.relu_search import bound_backing_off
from certify.bab.relu_step import ReluBounding
from certify.bab.search import NOT_APPLICABLE, search_all
from certify.bounds.bounder import METHODS, MarginBounder
# The cascade's "unknown" verdict is the same word as a search's: UNKNOWN serves both.
from certify.verdicts.cascade import (FALSIFIED, VERIFIED, CascadeOptions,
                                      certify_batch)

INPUTS = 16


def relu_net(seed: int, activation=nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(INPUTS, 24), activation(), nn.Linear(24, 24), activation(),
                         nn.Linear(24, 3)).eval()


def _confirm(net, lower, upper, c, d):
    def confirm(x):
        with torch.no_grad():
            y = net(x.unsqueeze(0))[0]
        return bool(((x >= lower[0]) & (x <= upper[0])).all()) and bool((c @ y - d <= 0).all())
    return confirm


def _lowest_sampled(net, lower, upper, c, d, samples: int = 4000) -> float:
    """The lowest max_r (c_r y - d_r) found by dense uniform sampling and a PGD search of the box."""
    points = lower + torch.rand(samples, INPUTS) * (upper - lower)
    with torch.no_grad():
        sampled = float((net(points) @ c.t() - d).amax(1).min())
    start = (lower + upper) / 2
    _, x = search_box(net, start, lower, upper, lambda y, rows: -(y @ c.t() - d).amax(1), steps=100, restarts=5,
                      seed=0, inclusive=True)
    with torch.no_grad():
        attacked = float((net(x) @ c.t() - d).amax(1).min())
    return min(sampled, attacked)


def test_unsat_survives_attack_and_sampling_and_sat_is_real():
    net = relu_net(0)
    bounder = MarginBounder(net, (INPUTS,))
    generator = torch.Generator().manual_seed(1)
    answers = {UNSAT: 0, SAT: 0, UNKNOWN: 0}
    for _ in range(6):
        centre = torch.rand(1, INPUTS, generator=generator)
        lower, upper = centre - 0.15, centre + 0.15
        with torch.no_grad():
            label = int(net(centre).argmax())
        for other in range(3):
            if other == label:
                continue
            c = torch.zeros(1, 3)
            c[0, label], c[0, other] = 1.0, -1.0
            d = torch.zeros(1)
            query = Query(lower, upper, c, d, _confirm(net, lower, upper, c, d))
            summary = search_all(bounder, net, [query], Limits(max_domains=3000, batch=32, iterations=5))
            answers[summary.result] += 1
            if summary.result == UNSAT:
                assert _lowest_sampled(net, lower, upper, c, d) > 0
                assert summary.lower_bound > 0
            elif summary.result == SAT:
                assert query.confirm(summary.x)
    # The boxes are sized so that both answers occur.
    assert answers[UNSAT] >= 2 and answers[SAT] >= 2, answers


def test_and_clause_rows_share_one_tree():
    """Rows of one AND clause: the region {y_1 >= y_0 and y_2 >= y_0} is empty when EITHER row is
    refuted; as separate trees neither might be, as one tree the search proves it."""
    net = relu_net(2)
    bounder = MarginBounder(net, (INPUTS,))
    centre = torch.full((1, INPUTS), 0.5)
    with torch.no_grad():
        label = int(net(centre).argmax())
    others = [j for j in range(3) if j != label]
    c = torch.zeros(2, 3)
    for row, j in enumerate(others):
        c[row, label], c[row, j] = 1.0, -1.0
    lower, upper = centre - 0.2, centre + 0.2
    query = Query(lower, upper, c, torch.zeros(2), _confirm(net, lower, upper, c, torch.zeros(2)))
    summary = search_all(bounder, net, [query], Limits(max_domains=3000, batch=32, iterations=5))
    if summary.result == UNSAT:
        assert _lowest_sampled(net, lower, upper, c, torch.zeros(2)) > 0
    elif summary.result == SAT:
        assert query.confirm(summary.x)
    assert summary.result != UNKNOWN


def test_tanh_nets_are_not_split():
    net = relu_net(0, nn.Tanh)
    bounder = MarginBounder(net, (INPUTS,))
    lower, upper = torch.zeros(1, INPUTS), torch.ones(1, INPUTS)
    c, d = torch.tensor([[1.0, -1.0, 0.0]]), torch.zeros(1)
    summary = search_all(bounder, net, [Query(lower, upper, c, d, _confirm(net, lower, upper, c, d))], Limits())
    assert summary.result == UNKNOWN and summary.reason == NOT_APPLICABLE and summary.method is None


def test_a_timeout_reports_why_with_the_bound_reached():
    net = relu_net(3)
    bounder = MarginBounder(net, (INPUTS,))
    lower, upper = torch.zeros(1, INPUTS), torch.ones(1, INPUTS)
    c, d = torch.tensor([[1.0, -1.0, 0.0]]), torch.zeros(1)
    query = Query(lower, upper, c, d, lambda x: False)  # no candidate counts: the search must run out of time
    summary = search_all(bounder, net, [query], Limits(deadline=0.0))
    assert summary.result == UNKNOWN and summary.reason == TIMEOUT
    assert summary.lower_bound is not None and summary.lower_bound <= 0 and summary.domains >= 1


class _SmallMemory(ReluBounding):
    """Fails like a device out of memory on batches above `most` domains."""

    most = 3

    def bound(self, lower, upper, c, domains, **options):
        if len(domains) > self.most:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().bound(lower, upper, c, domains, **options)


def test_the_batch_backs_off_on_out_of_memory():
    net = relu_net(4)
    bounding = _SmallMemory(net, (INPUTS,), device=torch.device("cpu"), iterations=2)
    lower, upper = torch.zeros(1, INPUTS), torch.ones(1, INPUTS)
    c = torch.tensor([[1.0, -1.0, 0.0]])
    _, root = bounding.root(lower, upper, c)
    domains = root.select(torch.zeros(10, dtype=torch.long))
    limits = Limits(batch=64)
    step = bound_backing_off(bounding, Query(lower, upper, c, torch.zeros(1), lambda x: False), domains, limits)
    whole = ReluBounding.bound(bounding, lower, upper, c, root)
    assert step.lower.shape == (10, 1) and limits.batch < 64
    assert torch.allclose(step.lower, whole.lower.expand(10, 1), atol=1e-5)


def _cascade(net, methods, **options):
    torch.manual_seed(5)
    x = torch.rand(10, INPUTS)
    with torch.no_grad():
        labels = net(x).argmax(1)
    box = ((x - 0.2).clamp(0, 1), (x + 0.2).clamp(0, 1))
    bounder = MarginBounder(net, (INPUTS,))
    return certify_batch(net, bounder, x, labels, box, list(range(10)),
                         CascadeOptions(methods=methods, attack_restarts=2, **options))


def test_the_cascade_ends_with_bab_only_when_asked():
    net = relu_net(6)
    plain = _cascade(net, METHODS)
    searched = _cascade(net, METHODS + ("bab",), timeout=5.0, max_domains=5000)
    assert all(v.bab is None for v in plain)
    for before, after in zip(plain, searched):
        # The search only decides what the bounds left open, and never contradicts them.
        if before.verdict != UNKNOWN:
            assert after.verdict == before.verdict
        if after.verdict == VERIFIED and before.verdict == UNKNOWN:
            assert after.method == "bab" and after.bab["result"] == "unsat"
        if after.verdict == UNKNOWN and after.bab is not None:
            assert after.bab["reason"] and after.bab["domains"] >= 0
    assert sum(v.verdict == UNKNOWN for v in searched) < sum(v.verdict == UNKNOWN for v in plain)
    assert all(v.verdict in (VERIFIED, FALSIFIED, UNKNOWN) for v in searched)


def test_beta_split_constraints_are_sound_and_never_loosen():
    """Split a few unstable first-layer ReLUs of the root: the domain's bound with beta must hold on
    every sampled point of the domain (the box points that satisfy the splits) and be at least
    the bound from the split intermediate bounds alone."""
    net = relu_net(7)
    bounding = ReluBounding(net, (INPUTS,), device=torch.device("cpu"), iterations=20)
    lower, upper = torch.full((1, INPUTS), 0.2), torch.full((1, INPUTS), 0.8)
    c = torch.tensor([[1.0, -1.0, 0.0]])
    _, root = bounding.root(lower, upper, c)
    unstable = torch.nonzero((root.lower[0][0] < 0) & (root.upper[0][0] > 0)).flatten()[:12]
    assert len(unstable) >= 2
    domain = root.select(torch.zeros(1, dtype=torch.long))
    with torch.no_grad():  # the signs at the box centre: a domain that sampling can reach
        signs = torch.where(net[0]((lower + upper) / 2)[0, unstable] >= 0, 1, -1).to(torch.int8)
    domain.splits[0][0, unstable] = signs
    domain.lower[0][0, unstable] = torch.where(signs > 0, 0.0, domain.lower[0][0, unstable])
    domain.upper[0][0, unstable] = torch.where(signs < 0, 0.0, domain.upper[0][0, unstable])
    with_beta = float(bounding.bound(lower, upper, c, domain).lower)
    only_bounds = domain.select(torch.zeros(1, dtype=torch.long))
    only_bounds.splits[0].zero_()
    without_beta = float(bounding.bound(lower, upper, c, only_bounds).lower)
    assert with_beta >= without_beta - 1e-5

    points = lower + torch.rand(200_000, INPUTS, generator=torch.Generator().manual_seed(0)) * (upper - lower)
    with torch.no_grad():
        z = net[0](points)[:, unstable]
        inside = ((z * signs.float()) >= 0).all(1)
        values = net(points[inside]) @ c[0]
    assert inside.sum() > 100
    assert float(values.min()) >= with_beta - 1e-5


def test_max_pool_nets_are_searched_and_every_proof_survives_attack_and_sampling():
    """Max pooling keeps CROWN's relaxation, the ReLUs are split: unsat must survive sampling and PGD."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 10), nn.ReLU(),
                        nn.Linear(10, 3)).eval()
    bounder = MarginBounder(net, (1, 8, 8))
    generator = torch.Generator().manual_seed(3)
    answers = {UNSAT: 0, SAT: 0, UNKNOWN: 0}
    for _ in range(6):
        centre = torch.rand(1, 1, 8, 8, generator=generator)
        lower, upper = (centre - 0.1).clamp(0, 1), (centre + 0.1).clamp(0, 1)
        with torch.no_grad():
            label = int(net(centre).argmax())
        for other in (j for j in range(3) if j != label):
            c = torch.zeros(1, 3)
            c[0, label], c[0, other] = 1.0, -1.0
            d = torch.zeros(1)

            def confirm(x, lower=lower, upper=upper, c=c):
                with torch.no_grad():
                    return bool(((x >= lower[0]) & (x <= upper[0])).all()) and float(net(x.unsqueeze(0))[0] @ c[0]) <= 0

            summary = search_all(bounder, net, [Query(lower, upper, c, d, confirm)],
                                 Limits(max_domains=2000, batch=32, iterations=5))
            answers[summary.result] += 1
            assert summary.method == "bab"  # searched, not "not applicable"
            if summary.result == UNSAT:
                points = lower + torch.rand(4000, 1, 8, 8, generator=generator) * (upper - lower)
                _, x = search_box(net, centre, lower, upper, lambda y, rows: -(y @ c.t()).amax(1), steps=100,
                                  restarts=5, seed=0, inclusive=True)
                with torch.no_grad():
                    assert float((net(torch.cat([points, x])) @ c[0]).min()) > 0
            elif summary.result == SAT:
                assert confirm(summary.x)
    assert answers[UNSAT] >= 2, answers
