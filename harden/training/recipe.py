"""Shi et al. 2021's recipe for fast certified training, and the step plan every certified run follows.

- `ibp_initialize`: every Conv/Linear weight but the last layer's drawn from N(0, 2 pi / fan_in^2),
  so that an interval's width keeps its size from layer to layer at initialization (Kaiming's
  init makes IBP bounds grow exponentially with depth, and the first ramp steps then explode).
- `warmup_regularizer`: while eps ramps up, keep the IBP bounds of every ReLU input tight (their
  mean half-width no larger than `tolerance` times the input box's) and the active / inactive
  ReLUs balanced (their means and variances comparable), both from the bounds the step computed.
The warm-up's and the ramp's lengths, counted in steps, are harden.training.schedule's.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F



# The warm-up regularizers' weight and tolerance (Shi et al.'s lambda and tau).
WARMUP_WEIGHT = 0.5
WARMUP_TOLERANCE = 0.5


def ibp_initialize(model: nn.Module) -> int:
    """Re-draw the weights of every Conv/Linear layer but the last; returns how many were re-drawn."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
            if layer.bias is not None:
                layer.bias.zero_()
    return max(0, len(layers) - 1)


def _ratio_shortfall(ratio: torch.Tensor, tolerance: float) -> torch.Tensor:
    """How far min(ratio, 1 / ratio) falls below the tolerance, relative to it (0 when balanced)."""
    balanced = torch.minimum(ratio, 1.0 / ratio.clamp_min(1e-12))
    return F.relu(tolerance - balanced) / tolerance


def warmup_regularizer(input_box: tuple[torch.Tensor, torch.Tensor],
                       relu_inputs: list[tuple[torch.Tensor, torch.Tensor]], tolerance: float = WARMUP_TOLERANCE) -> torch.Tensor:
    """Bound-tightness plus ReLU-balance loss, averaged over the ReLU layers (0 without any)."""
    input_width = ((input_box[1] - input_box[0]) / 2).mean()
    total = input_width.new_zeros(())
    if not relu_inputs:
        return total
    for lower, upper in relu_inputs:
        centre, width = (upper + lower) / 2, (upper - lower) / 2
        tightness = input_width / width.mean().clamp_min(1e-12)
        total = total + F.relu(tolerance - tightness) / tolerance
        active, inactive = (lower > 0).to(centre), (upper < 0).to(centre)
        spread = (centre - centre.mean()) ** 2
        mean_ratio = (centre * active).mean() / -(centre * inactive).mean()
        var_ratio = (spread * active).sum() / (spread * inactive).sum()
        balance = _ratio_shortfall(mean_ratio, tolerance) + _ratio_shortfall(var_ratio, tolerance)
        # A layer with no active or no inactive ReLU has no ratio to balance this step.
        if torch.isfinite(balance):
            total = total + balance
    return total / len(relu_inputs)
