"""One entry point for the cascade: which branch and bound a model gets, and the searches of one
sample or property (its trees, under one shared set of limits).

Inputs of at most `MAX_INPUT_DIMS` dimensions are split on the input; other nets with ReLUs are
split on their ReLUs; anything else (Sigmoid, Tanh, no ReLU) is not searched: its answer stays
the bounds' one, and the verdict says that branch and bound did not apply.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from certify.bab.input_search import input_split_applies, search_input_splits
from certify.bab.outcome import SAT, UNKNOWN, UNSAT, Limits, Outcome, Query
from certify.bab.relu_search import search_relu_splits
from certify.bab.relu_step import ReluBounding
from certify.bounds.bounder import MarginBounder

NOT_APPLICABLE = "not applicable"

# One ReluBounding per certified module: building its BoundedModule traces the model.
_relu_boundings: "weakref.WeakKeyDictionary[nn.Module, ReluBounding]" = weakref.WeakKeyDictionary()


def relu_bounding(bounder: MarginBounder) -> ReluBounding:
    if bounder.module not in _relu_boundings:
        _relu_boundings[bounder.module] = ReluBounding(bounder.module, bounder.input_shape, device=bounder.device)
    return _relu_boundings[bounder.module]


@dataclass
class SearchSummary:
    """What the trees of one sample or property answered together."""

    result: str                  # unsat (every tree), sat (some tree), unknown
    method: str | None           # bab / bab-input; None when branch and bound did not apply
    lower_bound: float | None    # min over the trees of each tree's best bound
    domains: int
    reason: str | None = None    # why unknown (the first tree that stayed open), or NOT_APPLICABLE
    x: torch.Tensor | None = None
    tree_bounds: list[float] = field(default_factory=list)  # per tree searched, in the queries' order

    def to_json(self) -> dict:
        return {"result": self.result, "method": self.method, "lower_bound": self.lower_bound,
                "domains": self.domains, "reason": self.reason}


def search_one(bounder: MarginBounder, module: nn.Module, query: Query, limits: Limits) -> Outcome | None:
    """The search of one tree, or None when no branch and bound applies to this model."""
    if input_split_applies(query):
        return search_input_splits(bounder, module, query, limits)
    bounding = relu_bounding(bounder)
    if not bounding.applicable:
        return None
    bounding.set_iterations(limits.iterations)
    return search_relu_splits(bounding, module, query, limits)


def search_all(bounder: MarginBounder, module: nn.Module, queries: list[Query], limits: Limits) -> SearchSummary:
    """Every tree of one sample or property (queries in the order to try: likeliest sat first).
    Sat as soon as one tree is; unknown as soon as one stays open (the rest could not change that)."""
    bounds, domains = [], 0
    for query in queries:
        outcome = search_one(bounder, module, query, limits)
        if outcome is None:
            return SearchSummary(UNKNOWN, None, None, 0, NOT_APPLICABLE)
        domains += outcome.domains
        bounds.append(outcome.lower_bound)
        if outcome.result == SAT:
            return SearchSummary(SAT, outcome.method, None, domains, x=outcome.x)
        if outcome.result == UNKNOWN:
            return SearchSummary(UNKNOWN, outcome.method, min(bounds), domains, outcome.reason, tree_bounds=bounds)
    method = "bab-input" if queries and input_split_applies(queries[0]) else "bab"
    return SearchSummary(UNSAT, method, min(bounds) if bounds else None, domains, tree_bounds=bounds)
