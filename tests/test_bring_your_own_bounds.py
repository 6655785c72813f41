"""Soundness of the bounds certify adds to auto_LiRPA 0.3 for a user's activations (GELU through Erf,
ELU) and of the patch for flat Adds: every certified margin lower bound must lie below the margins
at sampled points of the box and at points a gradient search drives towards the worst margin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certify.bounds.bounder import (MarginBounder, empirical_margins,
                                    margin_matrix)
from certify.common.errors import UserError


class Erf(nn.Module):
    def forward(self, x):
        return torch.erf(3 * x)


def mlp(activation: nn.Module, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), activation, nn.Linear(width, width), activation, nn.Linear(width, 4))


def worst_margins(model: nn.Module, lo: torch.Tensor, hi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample and margin row: the smallest margin found by sampling the box (corners included)
    and by signed-gradient descent on each row from the sampled points."""
    generator = torch.Generator().manual_seed(1)
    n, d = lo.shape
    points = lo[:, None] + torch.rand(n, 512, d, generator=generator) * (hi - lo)[:, None]
    corners = torch.where(torch.rand(n, 512, d, generator=generator) < 0.5, lo[:, None], hi[:, None])
    points = torch.cat([points, corners], 1)
    expanded = labels[:, None].expand(-1, points.shape[1]).reshape(-1)
    rows = 3  # one margin per other class
    best = empirical_margins(model(points.reshape(-1, d)), expanded).reshape(n, -1, rows).amin(1)
    step = (hi - lo)[:, None] / 20
    for row in range(rows):
        x = points[:, :64].clone()
        for _ in range(30):
            x.requires_grad_(True)
            margin = empirical_margins(model(x.reshape(-1, d)), labels[:, None].expand(-1, 64).reshape(-1))[:, row]
            (grad,) = torch.autograd.grad(margin.sum(), x)
            x = torch.maximum(torch.minimum(x.detach() - step * grad.sign(), hi[:, None]), lo[:, None])
        with torch.no_grad():
            found = empirical_margins(model(x.reshape(-1, d)), labels[:, None].expand(-1, 64).reshape(-1))
        best[:, row] = torch.minimum(best[:, row], found[:, row].reshape(n, 64).amin(1))
    return best


@pytest.mark.parametrize("activation", [nn.GELU(), nn.ELU(), nn.ELU(alpha=0.5), Erf(), nn.SiLU()],
                         ids=["gelu", "elu", "elu-0.5", "erf", "silu"])
@pytest.mark.parametrize("radius", [0.05, 0.5])
def test_margin_bounds_hold_on_the_box(activation, radius):
    model = mlp(activation).eval()
    bounder = MarginBounder(model, (6,))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 0])
    lo, hi = x - radius, x + radius
    worst = worst_margins(model, lo, hi, labels)
    bounds = {}
    for method in ("ibp", "crown", "alpha-crown"):
        bounds[method] = bounder.lower_bounds(lo, hi, margin_matrix(labels, 4), method)
        assert torch.isfinite(bounds[method]).all()
        assert (bounds[method] <= worst + 1e-5).all(), (method, (bounds[method] - worst).max())
    assert (bounds["crown"] >= bounds["ibp"] - 1e-6).all()
    # A bound that says nothing would pass the checks above: at a small radius CROWN must be close.
    if radius == 0.05:
        assert (worst - bounds["crown"]).max() < 0.5, (worst - bounds["crown"]).max()


def test_elu_with_alpha_above_one_is_refused():
    with pytest.raises(UserError, match="alpha 2"):
        MarginBounder(mlp(nn.ELU(alpha=2.0)), (6,)).lower_bounds(
            torch.zeros(1, 6), torch.ones(1, 6), margin_matrix(torch.tensor([0]), 4), "crown")


def test_an_op_without_bound_is_one_user_error():
    from certify.bounds.compat import bounded_module

    with pytest.raises(UserError, match="the model uses Clip, which the bound methods"):
        bounded_module(mlp(nn.Hardtanh()), torch.zeros(1, 6))
