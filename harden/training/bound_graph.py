"""The network as auto_LiRPA sees it during certified training: built once per model, bounded through certify's one bounder (certify.bounds.bounder) on every step, differentiably."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from certify.bounds.bounder import ball_input, bound_lower, margin_matrix
from certify.bounds.compat import lirpa


class BoundGraph:
    """The training module as auto_LiRPA sees it, traced ONCE (tracing costs far more than a step).

    A plain module is traced directly: auto_LiRPA 0.3's BoundedModule uses the module's own
    Parameter objects (checked here), so bounds are differentiable in the weights being trained.
    A module with parametrizations (spectral norm, masks) or noise layers cannot be traced as it
    is, so a plain mirror is traced instead (parametrizations removed, noise off: the
    deterministic mean network that certification sees). Each step copies the effective weights
    into the mirror; `link` then carries the bound's gradient back to the real parameters through
    the chain rule (d loss / d theta = sum_w <d loss / d w, d w / d theta>), in the same backward
    pass as the rest of the loss.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], device: torch.device):
        auto_lirpa = lirpa()
        self.model = model
        example = torch.zeros(1, *input_shape, device=device)
        needs_mirror = any(parametrize.is_parametrized(m) or hasattr(m, "noise_enabled") for m in model.modules())
        traced = self._plain_mirror(model) if needs_mirror else model
        modes = {module: module.training for module in traced.modules()}
        try:
            traced.eval()
            with torch.no_grad():
                self.num_classes = int(traced(example).shape[1])
            traced.train()
            self.bounded = auto_lirpa.BoundedModule(traced, example, device=device, bound_opts={"verbosity": 0})
        finally:
            for module, mode in modes.items():
                module.training = mode
        # Train mode: 0.3's parameter nodes call requires_grad_(self.training) on every bound pass.
        self.bounded.train()
        own = {id(p) for p in model.parameters()}
        shared = {id(p) for p in self.bounded.parameters()} <= own
        # A release that copies parameters gets the same treatment as a mirror.
        self.copies = needs_mirror or not shared
        if not self.copies:
            return
        # Bound-graph parameter -> (submodule of the real model, attribute): reading the attribute
        # gives the effective (parametrized) weight, differentiable in the raw parameters.
        self._params = list(self.bounded.named_parameters())
        self._sources = []
        for name, _ in self._params:
            if name.startswith("/"):  # a node name: translate it to the module's own name
                name = self.bounded.node_name_map[name]
            owner, _, attr = name.rpartition(".")
            self._sources.append((model.get_submodule(owner) if owner else model, attr))

    @staticmethod
    def _plain_mirror(model: nn.Module) -> nn.Module:
        mirror = copy.deepcopy(model)
        for layer in mirror.modules():
            if parametrize.is_parametrized(layer):
                # Not parametrize.remove_parametrizations: a deep copy shares the injected
                # "Parametrized..." class with the original, and removal deletes the property from
                # that class, i.e. from the original model too. Swap this instance's class back.
                originals = {name: chain.original for name, chain in layer.parametrizations.items()}
                layer.__class__ = type(layer).__bases__[0]
                del layer._modules["parametrizations"]
                for name, original in originals.items():
                    layer.register_parameter(name, nn.Parameter(original.detach().clone()))
                # Spectral norm's input-size check is Python control flow the tracer warns about;
                # the mirror only ever sees the training input size.
                layer._forward_pre_hooks.clear()
            if hasattr(layer, "noise_enabled"):
                layer.noise_enabled = False
        return mirror

    def refresh(self) -> list[torch.Tensor] | None:
        """Copy the effective weights into the mirror; returns them (None when no mirror is used)."""
        if not self.copies:
            return None
        effective = [getattr(owner, attr) for owner, attr in self._sources]
        with torch.no_grad():
            for (_, param), value in zip(self._params, effective):
                param.copy_(value)
        return effective

    def lower_margins(self, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, lower: float,
                      upper: float, method: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(lower bound of the margins by `method`, IBP lower bound when method is CROWN-IBP).

        `method` is a name of certify.bounds.bounder.LIRPA_METHODS ("ibp", "crown-ibp"; auto_LiRPA's
        spelling "IBP", "CROWN-IBP" is accepted too): the bound certify computes under that name.
        """
        method = method.lower()
        c = margin_matrix(y, self.num_classes).to(x.dtype)
        bound = bound_lower(self.bounded, ball_input(x, eps, norm, lower, upper), c, method,
                            differentiable=torch.is_grad_enabled())
        ibp = self.bounded.ibp_lower if method == "crown-ibp" else None
        return bound, ibp

    def link(self, effective: list[torch.Tensor], loss_sum: torch.Tensor) -> torch.Tensor:
        """A zero-valued term whose gradient in the real parameters is d loss_sum / d theta."""
        params = [param for _, param in self._params]
        grads = torch.autograd.grad(loss_sum, params, allow_unused=True)
        term = sum((value * grad).sum() for value, grad in zip(effective, grads) if grad is not None)
        return term - term.detach()


def bound_loss(lower: torch.Tensor) -> torch.Tensor:
    """Per-sample CE of the logit vector (0, -lower): the margin bound's soft 'worst class'."""
    return torch.logsumexp(F.pad(-lower, (1, 0)), dim=1)


