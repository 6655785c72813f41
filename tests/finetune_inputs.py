"""The files a `harden finetune` command-line test reads, shared by the test modules that run it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harden.io.bundle_file import save_bundle


def write_finetune_inputs(bundle, dataset, folder: Path, count: int) -> Path:
    """`folder`/model.safetensors (the bundle) and `folder`/small.npz (the first `count` images of
    `dataset` as uint8 pixels with their labels, the npz layout `--data` reads); returns `folder`."""
    save_bundle(bundle, folder / "model.safetensors")
    data = dataset.subset(count)
    np.savez(folder / "small.npz", x=(data.x.numpy()[:, 0] * 255).round().astype(np.uint8), y=data.y.numpy())
    return folder
