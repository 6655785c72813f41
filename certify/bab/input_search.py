"""Input-split branch and bound for low-dimensional inputs (ACAS Xu-like nets: a handful of inputs).

Each open box is bisected along one input dimension. The dimension is chosen by looking ahead:
both halves along EVERY dimension are bounded in one batched call (with up to `MAX_INPUT_DIMS`
dimensions that costs a few small CROWN passes), and the dimension whose worse half has the best
bound is kept, with its two halves already bounded. The centre of every half still open is the
candidate counterexample (forward pass, then the query's `confirm` on the ONNX file).
"""

from __future__ import annotations

import torch

from certify.bab.outcome import SAT, UNKNOWN, UNSAT, Limits, Outcome, Query
from certify.bounds.bounder import MarginBounder

MAX_INPUT_DIMS = 10


def input_split_applies(query: Query) -> bool:
    """Low-dimensional boxes only: the halves of a ball are not balls (an l2 query splits its ReLUs)."""
    return query.ball is None and query.lower.numel() <= MAX_INPUT_DIMS


def _values(bounder: MarginBounder, query: Query, lower: torch.Tensor, upper: torch.Tensor, method: str) -> torch.Tensor:
    """max_r lower(g_r) on each box (n,)."""
    c = query.c.unsqueeze(0).expand(len(lower), -1, -1)
    return (bounder.lower_bounds(lower, upper, c, method).cpu() - query.d).amax(1)


def _halves(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both halves of each of the n boxes along each of the D dimensions: (2 * D * n, D) boxes,
    ordered (half, dimension, box)."""
    n, dims = lower.shape
    middle = (lower + upper) / 2
    low = lower.unsqueeze(0).repeat(2, dims, 1, 1)     # (2, D, n, D)
    high = upper.unsqueeze(0).repeat(2, dims, 1, 1)
    for k in range(dims):
        high[0, k, :, k] = middle[:, k]
        low[1, k, :, k] = middle[:, k]
    return low.reshape(-1, dims), high.reshape(-1, dims)


def search_input_splits(bounder: MarginBounder, module: torch.nn.Module, query: Query, limits: Limits,
                        *, method: str = "crown") -> Outcome:
    """Branch and bound on the input box of `query` (see the module docstring)."""
    start, shape = limits.visited[0], query.lower.shape[1:]
    lower, upper = query.lower.reshape(1, -1).cpu(), query.upper.reshape(1, -1).cpu()
    values = _values(bounder, query, lower.view(1, *shape), upper.view(1, *shape), method)
    closed = float("inf")
    while len(values):
        if float(values.max()) > 0:
            closed = min(closed, float(values[values > 0].min()))
            keep = values <= 0
            lower, upper, values = lower[keep], upper[keep], values[keep]
            continue
        x = _centre_counterexample(module, query, lower, upper, shape)
        if x is not None:
            return Outcome(SAT, "bab-input", float(values.min()), limits.visited[0] - start, x=x)
        reason = limits.stop_reason()
        if reason is not None:
            return Outcome(UNKNOWN, "bab-input", float(values.min()), limits.visited[0] - start, reason)
        order = torch.argsort(values)
        taken, kept = order[:limits.batch], order[limits.batch:]
        low, high = _halves(lower[taken], upper[taken])
        half_values = _values(bounder, query, low.view(-1, *shape), high.view(-1, *shape), method)
        limits.visited[0] += len(low)
        n, dims = len(taken), lower.shape[1]
        worse = torch.minimum(*half_values.view(2, dims, n)).t()          # (n, D)
        best = worse.argmax(1)
        pick = torch.stack([half * dims * n + best * n + torch.arange(n) for half in (0, 1)]).reshape(-1)
        lower, upper = torch.cat([lower[kept], low[pick]]), torch.cat([upper[kept], high[pick]])
        values = torch.cat([values[kept], half_values[pick]])
    return Outcome(UNSAT, "bab-input", closed, limits.visited[0] - start)


def _centre_counterexample(module, query: Query, lower: torch.Tensor, upper: torch.Tensor, shape) -> torch.Tensor | None:
    centres = ((lower + upper) / 2).view(-1, *shape)
    device = next(module.parameters()).device
    with torch.no_grad():
        y = module(centres.to(device)).cpu()
    hits = torch.nonzero((y @ query.c.t() - query.d).amax(1) <= 0).flatten()
    for k in hits.tolist():
        if query.confirm(centres[k]):
            return centres[k]
    return None
