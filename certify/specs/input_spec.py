"""What is being certified: the eps ball, the input range and the input normalization.

Everything is stated in PIXEL space ([0, 1] by default), as users think of eps. When the model
expects normalized inputs, `with_normalization` puts the (x - mean) / std in front of the model, so
the box in pixel space is mapped exactly (auto_LiRPA bounds through the affine map). The same
holds for an l2 ball (`norm` "2"): it stays a ball in pixel space, whatever the per-channel stds,
because the normalization is part of the bounded graph (in model space it would be an ellipsoid).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from certify.common.errors import UserError
from certify.onnx_import.metadata import parse_harden_data
from certify.specs.rounding import eps_ball


@dataclass
class InputSpec:
    input_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float] | None = None
    std: list[float] | None = None
    norm: str = "inf"
    classes: list[str] = field(default_factory=list)
    dataset: str | None = None

    def largest_eps(self, input_shape: tuple[int, ...] = ()) -> float:
        """The radius of a ball that covers the whole input range (l2: its diagonal over the input)."""
        width = self.input_range[1] - self.input_range[0]
        return width if self.norm == "inf" else width * math.sqrt(math.prod(input_shape))

    def check_eps(self, eps: float, option: str = "eps", input_shape: tuple[int, ...] = ()) -> None:
        high = self.largest_eps(input_shape)
        what = "the width of the input range" if self.norm == "inf" else "the l2 diameter of the input range"
        if not (eps > 0 and eps <= high) or eps != eps:
            raise UserError(f"{option} {eps} is out of range",
                            f"give 0 < {option.lstrip('-')} <= {high:g} ({what}, in pixel units)")

    def box(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The l-infinity ball of radius eps around x, clipped to the valid input range, rounded
        outward to x's dtype: it contains every real point within eps, so what is proved on it holds
        for the eps that is claimed."""
        low, high = self.input_range
        return eps_ball(x, eps, low, high)

    def to_json(self) -> dict:
        return asdict(self)


NORMS = ("inf", "2")


def check_norm(norm: str) -> str:
    """The ball's norm as the spec records it ("inf" or "2"); a UserError for any other."""
    norm = str(norm)
    if norm not in NORMS:
        raise UserError(f"unknown --norm {norm!r}", "use inf (l-infinity boxes) or 2 (l2 balls)")
    return norm


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a traceable module for auto_LiRPA."""

    def __init__(self, mean: list[float], std: list[float], channels_dim: int):
        super().__init__()
        shape = [1, -1] + [1] * (channels_dim - 2)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x):
        return (x - self.mean) / self.std


def check_normalization(mean: list[float] | None, std: list[float] | None,
                        input_shape: tuple[int, ...] | None = None, *, source: str = "--mean/--std") -> None:
    """The input normalization (x - mean) / std, as harden records it and certify applies it: finite
    means, finite positive stds, and one value (broadcast to every channel) or one per input channel.
    Without `input_shape` the channel count is not known, so only two lists that cannot both fit one
    model (two lengths, neither of them 1) are refused. A UserError naming `source` otherwise."""
    given = {name: values for name, values in (("mean", mean), ("std", std)) if values is not None}
    labels = {name: f"--{name}" if source == "--mean/--std" else f"{source} {name}" for name in given}
    for name, values in given.items():
        label = labels[name]
        example = "0.1307" if name == "mean" else "0.3081"
        if len(values) == 0:
            raise UserError(f"{label} gives no values", f"give one value, or one per channel, e.g. --{name} {example}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise UserError(f"{label} {_numbers(values)} has a value that is not a finite number",
                            f"give finite numbers, e.g. --{name} {example}")
        if name == "std" and any(v <= 0 for v in values):
            raise UserError(f"{label} {_numbers(values)} has a value <= 0 (the inputs would be divided by it)",
                            "give positive standard deviations, e.g. --std 0.3081")
    if input_shape is not None:
        channels = int(input_shape[0]) if len(input_shape) >= 3 else 1
        for name, values in given.items():
            if len(values) not in (1, channels):
                raise UserError(f"{labels[name]} {_numbers(values)} gives {len(values)} values, the model's input has "
                                f"{channels} channel(s) (input shape {list(input_shape)})",
                                f"give one value per channel ({channels}), or one value for all of them")
    elif mean is not None and std is not None and 1 not in (len(mean), len(std)) and len(mean) != len(std):
        raise UserError(f"{source} gives {len(mean)} means but {len(std)} standard deviations",
                        "give one value per channel for both, or one value for all channels")


def _numbers(values: list[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def with_normalization(module: nn.Module, spec: InputSpec, input_shape: tuple[int, ...]) -> nn.Module:
    if spec.mean is None and spec.std is None:
        return module
    check_normalization(spec.mean, spec.std, input_shape)
    mean = spec.mean if spec.mean is not None else [0.0]
    std = spec.std if spec.std is not None else [1.0]
    return nn.Sequential(Normalize(mean, std, len(input_shape) + 1), module).eval()


def spec_from_metadata(metadata: dict[str, str]) -> InputSpec | None:
    """The spec `harden export` recorded in the ONNX metadata, or None for a third-party file."""
    raw = metadata.get("harden.data")
    if not raw:
        return None
    data = parse_harden_data(raw)
    return InputSpec(input_range=tuple(float(v) for v in data.get("input_range", (0.0, 1.0))),
                     mean=data.get("mean"), std=data.get("std"), classes=list(data.get("classes", [])),
                     dataset=data.get("dataset"))
