"""What is being certified: the eps ball, the input range and the input normalization.

Everything is stated in PIXEL space ([0, 1] by default), as users think of eps. When the model
expects normalized inputs, `with_normalization` puts the (x - mean) / std in front of the model, so
the box in pixel space is mapped exactly (auto_LiRPA bounds through the affine map).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from certify.errors import UserError


@dataclass
class InputSpec:
    input_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float] | None = None
    std: list[float] | None = None
    norm: str = "inf"
    classes: list[str] = field(default_factory=list)
    dataset: str | None = None

    def check_eps(self, eps: float) -> None:
        low, high = self.input_range
        if not (eps > 0 and eps <= high - low) or eps != eps:
            raise UserError(f"eps {eps} is out of range",
                            f"give 0 < eps <= {high - low:g} (the width of the input range, in pixel units)")

    def box(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The l-infinity ball of radius eps around x, clipped to the valid input range."""
        low, high = self.input_range
        return (x - eps).clamp(low, high), (x + eps).clamp(low, high)

    def to_json(self) -> dict:
        return asdict(self)


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a traceable module for auto_LiRPA."""

    def __init__(self, mean: list[float], std: list[float], channels_dim: int):
        super().__init__()
        shape = [1, -1] + [1] * (channels_dim - 2)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x):
        return (x - self.mean) / self.std


def with_normalization(module: nn.Module, spec: InputSpec, input_shape: tuple[int, ...]) -> nn.Module:
    if spec.mean is None and spec.std is None:
        return module
    mean = spec.mean if spec.mean is not None else [0.0]
    std = spec.std if spec.std is not None else [1.0]
    if any(s <= 0 for s in std):
        raise UserError(f"--std {std} has a value <= 0", "give positive standard deviations")
    channels = input_shape[0] if len(input_shape) >= 3 else 1
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise UserError(f"--mean/--std give {len(mean)}/{len(std)} values for {channels} input channels",
                        "give one value, or one per channel")
    return nn.Sequential(Normalize(mean, std, len(input_shape) + 1), module).eval()


def spec_from_metadata(metadata: dict[str, str]) -> InputSpec | None:
    """The spec `harden export` recorded in the ONNX metadata, or None for a third-party file."""
    raw = metadata.get("harden.data")
    if not raw:
        return None
    data = json.loads(raw)
    return InputSpec(input_range=tuple(data.get("input_range", (0.0, 1.0))), mean=data.get("mean"),
                     std=data.get("std"), classes=list(data.get("classes", [])), dataset=data.get("dataset"))
