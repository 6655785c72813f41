"""The sound half of `harden inspect`: the network's Lipschitz constants as provable upper bounds.

The estimate next to it multiplies power-iteration sigmas, which approach each norm from below.
This one is certify's own (certify.bounds.lipschitz, the bound of `certify --method lipschitz`):
every Conv2d / Linear norm from the exact SVD of its explicit matrix or, where that matrix is too
large, from Gram iteration, an upper bound at every step. It exists only where the product rule
holds (a chain of layers); for anything else, a residual x + f(x) above all, it is "not a bound".
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from certify.bounds.lipschitz import analyse
from certify.bounds.operator_norms import matrix_l2
from harden.layers.wca import noise_disabled


def sound_bounds(module: nn.Module, input_shape: tuple[int, ...], why_not: str | None) -> dict:
    """{"l2_sound_upper_bound", "linf_sound_upper_bound", "sound_methods", "sound_why_not"}: the
    sound bounds with the norm method of each weight layer, or (None, why) where there is none."""
    result = {"l2_sound_upper_bound": None, "linf_sound_upper_bound": None, "sound_methods": {},
              "sound_why_not": None}
    if why_not is not None:
        result["sound_why_not"] = f"not a bound: {why_not}"
        return result
    model = copy.deepcopy(module).eval()
    with torch.no_grad(), noise_disabled(model):
        chain = analyse(model, tuple(input_shape))
    if chain.refused is not None:
        result["sound_why_not"] = f"not a bound: {chain.refused}"
        return result
    methods = {step.name: step.method for step in chain.steps if step.kind in ("Conv2d", "Linear")}
    l2 = math.prod(step.l2 for step in chain.steps)
    linf = math.prod(step.linf for step in chain.steps)
    if chain.head is not None:
        head = matrix_l2(chain.head)
        methods[chain.head_name] = head.method
        l2 *= head.value
        linf *= float(chain.head.abs().sum(1).max())
    result.update({"l2_sound_upper_bound": l2, "linf_sound_upper_bound": linf, "sound_methods": methods})
    return result


def sound_lines(bounds: dict) -> list[str]:
    """The lines `harden inspect` prints for the sound bounds."""
    if bounds.get("sound_why_not"):
        return [f"sound Lipschitz bound: {bounds['sound_why_not']}"]
    if bounds.get("l2_sound_upper_bound") is None:
        return []
    used = sorted(set(bounds["sound_methods"].values()))
    return [f"l2 Lipschitz constant   <= {bounds['l2_sound_upper_bound']:.6g}  (sound upper bound: "
            f"{'; '.join(used)})",
            f"linf Lipschitz constant <= {bounds['linf_sound_upper_bound']:.6g}  (sound upper bound: exact "
            "l-infinity operator norms)"]
