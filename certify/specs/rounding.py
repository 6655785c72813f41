"""The one outward (and inward) rounding of boxes into the dtype a model computes in.

A certificate is only as wide as the box that was bounded. Casting a float64 bound to float32 rounds
to nearest, which can move a lower bound up or an upper bound down by one ulp, so the box that was
proved would be smaller than the one claimed. Every box that is bounded goes through `outward_box`
(the smallest box of `dtype` containing the given one); attacks, which must stay inside the claimed
box, use `inward_box`.
"""

from __future__ import annotations

import torch

__all__ = ["outward_box", "inward_box", "eps_ball"]


def _down(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, -float("inf")))


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, float("inf")))


def outward_box(lower: torch.Tensor, upper: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest `dtype` box containing [lower, upper]: lower rounded down and upper rounded up
    when the cast is inexact (exact values are kept)."""
    lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
    lo, hi = lower.to(dtype), upper.to(dtype)
    wide = torch.promote_types(lower.dtype, dtype)
    lo = torch.where(lo.to(wide) > lower.to(wide), _down(lo), lo)
    hi = torch.where(hi.to(wide) < upper.to(wide), _up(hi), hi)
    return lo, hi


def inward_box(lower: torch.Tensor, upper: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest `dtype` box inside [lower, upper] (an axis with no `dtype` value inside
    collapses to its rounded-up lower end)."""
    lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
    lo, hi = lower.to(dtype), upper.to(dtype)
    wide = torch.promote_types(lower.dtype, dtype)
    lo = torch.where(lo.to(wide) < lower.to(wide), _up(lo), lo)
    hi = torch.where(hi.to(wide) > upper.to(wide), _down(hi), hi)
    return lo, torch.maximum(hi, lo)


def _sum_with_error(a: torch.Tensor, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 s = fl(a + b) and the exact rounding error e (a + b == s + e in real numbers)."""
    s = a + b
    b_virtual = s - a
    error = (a - (s - b_virtual)) + (b - b_virtual)
    return s, error


def eps_ball(x: torch.Tensor, eps: float, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[x - eps, x + eps] clipped to [low, high], in x's dtype, containing the real-number ball.

    x - eps is formed in float64 with its exact error, so that a float64 result that rounded inward
    is first moved one float64 ulp out; the clip then happens before the one outward cast."""
    x64 = x.detach().to(torch.float64)
    lower, lower_error = _sum_with_error(x64, -float(eps))
    upper, upper_error = _sum_with_error(x64, float(eps))
    lower = torch.where(lower_error < 0, _down(lower), lower).clamp(low, high)
    upper = torch.where(upper_error > 0, _up(upper), upper).clamp(low, high)
    return outward_box(lower, upper, x.dtype)
