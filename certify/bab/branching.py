"""Which ReLU to split in each domain.

BaBSR-style score: in the linear lower bound of g, an unstable neuron (l < 0 < u) whose output has
a negative coefficient lambda is bounded by its upper relaxation line, whose intercept
-u l / (u - l) costs the bound lambda * (-u l / (u - l)). Splitting the neuron removes that term,
so the score is that cost; neurons with lambda >= 0 keep a small score proportional to |lambda|
times the same intercept so that ties still prefer influential neurons. Only unstable neurons that
are not split yet are candidates.

Filtered smart branching (`fsb`) takes the top-k candidates by that score, bounds both children of
each with one cheap CROWN pass (fixed intermediate bounds, no optimisation), and splits the
candidate whose worse child is best.
"""

from __future__ import annotations

import torch

from certify.bab.relu_step import DomainBatch, ReluBounding

# Weight of the tie-breaking part of the score (neurons whose relaxation intercept does not enter
# the bound): small enough never to outrank a neuron whose intercept does.
_TIE_WEIGHT = 1e-3


def split_scores(domains: DomainBatch, coefficients: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """(n, all neurons) scores over the layers concatenated; -inf where a neuron cannot be split.
    `coefficients[layer]` is (n, rows, neurons); `rows` (n,) picks the row each domain works on."""
    scores = []
    for low, high, signs, coefficient in zip(domains.lower, domains.upper, domains.splits, coefficients):
        lam = coefficient[torch.arange(len(rows)), rows]
        unstable = (low < 0) & (high > 0) & (signs == 0)
        intercept = torch.where(unstable, -high * low / (high - low).clamp(min=1e-12), torch.zeros_like(low))
        score = (-lam).clamp(min=0) * intercept + _TIE_WEIGHT * lam.abs() * intercept
        # A candidate always outranks a non-candidate, even at score 0.
        scores.append(torch.where(unstable, score, torch.full_like(score, -float("inf"))))
    return torch.cat(scores, dim=1)


def locate(domains: DomainBatch, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer, neuron within the layer) of indices into the concatenated layers."""
    sizes = torch.tensor([t.shape[1] for t in domains.lower])
    ends = torch.cumsum(sizes, 0)
    layer = torch.searchsorted(ends, flat, right=True)
    return layer, flat - (ends - sizes)[layer]


def children(domains: DomainBatch, layer: torch.Tensor, neuron: torch.Tensor) -> DomainBatch:
    """Both children of each domain: first all active ones (z >= 0), then all inactive ones (z <= 0)."""
    active, inactive = domains.select(torch.arange(len(domains))), domains.select(torch.arange(len(domains)))
    for k in range(len(domains.lower)):
        rows = torch.nonzero(layer == k).flatten()
        index = neuron[rows]
        active.lower[k][rows, index] = 0.0
        active.splits[k][rows, index] = 1
        inactive.upper[k][rows, index] = 0.0
        inactive.splits[k][rows, index] = -1
    return DomainBatch.cat([active, inactive])


def choose(bounding: ReluBounding, query, domains: DomainBatch, coefficients: list[torch.Tensor],
           rows: torch.Tensor, *, method: str = "babsr", candidates: int = 3) -> torch.Tensor:
    """The flat neuron index to split in each domain, or -1 where no neuron can be split."""
    scores = split_scores(domains, coefficients, rows)
    best = scores.argmax(1)
    splittable = torch.isfinite(scores.max(1).values)
    if method == "fsb" and splittable.any():
        best = _smart(bounding, query, domains, scores, best, candidates)
    return torch.where(splittable, best, torch.full_like(best, -1))


def _smart(bounding: ReluBounding, query, domains: DomainBatch, scores: torch.Tensor, best: torch.Tensor,
           candidates: int) -> torch.Tensor:
    k = min(candidates, scores.shape[1])
    top_scores, top = scores.topk(k, dim=1)
    n = len(domains)
    # Domain i's candidate j is row j * n + i of the repeated batch.
    repeated = domains.select(torch.arange(n).repeat(k))
    flat = top.t().reshape(-1)
    layer, neuron = locate(domains, flat)
    step = bounding.bound(query.lower, query.upper, query.c, children(repeated, layer, neuron), optimise=False,
                          ball=query.ball)
    value = (step.lower - query.d).amax(1)
    worse_child = torch.minimum(value[: n * k], value[n * k:]).view(k, n).t()
    worse_child = torch.where(torch.isfinite(top_scores), worse_child, torch.full_like(worse_child, -float("inf")))
    return top[torch.arange(n), worse_child.argmax(1)]
