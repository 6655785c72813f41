"""Random conv layer configurations shared by the norm and spectral-norm tests."""

from __future__ import annotations

import random


def conv_configs(count: int = 36, seed: int = 0) -> list[tuple[dict, tuple[int, int]]]:
    """Random small conv layers (kwargs, input H x W): non-square kernels, strides, paddings and
    inputs, dilation, groups; small channel counts keep the explicit matrix small."""
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        groups = rng.choice([1, 2])
        kernel = (rng.randint(1, 7), rng.randint(1, 7))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        padding = (rng.randint(0, 3), rng.randint(0, 3))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        hw = (rng.randint(3, 11), rng.randint(3, 11))
        if any(n + 2 * p - d * (k - 1) - 1 < 0 for n, p, d, k in zip(hw, padding, dilation, kernel)):
            continue
        configs.append((dict(in_channels=groups * rng.randint(1, 2), out_channels=groups * rng.randint(1, 2),
                             kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                             groups=groups), hw))
    return configs
