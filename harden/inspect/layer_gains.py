"""The per-layer half of `harden inspect`: one forward pass with hooks finds the layers and their
input sizes; each layer's norms, or its Lipschitz gain when it has no weight."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from certify.bounds.lipschitz_ops import pool_overlap
from certify.common.errors import UserError
from harden.layers.norms import (ConvOperator, conv_operator_matrix, effective_weight, l1_norm, linf_norm,
                          operator_spectral_norm, sparsity)
from harden.pruning.prune import kappa, live_kappa
from harden.layers.wca import WCANoise, noise_disabled

EXACT_LIMIT = 8_000_000  # matrix entries (64 MB in float64) up to which a stalled sigma is computed exactly

# Activations whose Lipschitz constant is at most 1 in every norm (element-wise, slope in [0, 1]).
_ONE_LIPSCHITZ = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Softplus,
                  nn.CELU, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink)
# Maps that change no distance at all.
_ISOMETRIES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
# Element-wise activations with a slope above 1 somewhere: their largest slope.
_STEEP = {nn.GELU: 1.1289, nn.SiLU: 1.0999, nn.Mish: 1.0885}




@dataclass
class _Call:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]



# -- the forward trace ---------------------------------------------------------------------------

def _parametrization_modules(module: nn.Module) -> set[nn.Module]:
    return {m for layer in module.modules() if parametrize.is_parametrized(layer)
            for m in layer.parametrizations.modules()}


def _is_leaf(module: nn.Module) -> bool:
    """A module that computes something itself: no children other than its parametrizations."""
    return all(child == "parametrizations" for child, _ in module.named_children())


def _leaf_modules(module: nn.Module) -> dict[nn.Module, str]:
    skip = _parametrization_modules(module)
    return {m: name for name, m in module.named_modules() if m not in skip and _is_leaf(m)}


def _trace(module: nn.Module, input_shape: tuple[int, ...]) -> list[_Call]:
    leaves = _leaf_modules(module)
    calls: list[_Call] = []

    def record(layer: nn.Module, args: tuple, output) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.append(_Call(leaves[layer] or "(model)", layer, tuple(args[0].shape[1:]), tuple(output.shape[1:])))

    handles = [layer.register_forward_hook(record) for layer in leaves]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    reference = next(iter(module.parameters()), torch.zeros(()))
    try:
        with torch.no_grad(), noise_disabled(module):
            module(torch.zeros((1, *input_shape), dtype=reference.dtype, device=reference.device))
    except (RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"the model does not run on an input of shape {tuple(input_shape)}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
                        "give the per-sample input shape with --input-shape C,H,W") from None
    finally:
        for handle in handles:
            handle.remove()
        for layer, mode in modes.items():
            layer.training = mode
    return calls


# -- per layer -------------------------------------------------------------------------------------

def _weight_layer(layer: nn.Module, input_shape: tuple[int, ...], max_iters: int, tol: float) -> dict:
    input_hw = tuple(input_shape[-2:]) if isinstance(layer, nn.Conv2d) else None
    sigma, steps = operator_spectral_norm(layer, input_hw, iters=max_iters, tol=tol)
    spectral = {"value": sigma, "iterations": steps, "converged": steps < max_iters,
                "method": f"power iteration (float64) to relative {tol:g}"}
    if not spectral["converged"]:
        exact = _exact_spectral_norm(layer, input_hw)
        if exact is not None:
            spectral.update({"value": exact, "power_iteration_value": sigma,
                             "method": f"explicit matrix (power iteration short of {tol:g} after {steps} steps)"})
            sigma = exact
    try:
        l1, linf, exact_note = l1_norm(layer, input_hw), linf_norm(layer, input_hw), None
    except UserError as error:  # e.g. reflect padding: no exact tap-sum formula
        l1 = linf = None
        exact_note = error.what
    weight = effective_weight(layer)
    # A pruned layer is often singular by its zero pattern (a unit whose weights are all pruned):
    # kappa is inf there, not LAPACK's round-off ratio; the live part (zero rows/columns dropped)
    # is what the layer still computes.
    condition = kappa(weight)
    row = {
        "weight_shape": list(weight.shape),
        "spectral_norm": spectral,
        "l1_norm": l1, "linf_norm": linf,
        "condition_number": None if math.isinf(condition) else condition,  # None: rank-deficient
        "live_condition_number": _finite_or_none(live_kappa(weight)) if bool((weight == 0).any()) else None,
        "sparsity": sparsity(weight),
        "sn_beta": _spectral_norm_beta(layer),
        "l2_gain": sigma, "linf_gain": linf,
        "basis": "operator norm on the layer's input size",
    }
    if exact_note:
        row["note"] = exact_note
    return row


def _finite_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


def _exact_spectral_norm(layer: nn.Module, input_hw: tuple[int, int] | None) -> float | None:
    """The largest singular value of the layer's explicit matrix, when that matrix is small enough
    (close top singular values can stall the power iteration for thousands of steps)."""
    if isinstance(layer, nn.Conv2d):
        op = ConvOperator.of(layer, input_hw)
        entries = layer.in_channels * input_hw[0] * input_hw[1] * layer.out_channels * op.output_hw[0] * op.output_hw[1]
        if entries > EXACT_LIMIT:
            return None
        matrix = conv_operator_matrix(layer, input_hw)
    else:
        matrix = effective_weight(layer).to(torch.float64)
        if matrix.numel() > EXACT_LIMIT:
            return None
    # sigma_max^2 is the top eigenvalue of the smaller Gram matrix: cheaper than an SVD.
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())


def _spectral_norm_beta(layer: nn.Module) -> float | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    return next((float(item.beta) for item in layer.parametrizations.weight if hasattr(item, "beta")), None)


def _other_layer_gain(call: _Call, assumptions: list[str], unbounded: list[str]) -> tuple:
    layer = call.module
    if isinstance(layer, _ISOMETRIES):
        return 1.0, 1.0, "keeps distances"
    if isinstance(layer, WCANoise):
        return 1.0, 1.0, "WCA noise, off: the identity"
    if isinstance(layer, _ONE_LIPSCHITZ):
        return 1.0, 1.0, "1-Lipschitz activation"
    if isinstance(layer, (nn.LeakyReLU, nn.ELU)):
        slope = abs(layer.negative_slope) if isinstance(layer, nn.LeakyReLU) else abs(layer.alpha)
        gain = max(1.0, slope)
        return gain, gain, "largest slope of the activation"
    for kind, slope in _STEEP.items():
        if isinstance(layer, kind):
            return slope, slope, "largest slope of the activation"
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if layer.running_var is None:
            unbounded.append(call.name)
            return None, None, "BatchNorm without running statistics is not a fixed map"
        scale = (layer.running_var.double() + layer.eps).rsqrt()
        if layer.weight is not None:
            scale = scale * layer.weight.detach().double()
        gain = float(scale.abs().max())
        return gain, gain, "largest |gamma|/sqrt(var+eps)"
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
        overlap = pool_overlap(layer, call.input_shape)
        # Each output changes by at most the largest change in its window; a pixel is in `overlap` windows.
        return math.sqrt(overlap), 1.0, f"pooling, a pixel in at most {overlap} windows"
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        overlap = _adaptive_overlap(layer, call.input_shape)
        return math.sqrt(overlap), 1.0, f"pooling, a pixel in at most {overlap} windows"
    if any(True for _ in layer.parameters(recurse=False)):
        unbounded.append(call.name)
        return None, None, f"{type(layer).__name__} with weights: not analysed"
    assumptions.append(f"'{call.name}' ({type(layer).__name__}) is assumed 1-Lipschitz")
    return 1.0, 1.0, "assumed 1-Lipschitz"


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _adaptive_overlap(layer: nn.AdaptiveAvgPool2d, input_shape: tuple[int, ...]) -> int:
    total = 1
    for n, out in zip(input_shape[-2:], _pair(layer.output_size)):
        out = n if out is None else out
        counts = [0] * n
        for i in range(out):
            for y in range((i * n) // out, -(-((i + 1) * n) // out)):
                counts[y] += 1
        total *= max(counts)
    return total


# -- the graph ---------------------------------------------------------------------------------------

