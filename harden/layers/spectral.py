"""Spectral normalization of the true layer operator (Farnia et al., ICLR 2019).

Every selected Conv2d / Linear weight W is replaced, through a torch parametrization, by
W / max(1, sigma(W) / beta): the operator norm is clipped at beta, never forced up to it. sigma is
the l2 norm of the layer as a linear map on its real input -- for a conv, conv2d with its stride,
padding, dilation and groups on a C_in x H x W sample -- estimated by power iteration with the
conv and its adjoint (conv_transpose2d). It is not the norm of the kernel reshaped to
C_out x (C_in*k*k), which is what torch.nn.utils.spectral_norm measures.

Input sizes. `apply_spectral_norm` needs the model's `input_shape` and records every conv layer's
input size by one forward pass of a zero input (forward pre-hooks, removed afterwards). This is
done at conversion rather than lazily at the first training forward so that the power-iteration
state `u` (one input sample, 1 x C_in x H x W) exists, with a fixed shape, as soon as the layer is
converted: it is converged there, is in the state dict, and round-trips through
`load_state_dict` into a model converted with the same `input_shape`. A forward pre-hook then
checks each conv input against the recorded size and stops with a UserError on a mismatch,
because sigma measured on one size says nothing exact about another.

State updates. `u` advances by `n_power_iterations` steps per weight access only in training
mode and only outside `certify.common.modes.model_mode(model)`; attacks and evaluation must not move it.
sigma = <A(u), v> with u and v detached, so gradients reach the raw weight through sigma too.

BatchNorm. The documented strategy is `fold_batchnorm` before `apply_spectral_norm`: an eval-mode
BatchNorm directly after a Conv2d / Linear in an nn.Sequential is folded into that layer, so the
normalized layer is the whole affine map the network applies.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from certify.common.errors import UserError
from certify.common.modes import model_mode
from harden.layers.norms import (ConvOperator, Operator, effective_weight, layer_operator,
                          power_iteration, power_steps, start_vector)

# Convergence used where sigma must be a near-exact number: at conversion and before baking.
# Close top singular values (common for convs on small inputs) can need a few thousand steps.
CONVERGE_ITERS = 5000
CONVERGE_TOL = 1e-8
BAKE_ITERS = 10000
BAKE_TOL = 1e-10


class OperatorSpectralNorm(nn.Module):
    """Parametrization W -> W / max(1, sigma(W) / beta), sigma the norm of the layer's operator."""

    def __init__(self, operator: Operator, beta: float, weight: torch.Tensor, *,
                 n_power_iterations: int = 1):
        super().__init__()
        if not beta > 0.0:
            raise UserError(f"spectral norm bound beta must be > 0, got {beta}", "use e.g. --spectral-norm 1.0")
        if n_power_iterations < 0:
            raise UserError(f"n_power_iterations must be >= 0, got {n_power_iterations}", "use 1")
        self.operator = operator
        self.beta = float(beta)
        self.n_power_iterations = int(n_power_iterations)
        self.frozen = False
        self.register_buffer("u", start_vector(operator.input_shape, dtype=weight.dtype, device=weight.device))
        self.register_buffer("sigma", torch.zeros((), dtype=weight.dtype, device=weight.device))

    @property
    def input_hw(self) -> tuple[int, int] | None:
        return self.operator.input_hw if isinstance(self.operator, ConvOperator) else None

    def converge(self, weight: torch.Tensor, *, iters: int = CONVERGE_ITERS,
                 tol: float = CONVERGE_TOL) -> tuple[float, int]:
        """Run the power iteration from the current u until sigma changes by < tol (relative) or
        `iters` steps, in float64; keep the result in u and sigma. Returns (sigma, steps)."""
        w = weight.detach()
        w = (w.cpu() if w.device.type == "mps" else w).to(torch.float64)
        sigma, u, steps = power_iteration(self.operator, w, self.u.to(w), iters=iters, tol=tol)
        with torch.no_grad():
            self.u.copy_(u.to(self.u))
            self.sigma.fill_(sigma)
        return sigma, steps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen and self.n_power_iterations > 0:
            u = power_steps(self.operator, weight.detach(), self.u, self.n_power_iterations)
            with torch.no_grad():
                self.u.copy_(u)
        # A clone: a later training forward updates the buffer in place while this graph may
        # still need u for its backward pass (two forwards before one backward, as in TRADES).
        out = self.operator.apply(self.u.clone(), weight)
        direction = out.detach() / out.detach().norm().clamp_min(torch.finfo(out.dtype).tiny)
        sigma = (out * direction).sum()
        with torch.no_grad():
            self.sigma.copy_(sigma.detach())
        if sigma.detach() <= self.beta:
            # Not clipped: W / 1 has the same value and gradient, without a backward through sigma.
            return weight
        return weight / (sigma / self.beta)

    def extra_repr(self) -> str:
        size = f", input_hw={self.input_hw}" if self.input_hw is not None else ""
        return f"beta={self.beta}, n_power_iterations={self.n_power_iterations}{size}"


class _InputSizeCheck:
    """Forward pre-hook: the conv must see the input size its sigma was measured on."""

    def __init__(self, name: str, input_hw: tuple[int, int]):
        self.name, self.input_hw = name, tuple(input_hw)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        got = tuple(args[0].shape[-2:])
        if got != self.input_hw:
            raise UserError(f"layer '{self.name}' got a {got[0]}x{got[1]} input but its spectral norm was "
                            f"measured on {self.input_hw[0]}x{self.input_hw[1]}",
                            "feed inputs of the size given at conversion, or convert again with the new input_shape")


def spectral_layers(model: nn.Module) -> list[tuple[str, nn.Module, OperatorSpectralNorm]]:
    """(name, layer, parametrization) for every layer of `model` whose weight is spectrally normalized."""
    found = []
    for name, layer in model.named_modules():
        if parametrize.is_parametrized(layer, "weight"):
            for item in layer.parametrizations.weight:
                if isinstance(item, OperatorSpectralNorm):
                    found.append((name, layer, item))
    return found


def _input_sizes(model: nn.Module, input_shape: tuple[int, ...], convs: dict[nn.Module, str]) -> dict[nn.Module, tuple[int, int]]:
    """Each conv's input H x W, from one eval-mode forward pass of a zero input."""
    sizes: dict[nn.Module, set[tuple[int, int]]] = {conv: set() for conv in convs}

    def record(module: nn.Module, args: tuple) -> None:
        sizes[module].add(tuple(int(n) for n in args[0].shape[-2:]))

    reference = next(model.parameters())
    handles = [conv.register_forward_pre_hook(record) for conv in convs]
    modes = {module: module.training for module in model.modules()}
    model.eval()  # keeps BatchNorm statistics untouched
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=reference.dtype, device=reference.device))
    except (RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"the model does not run on an input of shape {tuple(input_shape)}: "
                        f"{str(err).splitlines()[0]}", "give the model's real input shape as C H W") from err
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    result = {}
    for conv, seen in sizes.items():
        if not seen:
            raise UserError(f"conv layer '{convs[conv]}' is not used by the model's forward pass, so its "
                            "input size is unknown", "leave it out of the selected layers or remove it")
        if len(seen) > 1:
            raise UserError(f"conv layer '{convs[conv]}' is called on several input sizes {sorted(seen)}",
                            "spectral normalization needs one input size per layer: use separate layers")
        result[conv] = seen.pop()
    return result


def apply_spectral_norm(model: nn.Module, beta: float, *, input_shape: tuple[int, ...],
                        layers: tuple[str, ...] = ("conv", "linear"),
                        n_power_iterations: int = 1, converge: bool = True) -> list[dict]:
    """Register OperatorSpectralNorm (in place) on every nn.Conv2d ("conv") and nn.Linear ("linear")
    of `model`; `input_shape` is one sample's shape (C, H, W). Each power iteration is converged at
    registration (float64, estimated relative error < 1e-8, at most 5000 steps). Returns one record per
    layer: name, type, input_hw, sigma_before, sigma_after (= sigma_before / max(1, sigma_before /
    beta), exact given sigma_before since scaling a map scales its norm), iterations, and converged
    (False when the step limit was hit first)."""
    kinds = {"conv": nn.Conv2d, "linear": nn.Linear}
    unknown = [kind for kind in layers if kind not in kinds]
    if unknown:
        raise UserError(f"unknown layer kind(s) {unknown} for spectral normalization", "choose from conv, linear")
    if not beta > 0.0:
        raise UserError(f"spectral norm bound beta must be > 0, got {beta}", "use e.g. --spectral-norm 1.0")
    selected = tuple(kinds[kind] for kind in layers)
    targets = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, selected)]
    if not targets:
        raise UserError(f"the model has no {' or '.join(layers)} layers to normalize",
                        "spectral normalization rewrites nn.Conv2d and nn.Linear layers")
    already = [name for name, _, _ in spectral_layers(model)]
    if already:
        raise UserError(f"layers {already} already have spectral normalization", "apply it once, to the plain model")
    convs = {layer: name for name, layer in targets if isinstance(layer, nn.Conv2d)}
    sizes = _input_sizes(model, tuple(input_shape), convs) if convs else {}

    records = []
    for name, layer in targets:
        input_hw = sizes.get(layer)
        weight = effective_weight(layer)
        sn = OperatorSpectralNorm(layer_operator(layer, input_hw), beta, weight,
                                  n_power_iterations=n_power_iterations)
        # Reloading a saved model (converge=False) skips this: the file restores u and sigma.
        sigma, steps = sn.converge(weight) if converge else (float("nan"), 0)
        parametrize.register_parametrization(layer, "weight", sn)
        if input_hw is not None:
            layer.register_forward_pre_hook(_InputSizeCheck(name, input_hw))
        records.append({"name": name, "type": "conv" if input_hw is not None else "linear",
                        "input_hw": list(input_hw) if input_hw is not None else None,
                        "sigma_before": sigma, "sigma_after": sigma / max(1.0, sigma / beta),
                        "iterations": steps, "converged": steps < CONVERGE_ITERS})
    return records


def _parametrization_input(layer: nn.Module, target: nn.Module) -> torch.Tensor:
    """The tensor the parametrization `target` receives: the original through the ones before it."""
    chain = layer.parametrizations.weight
    with torch.no_grad():
        value = chain.original
        for item in chain:
            if item is target:
                return value
            value = item(value)
    raise AssertionError("parametrization not found on its layer")


def bake(model: nn.Module, *, iters: int = BAKE_ITERS, tol: float = BAKE_TOL) -> nn.Module:
    """Converge every spectral-norm state (float64, relative change < tol or `iters` steps), then
    replace each parametrized weight by its value (in place; every parametrization of that weight,
    e.g. a pruning mask before the norm, is baked with it). Returns the model."""
    with model_mode(model):
        for _, layer, sn in spectral_layers(model):
            sn.converge(_parametrization_input(layer, sn), iters=iters, tol=tol)
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            for key, hook in list(layer._forward_pre_hooks.items()):
                if isinstance(hook, _InputSizeCheck):
                    del layer._forward_pre_hooks[key]
    return model


_FOLDABLE = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d (BatchNorm1d) that directly follows a Conv2d (Linear) inside an
    nn.Sequential, at any depth, into that layer, using its running statistics; the BatchNorm
    becomes nn.Identity. In place; the result computes what the eval-mode model computed."""
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(sequence._modules)
        for first, second in zip(keys, keys[1:]):
            layer, norm = sequence._modules[first], sequence._modules[second]
            if not any(isinstance(layer, a) and isinstance(norm, b) for a, b in _FOLDABLE):
                continue
            if norm.num_features != layer.weight.shape[0]:
                continue
            if parametrize.is_parametrized(layer):
                raise UserError(f"layer '{first}' is parametrized (spectral norm or mask) and cannot take "
                                "a folded BatchNorm", "fold BatchNorm before applying spectral norm or pruning")
            if norm.running_mean is None or norm.running_var is None:
                raise UserError(f"BatchNorm '{second}' keeps no running statistics, so it is not a fixed "
                                "affine map", "train it with track_running_stats=True, or remove it")
            _fold_into(layer, norm)
            sequence._modules[second] = nn.Identity()
    return model


def _fold_into(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        weight = layer.weight.to(torch.float64)
        scale = (norm.running_var.to(torch.float64) + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.to(torch.float64)
        shift = norm.bias.to(torch.float64) if norm.bias is not None else torch.zeros_like(scale)
        bias = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros_like(scale)
        new_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_bias = (bias - norm.running_mean.to(torch.float64)) * scale + shift
        layer.weight.copy_(new_weight.to(layer.weight))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(layer.weight))
        else:
            layer.bias.copy_(new_bias.to(layer.bias))
