"""ReLU-split branch and bound of one query (one tree), best first.

Open domains live on the CPU with their value (the sound lower bound of max_r g_r on the domain)
and the neuron chosen to split them. Each step takes the `batch` open domains of lowest value,
bounds both children of all of them in one batched alpha-beta-CROWN call, drops the children whose
value is > 0 (proved), and tries each remaining child's candidate counterexample: the point of the
region (box corner, or l2 ball point) that each row's linear bound points to, checked by a forward
pass and, before it counts, by the query's `confirm` (onnxruntime on the ONNX file). The tree is unsat when no domain stays open.
"""

from __future__ import annotations

import torch

from certify.bab.branching import children, choose, locate
from certify.bab.outcome import (ALL_SPLIT, NO_SPLIT, SAT, UNKNOWN, UNSAT,
                                 Limits, Outcome, Query)
from certify.bab.relu_step import DomainBatch, ReluBounding, StepResult


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def bound_backing_off(bounding: ReluBounding, query: Query, domains: DomainBatch, limits: Limits) -> StepResult:
    """One step over `domains`; on out-of-memory the batch is halved (for the rest of the search too)."""
    try:
        return bounding.bound(query.lower, query.upper, query.c, domains, ball=query.ball)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not is_out_of_memory(error) or len(domains) == 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    limits.batch = max(1, limits.batch // 2)
    half = len(domains) // 2
    parts = [bound_backing_off(bounding, query, domains.select(torch.arange(a, b)), limits)
             for a, b in ((0, half), (half, len(domains)))]
    alpha = None if any(p.alpha is None for p in parts) else [torch.cat(layer) for layer in zip(*[p.alpha for p in parts])]
    return StepResult(torch.cat([p.lower for p in parts]),
                      [torch.cat(layer) for layer in zip(*[p.relu_coefficients for p in parts])],
                      torch.cat([p.corners for p in parts]), alpha)


def find_counterexample(module: torch.nn.Module, query: Query, corners: torch.Tensor) -> torch.Tensor | None:
    """The first candidate among `corners` (n, rows, *input) that is a confirmed counterexample."""
    points = corners.reshape(-1, *corners.shape[2:])
    device = next(module.parameters()).device
    with torch.no_grad():
        y = module(points.to(device)).cpu()
    values = (y @ query.c.t() - query.d).amax(1)
    for k in torch.nonzero(values <= 0).flatten().tolist():
        if query.confirm(points[k]):
            return points[k]
    return None


class _OpenDomains:
    """The open domains of one tree, their values and chosen splits."""

    def __init__(self, domains: DomainBatch, values: torch.Tensor, decisions: torch.Tensor,
                 closed: float = float("inf")):
        self.domains, self.values, self.decisions = domains, values, decisions
        self.closed = closed  # the lowest value of the domains proved so far: the tree's bound once unsat

    def __len__(self) -> int:
        return len(self.values)

    def pop_lowest(self, count: int) -> tuple[DomainBatch, torch.Tensor]:
        order = torch.argsort(self.values)
        taken, kept = order[:count], order[count:]
        out = (self.domains.select(taken), self.decisions[taken])
        self.domains, self.values, self.decisions = self.domains.select(kept), self.values[kept], self.decisions[kept]
        return out

    def add(self, other: "_OpenDomains") -> None:
        if len(other):
            self.domains = DomainBatch.cat([self.domains, other.domains])
            self.values = torch.cat([self.values, other.values])
            self.decisions = torch.cat([self.decisions, other.decisions])
        self.closed = min(self.closed, other.closed)


def search_relu_splits(bounding: ReluBounding, module: torch.nn.Module, query: Query, limits: Limits) -> Outcome:
    """Branch and bound on the ReLUs of `bounding`'s model for one query (see the module docstring)."""
    start = limits.visited[0]
    root_bound, root = bounding.root(query.lower, query.upper, query.c, ball=query.ball)
    value = float((root_bound - query.d).max())
    if value > 0:
        return Outcome(UNSAT, "bab", value, 0)
    opened = _settle(bounding, module, query, root, limits)
    if isinstance(opened, Outcome):
        opened.domains = limits.visited[0] - start
        return opened
    if len(opened) and int(opened.decisions.min()) < 0:
        return Outcome(UNKNOWN, "bab", float(opened.values.min()), limits.visited[0] - start, NO_SPLIT)
    while len(opened):
        reason = limits.stop_reason()
        if reason is not None:
            return Outcome(UNKNOWN, "bab", float(opened.values.min()), limits.visited[0] - start, reason)
        lowest = float(opened.values.min())
        domains, decisions = opened.pop_lowest(limits.batch)
        if int(decisions.min()) < 0:
            return Outcome(UNKNOWN, "bab", lowest, limits.visited[0] - start, ALL_SPLIT)
        layer, neuron = locate(domains, decisions)
        found = _settle(bounding, module, query, children(domains, layer, neuron), limits)
        if isinstance(found, Outcome):
            found.domains = limits.visited[0] - start
            return found
        opened.add(found)
    return Outcome(UNSAT, "bab", opened.closed, limits.visited[0] - start)


def _settle(bounding: ReluBounding, module, query: Query, domains: DomainBatch, limits: Limits) -> "_OpenDomains | Outcome":
    """Bound `domains`; the ones still open with their split decisions, or a sat Outcome."""
    step = bound_backing_off(bounding, query, domains, limits)
    limits.visited[0] += len(domains)
    per_row = step.lower - query.d
    values = per_row.amax(1)
    open_ = torch.nonzero(values <= 0).flatten()
    closed = float(values[values > 0].min()) if bool((values > 0).any()) else float("inf")
    if len(open_) == 0:
        return _OpenDomains(domains.select(open_), values[open_], torch.zeros(0, dtype=torch.long), closed)
    x = find_counterexample(module, query, step.corners[open_])
    if x is not None:
        return Outcome(SAT, "bab", float(values[open_].min()), 0, x=x)
    kept = domains.select(open_)
    # The children start their optimisation from this step's alpha.
    kept.alpha = None if step.alpha is None else [layer[open_] for layer in step.alpha]
    # Each domain works on the row closest to proving it: one row > 0 closes the domain.
    rows = per_row[open_].argmax(1)
    coefficients = [layer[open_] for layer in step.relu_coefficients]
    decisions = choose(bounding, query, kept, coefficients, rows, method=limits.branching,
                       candidates=limits.fsb_candidates)
    return _OpenDomains(kept, values[open_], decisions, closed)
