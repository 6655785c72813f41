"""The one context manager for "evaluate this model without changing it": eval mode, and every
parametrization that could move (spectral-norm power iteration) frozen; both restored after."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def model_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run an attack with the model in eval mode and every `frozen` flag set, then restore both.

    Eval mode keeps batch-norm statistics and dropout out of the attack. Spectral-norm
    parametrizations expose a bool `frozen`: their power iteration must not advance while an attack
    is generated, or the attack would change the weights it is attacking.
    """
    training = {module: module.training for module in model.modules()}
    frozen = {module: module.frozen for module in model.modules() if isinstance(getattr(module, "frozen", None), bool)}
    model.eval()
    for module in frozen:
        module.frozen = True
    try:
        yield model
    finally:
        for module, mode in training.items():
            module.training = mode
        for module, flag in frozen.items():
            module.frozen = flag
