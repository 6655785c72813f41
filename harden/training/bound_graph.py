"""The network as auto_LiRPA sees it during certified training: built once per model, bounded through certify's one bounder (certify.bounds.bounder) on every step, differentiably."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from certify.bounds.bounder import ball_input, bound_lower, box_input, margin_matrix
from certify.bounds.compat import bounded_module


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
        self.model = model
        # Two samples: a train-mode BatchNorm1d cannot trace a batch of one.
        example = torch.zeros(2, *input_shape, device=device)
        needs_mirror = any(parametrize.is_parametrized(m) or hasattr(m, "noise_enabled") for m in model.modules())
        traced = self._plain_mirror(model) if needs_mirror else model
        modes = {module: module.training for module in traced.modules()}
        # Tracing runs train-mode forward passes on the example: without this, they would move the
        # BatchNorm running statistics of the model being trained (a resumed run would then differ).
        buffers = {name: value.clone() for name, value in traced.named_buffers()}
        try:
            traced.eval()
            with torch.no_grad():
                self.num_classes = int(traced(example).shape[1])
            traced.train()
            self.bounded = bounded_module(traced, example, device=device, bound_opts={"verbosity": 0})
        finally:
            for module, mode in modes.items():
                module.training = mode
            with torch.no_grad():
                for name, value in traced.named_buffers():
                    value.copy_(buffers[name])
        # Train mode: 0.3's parameter nodes call requires_grad_(self.training) on every bound pass.
        self.bounded.train()
        self._set_layer_modes(batch_statistics=model.training)
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

    def _set_layer_modes(self, *, batch_statistics: bool) -> None:
        """Bounds see Dropout as the identity (the eval-mode network that is certified: a random mask
        in the bound would bound another network, and auto_LiRPA refuses a train-mode Dropout without
        a clean pass first). BatchNorm uses the batch's statistics when the model was handed over in
        train mode (certified training, Shi et al.), its running statistics otherwise (evaluation)."""
        self.batch_statistics = False
        for node in self.bounded.modules():
            kind = type(node).__name__
            if kind == "BoundDropout":
                node.training = False
            elif kind == "BoundBatchNormalization":
                node.training = batch_statistics
                self.batch_statistics = batch_statistics

    def input_and_relu_bounds(self) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """After a bound pass: the bounded input's box and the IBP bounds of every ReLU's input
        (what the warm-up regularizers of harden.training.recipe read)."""
        nodes = list(self.bounded.modules())
        source = next(n for n in nodes if type(n).__name__ == "BoundInput" and getattr(n, "perturbed", False))
        relus = [(n.inputs[0].lower, n.inputs[0].upper) for n in nodes if type(n).__name__ == "BoundRelu"
                 and isinstance(getattr(n.inputs[0], "lower", None), torch.Tensor)]
        return (source.lower, source.upper), relus

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
        return self.margins_over(ball_input(x, eps, norm, lower, upper), y, method)

    def box_margins(self, x_lower: torch.Tensor, x_upper: torch.Tensor, y: torch.Tensor,
                    method: str = "ibp") -> tuple[torch.Tensor, torch.Tensor | None]:
        """lower_margins over the box [x_lower, x_upper] (SABR's small box)."""
        return self.margins_over(box_input(x_lower, x_upper), y, method)

    def margins_over(self, bounded_input, y: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        method = method.lower()
        c = margin_matrix(y, self.num_classes).to(bounded_input.dtype)
        if self.batch_statistics:
            # auto_LiRPA's BatchNorm bounds read the statistics of the node's last forward pass,
            # which a bound pass does not redo: without this pass they are the previous batch's.
            self.bounded(bounded_input)
        bound = bound_lower(self.bounded, bounded_input, c, method, differentiable=torch.is_grad_enabled())
        ibp = self.bounded.ibp_lower if method == "crown-ibp" else None
        return bound, ibp

    def link(self, effective: list[torch.Tensor], loss_sum: torch.Tensor, *, keep: bool = False) -> torch.Tensor:
        """A zero-valued term whose gradient in the real parameters is d loss_sum / d theta
        (`keep`: another term is linked through the same bound pass afterwards)."""
        params = [param for _, param in self._params]
        grads = torch.autograd.grad(loss_sum, params, allow_unused=True, retain_graph=keep)
        term = sum((value * grad).sum() for value, grad in zip(effective, grads) if grad is not None)
        return term - term.detach()


def bound_loss(lower: torch.Tensor) -> torch.Tensor:
    """Per-sample CE of the logit vector (0, -lower): the margin bound's soft 'worst class'."""
    return torch.logsumexp(F.pad(-lower, (1, 0)), dim=1)


