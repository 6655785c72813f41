"""Built-in architectures, selectable by name (`--arch small-cnn`).

A user's own architecture is named `package.module:factory` instead (see `harden.io.loading`).
Factories take the per-sample input shape (C, H, W) and the number of classes.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def small_cnn(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """Two strided convs and two dense layers: the usual small certification benchmark CNN."""
    channels, height, width = input_shape
    flat = 32 * ((height + 3) // 4) * ((width + 3) // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def _two_conv_cnn_bn(input_shape: tuple[int, int, int], num_classes: int, widths: tuple[int, int, int]) -> nn.Sequential:
    """The small CNN's shape (two strided convs, two dense layers) at the given widths, with a
    BatchNorm after every hidden layer."""
    channels, height, width = input_shape
    first, second, dense = widths
    flat = second * ((height + 3) // 4) * ((width + 3) // 4)
    return nn.Sequential(
        nn.Conv2d(channels, first, 4, stride=2, padding=1), nn.BatchNorm2d(first), nn.ReLU(),
        nn.Conv2d(first, second, 4, stride=2, padding=1), nn.BatchNorm2d(second), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, dense), nn.BatchNorm1d(dense), nn.ReLU(),
        nn.Linear(dense, num_classes),
    )


def small_cnn_bn(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """The small CNN with a BatchNorm after every hidden layer (Shi et al.: BatchNorm keeps the ReLUs
    of IBP-trained nets balanced); each BatchNorm folds into its layer for export."""
    return _two_conv_cnn_bn(input_shape, num_classes, (16, 32, 100))


def wide_cnn_bn(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """small-cnn-bn at twice the width (32, 64 channels, 200 dense units; 663k parameters against
    167k): about 2x its step on 2 CPU cores, where medium-cnn-bn costs 10x, so an hour of MTL-IBP
    training still bought it 25 epochs (and the MNIST eps 0.3 goal, see the README)."""
    return _two_conv_cnn_bn(input_shape, num_classes, (32, 64, 200))


def medium_cnn_bn(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """The IBP papers' "medium" CNN with BatchNorm: four convs (32, 32, 64, 64 channels, two of
    them strided) and two dense layers. About twenty times the small CNN's compute."""
    channels, height, width = input_shape
    flat = 64 * ((height + 3) // 4) * ((width + 3) // 4)

    def block(inputs: int, outputs: int, kernel: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, kernel, stride=stride, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *block(channels, 32, 3, 1), *block(32, 32, 4, 2), *block(32, 64, 3, 1), *block(64, 64, 4, 2),
        nn.Flatten(),
        nn.Linear(flat, 512), nn.BatchNorm1d(512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def mlp(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """Two hidden layers of 256 ReLU units."""
    inputs = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(inputs, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def mlp_elu_512(input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """Farnia et al.'s MNIST MLP: one hidden layer of 512 ELU units."""
    inputs = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 512), nn.ELU(), nn.Linear(512, num_classes))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": small_cnn,
    "small-cnn-bn": small_cnn_bn,
    "wide-cnn-bn": wide_cnn_bn,
    "medium-cnn-bn": medium_cnn_bn,
    "mlp": mlp,
    "mlp-elu-512": mlp_elu_512,
}
