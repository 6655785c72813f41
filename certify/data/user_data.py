"""The user's own data: an .npz file with arrays x and y, or a folder of class subfolders of images."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from certify.common.errors import UserError
from certify.data.base import IMAGE_SUFFIXES, Dataset

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
