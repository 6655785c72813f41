"""Pruning masks as a layer rewrite: a parametrization W -> W * M with a fixed boolean mask, first in the weight's chain (spectral norm after it sees the masked weight). Export bakes it into the weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from certify.common.errors import UserError


class Mask(nn.Module):
    """Parametrization W -> W * M with a fixed boolean mask M (a buffer: saved with the weights)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d / Linear of the model, by module name, skipping parametrization internals."""
    return [(name, layer) for name, layer in model.named_modules()
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and ".parametrizations." not in f".{name}."]


def layer_mask(layer: nn.Module) -> Mask | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    return next((item for item in layer.parametrizations.weight if isinstance(item, Mask)), None)


def attach_masks(model: nn.Module, names: list[str] | None = None) -> dict[str, Mask]:
    """An all-ones Mask on each named layer (default: every Conv2d / Linear), first in its weight's
    parametrization chain; a layer that has one keeps it. Returns name -> Mask."""
    layers = dict(prunable_layers(model))
    names = list(layers) if names is None else list(names)
    missing = [name for name in names if name not in layers]
    if missing:
        raise UserError(f"the model has no Conv2d/Linear layer(s) named {missing}",
                        "the file's recipe does not fit its architecture; re-create it")
    masks = {}
    for name in names:
        layer = layers[name]
        mask = layer_mask(layer)
        if mask is None:
            weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") \
                else layer.weight
            mask = Mask(tuple(weight.shape), device=weight.device)
            if parametrize.is_parametrized(layer, "weight"):
                # First in the chain: the parametrizations after it (spectral norm) see the masked weight.
                layer.parametrizations.weight.insert(0, mask)
            else:
                parametrize.register_parametrization(layer, "weight", mask)
        masks[name] = mask
    return masks


def zero_pruned_originals(model: nn.Module) -> None:
    """Set the raw stored weight to 0 where it is masked (the mask is first in the chain, so this
    changes nothing the network computes, and the file holds no stale values there)."""
    with torch.no_grad():
        for _, layer in prunable_layers(model):
            mask = layer_mask(layer)
            if mask is not None:
                layer.parametrizations.weight.original.mul_(mask.mask)


