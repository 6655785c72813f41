"""The Dataset every loader returns, the dataset names and splits, and where downloads are kept."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from certify.common.errors import UserError

KNOWN_DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Dataset:
    name: str  # "mnist", "fashion-mnist", or the file/folder path given
    x: torch.Tensor  # float32, (N, C, H, W), pixel values in [0, 1]
    y: torch.Tensor  # int64, (N,)
    classes: list[str]  # class names, index = label
    source: str  # where the data came from, for logs and reports
    # False when the class list was only inferred from the largest label (an .npz without names):
    # the data may then have fewer classes than the model it is certified on.
    classes_known: bool = True

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, limit: int | None) -> "Dataset":
        """The first `limit` samples (all of them for None)."""
        if limit is None:
            return self
        if limit < 0:
            raise UserError(f"sample limit {limit} is negative", "give a limit of 0 or more")
        return dataclasses.replace(self, x=self.x[:limit], y=self.y[:limit])


def data_root() -> Path:
    """Where downloaded datasets are kept: $HARDEN_DATA if set, else ~/.cache/harden."""
    configured = os.environ.get("HARDEN_DATA")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "harden"
