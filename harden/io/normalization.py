"""The input normalization (x - mean) / std a model expects: taken once, recorded, never changed.

A model trained on normalized inputs must see the same map in every later step, or fine-tuning
silently retrains it on raw pixels. The first command that reads the user's model takes
--mean/--std (convert; finetune, prune or export when they come first) and the bundle's
`harden.data` records it. From then on every step applies the recorded map: training and its
evaluations put it in front of the module (harden.training.loop.training_module), export writes it
into the ONNX metadata, and certify puts it in front of the graph, so eps stays in pixel units.
A later --mean/--std that disagrees with the record is refused, never applied on top.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from certify.common.errors import UserError

if TYPE_CHECKING:  # the command line imports this module at start-up: torch only when a model is read
    from harden.io.bundle import Bundle


def recorded_normalization(bundle: Bundle) -> tuple[list[float] | None, list[float] | None]:
    return bundle.data.get("mean"), bundle.data.get("std")


def take_normalization(bundle: Bundle, mean: list[float] | None, std: list[float] | None) -> None:
    """Record --mean/--std in `bundle` (checked against its input channels), or refuse them in one
    line when the bundle already fixes another normalization: a recorded one, or none at all for a
    model that harden has trained on raw pixels."""
    from certify.specs.input_spec import check_normalization

    check_normalization(mean, std, tuple(bundle.input_shape))
    if mean is None and std is None:
        return
    channels = int(bundle.input_shape[0]) if len(bundle.input_shape) >= 3 else 1
    old_mean, old_std = recorded_normalization(bundle)
    given = _per_channel(mean, std, channels)
    if old_mean is not None or old_std is not None:
        if not _same(given, _per_channel(old_mean, old_std, channels)):
            raise UserError(f"{describe(mean, std)} disagrees with the normalization the model records "
                            f"({describe(old_mean, old_std)})",
                            "leave out --mean/--std: every step applies the recorded one (to change it, start "
                            "again from the original model)")
        return
    trained = [record.get("run") for record in bundle.history if record.get("run")]
    if trained:
        raise UserError(f"{describe(mean, std)} given for a model that harden has already trained on raw pixels "
                        f"({', '.join(trained)})",
                        "leave out --mean/--std, or give them to the first harden step on the original model")
    if mean is not None:
        bundle.data["mean"] = list(mean)
    if std is not None:
        bundle.data["std"] = list(std)


def describe(mean: list[float] | None, std: list[float] | None) -> str:
    if mean is None and std is None:
        return "no normalization"
    shown = [f"--{name} {','.join(f'{v:g}' for v in values)}" for name, values in (("mean", mean), ("std", std))
             if values is not None]
    return " ".join(shown)


def _per_channel(mean, std, channels: int) -> tuple[list[float], list[float]]:
    # One value stands for every channel, and a missing mean or std is the identity (0 or 1).
    def expand(values, default: float) -> list[float]:
        values = [default] if values is None else list(values)
        return values * channels if len(values) == 1 else values

    return expand(mean, 0.0), expand(std, 1.0)


def _same(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> bool:
    return all(len(x) == len(y) and all(math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-9) for u, v in zip(x, y))
               for x, y in zip(a, b))


def parse_normalization(mean: str | None, std: str | None) -> tuple[list[float] | None, list[float] | None]:
    """--mean/--std as given on the command line, checked for everything but the model's channels."""
    from certify.common.cli import parse_floats
    from certify.specs.input_spec import check_normalization

    means, stds = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    check_normalization(means, stds)
    return means, stds
