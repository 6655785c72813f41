"""Certify a torch module on tensors, as users of torchattacks, ART or auto_LiRPA hold their models.

`certify_module` runs the cascade of the command line (certify.verdicts) on an nn.Module and the
tensors given: the same stages, seeds, eps reuse, verdicts and margin bounds. What it cannot do
is name a file: there is no sha256 to certify and no onnxruntime to confirm counterexamples on,
so its verdicts are about the module as torch runs it. For a certificate, export the model to
ONNX and run `certify` on the file.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from certify.bounds.bounder import METHODS, MarginBounder
from certify.common.distributed import resolve_device
from certify.common.errors import UserError
from certify.onnx_import.channel_affine import affine_ops_as_convs
from certify.specs.input_spec import (InputSpec, check_norm,
                                      check_normalization, with_normalization)
from certify.verdicts.cascade import CascadeOptions
from certify.verdicts.dataset import (EpsResult, _certify_eps_batch,
                                      bisection_order)
from certify.verdicts.run_checks import check_run_options

__all__ = ["certify_module", "checked_tensors", "frozen_copy"]


def certify_module(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | Sequence[float],
                   norm: str = "inf", methods: Sequence[str] = METHODS, attack: bool = True,
                   attack_steps: int = 50, attack_restarts: int = 3, batch_size: int = 50,
                   input_range: tuple[float, float] = (0.0, 1.0), mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, seed: int = 0, device: str | None = None) -> list[EpsResult]:
    """Per-sample verdicts of `model` on the inputs `x` (N, ...) with labels `y` (N,), at every eps.

    Returns one `EpsResult` per eps, ascending: `.samples` holds a Verdict per input (verdict
    verified / falsified / unknown, the deciding method, the margin lower bound), `.summary()` the
    clean, attacked and certified accuracy. eps is in pixel units; `mean`/`std` are the
    normalization the model expects in front of it (the ball stays in pixel space). The model is
    copied, never changed. A bad argument raises certify.UserError.
    """
    eps_values = sorted({float(e) for e in ([eps] if isinstance(eps, (int, float)) else eps)})
    mean = None if mean is None else [float(v) for v in mean]
    std = None if std is None else [float(v) for v in std]
    check_run_options(eps_values, methods=tuple(methods), batch_size=batch_size, attack_steps=attack_steps,
                      attack_restarts=attack_restarts, mean=mean, std=std, device=device, seed=seed, norm=norm)
    if not eps_values:
        raise UserError("no eps given", "give eps=0.1 or a list, eps=[0.01, 0.1]")
    spec = InputSpec(input_range=_input_range(input_range), mean=mean, std=std, norm=check_norm(norm))
    if not isinstance(model, nn.Module):
        raise UserError(f"model is a {type(model).__name__}, not a torch.nn.Module",
                        "pass the module; for an ONNX file use certify.certify_model")
    x, y = checked_tensors(x, y, spec.input_range)
    input_shape = tuple(x.shape[1:])
    for value in eps_values:
        spec.check_eps(value, input_shape=input_shape)
    check_normalization(mean, std, input_shape)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    # The same module the command line bounds: the normalization in front, constant affine ops as convs.
    normalized = with_normalization(frozen_copy(model), spec, input_shape)
    _check_outputs(normalized, x, y)
    module = affine_ops_as_convs(normalized, input_shape)
    bounder = MarginBounder(module.to(dev), input_shape, device=dev)
    options = CascadeOptions(methods=tuple(methods), attack=attack, attack_steps=attack_steps,
                             attack_restarts=attack_restarts, seed=seed)
    results = [EpsResult(value) for value in eps_values]
    order = bisection_order(eps_values)
    for batch_number, start in enumerate(range(0, len(y), batch_size)):
        stop = min(start + batch_size, len(y))
        _certify_eps_batch(bounder.module, bounder, spec, x[start:stop], y[start:stop], list(range(start, stop)),
                           eps_values, order, options, results, batch_number)
    return results


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy in which every parametrized weight (spectral norm, pruning masks, torch's
    weight_norm) is a plain tensor of its current value: what the model computes, without the
    parametrization's own code (a power iteration, say), which auto_LiRPA cannot bound.

    torch's remove_parametrizations would delete the weight's property from the class that a deep
    copy shares with the original, breaking the user's model; here only the copy changes."""
    copied = copy.deepcopy(model).eval()
    for layer in list(copied.modules()):
        if not parametrize.is_parametrized(layer):
            continue
        with torch.no_grad():
            values = {name: getattr(layer, name).detach().clone() for name in layer.parametrizations}
        del layer._modules["parametrizations"]
        layer.__class__ = layer.__class__.__bases__[0]  # the class it had before it was parametrized
        for name, value in values.items():
            layer.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return copied


def _input_range(input_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise UserError(f"input_range {input_range!r} is not two numbers", "give (low, high), e.g. (0.0, 1.0)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(f"input_range ({low:g}, {high:g}) is not an interval", "give low < high, e.g. (0.0, 1.0)")
    return low, high


def checked_tensors(x, y, input_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 (N, ...) on the CPU inside the input range, y as int64 (N,): a UserError for anything else."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError("x and y must be torch tensors", "e.g. torch.from_numpy(images), torch.tensor(labels)")
    if not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"x has shape {tuple(x.shape)} and dtype {x.dtype}",
                        "give float inputs of shape (N, ...), N >= 1, e.g. (N, 1, 28, 28)")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UserError(f"y has shape {tuple(y.shape)} and dtype {y.dtype} for {x.shape[0]} inputs",
                        "give one integer class index per input")
    x, y = x.detach().float().cpu(), y.detach().long().cpu()
    low, high = input_range
    if not torch.isfinite(x).all() or x.min() < low or x.max() > high:
        raise UserError(f"x has values outside the input range [{low:g}, {high:g}]",
                        "give inputs in pixel units inside input_range (the model's normalization goes in mean/std)")
    if y.min() < 0:
        raise UserError(f"y holds a negative label ({int(y.min())})", "labels are class indices 0, 1, 2, ...")
    return x, y


def _check_outputs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The module runs on x and returns one logit per class, for at least every label in y."""
    try:
        with torch.no_grad():
            logits = module(x[:2])
    except Exception as error:  # noqa: BLE001 -- whatever the user's forward raises, said in one line
        raise UserError(f"the model does not run on inputs of shape {tuple(x.shape[1:])} "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})",
                        "give x in the shape the model takes, (N, ...)") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
        shown = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"the model returns {shown}, not (batch, classes)",
                        "give a classifier that returns one logit per class")
    if int(y.max()) >= logits.shape[1]:
        raise UserError(f"y holds label {int(y.max())}, the model has {logits.shape[1]} outputs",
                        "give labels 0 .. classes-1")
