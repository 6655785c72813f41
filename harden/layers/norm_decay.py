"""Norm decay (Liang & Huang 2021): a gradient term that shrinks each layer's linf or l1 operator
norm, the subgradients taken on the stored weight. The norms themselves are in harden.layers.norms."""

from __future__ import annotations

import torch
from torch import nn

from certify.common.errors import UserError
from harden.layers.norms import _class_sums, _conv_column_taps, _input_channel_table


def _raw_weight(layer: nn.Module) -> torch.Tensor:
    # Norm decay acts on the stored parameter: on a parametrized layer, the unconstrained original.
    if hasattr(layer, "parametrizations") and "weight" in layer.parametrizations:
        return layer.parametrizations.weight.original
    return layer.weight


def _linf_subgradient(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(weight.shape[0], -1)
    row = int(flat.abs().sum(1).argmax())
    grad = torch.zeros_like(weight)
    grad[row] = weight.detach()[row].sign()
    return grad


def _l1_subgradient(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    grad = torch.zeros_like(w)
    if isinstance(layer, nn.Linear):
        col = int(w.abs().sum(0).argmax())
        grad[:, col] = w[:, col].sign()
        return grad
    rows, cols = _conv_column_taps(layer, None)
    sums = _class_sums(_input_channel_table(w, layer.groups), rows, cols)  # (classes, C_in)
    best = int(sums.argmax())
    pair, channel = divmod(best, sums.shape[1])
    row_set, col_set = rows[pair // len(cols)], cols[pair % len(cols)]
    c_out, c_per_group = w.shape[0], w.shape[1]
    group, local = divmod(channel, c_per_group)
    outs = slice(group * (c_out // layer.groups), (group + 1) * (c_out // layer.groups))
    taps = (row_set[:, None] & col_set[None, :]).to(w.device)
    grad[outs, local] = w[outs, local].sign() * taps
    return grad


class NormDecay:
    """Norm decay (Liang & Huang 2021): after backward(), before optimizer.step(), `apply(model)`
    adds beta * h to the gradient of every Conv2d / Linear weight, where h is a momentum average
    (h <- momentum*h + (1-momentum)*g) of the subgradient g of the layer's linf norm (sign(W) on
    the arg-max row) or l1 norm (sign(W) on the arg-max column / tap class, for a large input).
    Parametrized layers are decayed on their raw stored weight."""

    def __init__(self, beta: float, p: str = "inf", momentum: float = 0.5):
        if p not in ("inf", "1"):
            raise UserError(f"norm decay supports p='inf' or p='1', got {p!r}", "choose --norm inf or --norm 1")
        if not beta >= 0.0:
            raise UserError(f"norm decay strength must be >= 0, got {beta}", "use a value in 1e-5..0.1")
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"norm decay momentum must be in [0, 1), got {momentum}", "use 0.5")
        self.beta, self.p, self.momentum = float(beta), p, float(momentum)
        self._averages: dict[str, torch.Tensor] = {}

    def apply(self, model: nn.Module) -> None:
        for name, layer in model.named_modules():
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                continue
            weight = _raw_weight(layer)
            if not weight.requires_grad:
                continue
            g = _linf_subgradient(weight) if self.p == "inf" else _l1_subgradient(layer, weight)
            previous = self._averages.get(name)
            average = (1.0 - self.momentum) * g if previous is None or previous.shape != g.shape \
                else self.momentum * previous + (1.0 - self.momentum) * g
            self._averages[name] = average
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.add_(average, alpha=self.beta)
