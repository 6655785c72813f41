"""CIFAR-10 from a copy the user has: the binary or the python batches, as the official archives hold them.

The archives (cifar-10-binary.tar.gz, cifar-10-python.tar.gz) unpack to `cifar-10-batches-bin/`
(`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`: records of one label byte and 3072
pixel bytes, red then green then blue plane, rows top to bottom) and `cifar-10-batches-py/` (the
same batches without a suffix, each a pickled dict with `data`, a uint8 array (N, 3072), and
`labels`, a list of ints). Either folder, its parent, or a folder holding the archive itself is
read in place; `--data cifar10` looks in `data_root()/cifar10`.

A python batch is a pickle, and a pickle can name any callable to run while it loads. The batches
are read with an unpickler that resolves only the three globals a numpy array is rebuilt from
(`_reconstruct`, `ndarray`, `dtype`) and refuses every other one before anything is called.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from certify.common.errors import UserError
from certify.data.base import Dataset, data_root

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_BATCHES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}
BINARY_FOLDER, PYTHON_FOLDER = "cifar-10-batches-bin", "cifar-10-batches-py"
ARCHIVES = {"cifar-10-binary.tar.gz": BINARY_FOLDER, "cifar-10-python.tar.gz": PYTHON_FOLDER}
_SIDE, _CHANNELS = 32, 3
_PIXELS = _CHANNELS * _SIDE * _SIDE
_RECORD = 1 + _PIXELS
_WHERE = "https://www.cs.toronto.edu/~kriz/cifar.html"

# Where a numpy array's pickle finds its rebuilding functions: numpy 1 (and Python 2, which wrote
# the official batches) calls the module numpy.core, numpy 2 numpy._core.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Plain containers, strings, numbers and numpy arrays; any other global is refused unresolved."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds") from None


def is_cifar_folder(folder: Path) -> bool:
    """Whether `folder` holds a CIFAR-10 copy in one of the official layouts (or their archives)."""
    return _find_copy(folder) is not None


def load_cifar10(split: str, folder: Path | None = None) -> Dataset:
    """The `split` of CIFAR-10 from `folder` (default `data_root()/cifar10`): float32 (N, 3, 32, 32) in [0, 1]."""
    root = data_root() / "cifar10" if folder is None else Path(folder)
    found = _find_copy(root)
    if found is None:
        archives = " or ".join(ARCHIVES)
        raise UserError(f"no CIFAR-10 copy in {root} (looked for {BINARY_FOLDER}/, {PYTHON_FOLDER}/ and {archives})",
                        f"download {archives} from {_WHERE} and put it, or the folder it unpacks to, into {root} "
                        "(or set $HARDEN_DATA, or give --data the folder)")
    layout, read_member, where = found
    parts = [_read_batch(layout, read_member, name, where) for name in SPLIT_BATCHES[split]]
    pixels = np.concatenate([p for p, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    x = torch.from_numpy(pixels.reshape(-1, _CHANNELS, _SIDE, _SIDE).astype(np.float32)).div_(255.0)
    source = f"CIFAR-10 {'binary' if layout == BINARY_FOLDER else 'python'} batches in {where}"
    # A folder given by the user keeps its path as the name, so that a report names where to re-read it.
    name = "cifar10" if folder is None else str(folder)
    return Dataset(name, x, torch.from_numpy(labels.astype(np.int64)), list(CIFAR10_CLASSES), source)


def _batch_file(layout: str, name: str) -> str:
    return f"{name}.bin" if layout == BINARY_FOLDER else name


def _find_copy(root: Path) -> tuple[str, Callable[[str], bytes], str] | None:
    """(layout, a reader of the layout's files by name, where they are) for the first copy found:
    the batches in `root` itself, in its layout subfolders, or in an archive in `root`."""
    try:
        if not root.is_dir():
            return None
        for folder in (root, root / BINARY_FOLDER, root / PYTHON_FOLDER):
            for layout in (BINARY_FOLDER, PYTHON_FOLDER):
                if (folder / _batch_file(layout, "test_batch")).is_file() or \
                        (folder / _batch_file(layout, "data_batch_1")).is_file():
                    return layout, _folder_reader(folder), str(folder)
        for archive, layout in ARCHIVES.items():
            if (root / archive).is_file():
                return layout, _archive_reader(root / archive, layout), str(root / archive)
    except OSError:  # an unreadable folder holds no copy we could use
        return None
    return None


def _folder_reader(folder: Path) -> Callable[[str], bytes]:
    return lambda name: (folder / name).read_bytes()


def _archive_reader(archive: Path, layout: str) -> Callable[[str], bytes]:
    """Files of the archive's layout folder, read from the archive by exact name (nothing unpacked)."""
    members: dict[str, bytes] = {}

    def read(name: str) -> bytes:
        if not members:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    if member.isfile() and member.name.removeprefix("./").startswith(f"{layout}/"):
                        handle = tar.extractfile(member)
                        if handle is not None:
                            members[member.name.removeprefix("./").split("/", 1)[1]] = handle.read()
        if name not in members:
            raise FileNotFoundError(f"{archive.name} holds no {layout}/{name}")
        return members[name]

    return read


def _read_batch(layout: str, read_member: Callable[[str], bytes], name: str, where: str):
    """(uint8 pixels (N, 3072), uint8 labels (N,)) of one batch, checked; a one-line UserError otherwise."""
    file_name = _batch_file(layout, name)
    fix = f"replace it with the file from the official archive ({_WHERE})"
    try:
        raw = read_member(file_name)
    except (OSError, tarfile.TarError, EOFError) as error:
        raise UserError(f"cannot read CIFAR-10 {file_name} in {where} ({error})",
                        f"put every batch of the official archive there ({_WHERE})") from None
    what = f"CIFAR-10 batch {Path(where) / file_name}"
    if layout == BINARY_FOLDER:
        pixels, labels = _binary_batch(raw, what, fix)
    else:
        pixels, labels = _python_batch(raw, what, fix)
    if len(labels) == 0:
        raise UserError(f"{what} holds no images", fix)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise UserError(f"{what} has label {int(labels.max())}, CIFAR-10 has labels 0..9", fix)
    return pixels, labels


def _binary_batch(raw: bytes, what: str, fix: str):
    if len(raw) % _RECORD:
        raise UserError(f"{what} is {len(raw)} bytes, not a whole number of {_RECORD}-byte records", fix)
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _RECORD)
    return records[:, 1:], records[:, 0]


def _python_batch(raw: bytes, what: str, fix: str):
    try:
        # encoding="bytes": the official batches were pickled by Python 2, whose str is bytes here.
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise UserError(f"refused to read {what}: {error}", f"{fix}; a batch that names other code may be "
                        "malicious, so it was not loaded") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError) as error:
        raise UserError(f"cannot read {what} ({type(error).__name__}: {str(error)[:200]})", fix) from None
    if not isinstance(batch, dict):
        raise UserError(f"{what} holds a {type(batch).__name__}, not the dict of a CIFAR batch", fix)
    entries = {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = entries.get("data"), entries.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        shown = f"shape {data.shape}, {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{what}: 'data' is not a uint8 array of shape (N, {_PIXELS}) ({shown})", fix)
    if not isinstance(labels, list) or len(labels) != len(data) or \
            not all(type(label) is int and 0 <= label < len(CIFAR10_CLASSES) for label in labels):
        raise UserError(f"{what}: 'labels' is not a list of {len(data)} class indices 0..9", fix)
    return data, np.asarray(labels, dtype=np.int64)
