"""The checks and loading steps harden's commands share: input shapes, dataset names, the output
and checkpoint paths, the model file, and the training data of finetune and prune. Each runs before
any work, so that a bad option is one line and nothing is written."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from certify.common.errors import UserError
from certify.common.files import check_output_path

BUNDLE = (".safetensors",)


def refuse_existing_default(path: Path) -> None:
    """A default output name (no -o given) never replaces a file silently: an explicit -o does."""
    if path.exists():
        raise UserError(f"{path} exists already (the default output name)", f"pass -o {path} to overwrite it")


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--input-shape '{text}' is not a comma-separated list of integers", "e.g. --input-shape 1,28,28") from None
    if not shape or any(d <= 0 for d in shape):
        raise UserError(f"--input-shape '{text}' has a non-positive size", "e.g. --input-shape 1,28,28")
    return shape


def load(model: Path, arch, trust_pickle: bool, trust_code: bool, input_shape: Optional[tuple[int, ...]]):
    from harden.io.loading import load_model

    return load_model(model, arch=arch, trust_pickle=trust_pickle, trust_code=trust_code, input_shape=input_shape)


def check_data_name(name: Optional[str]) -> None:
    """--data names a dataset certify knows, or a .npz file / folder that exists (checked before
    anything is loaded or downloaded; reading it comes later)."""
    from certify.data.datasets import KNOWN_DATASETS

    if name is None:
        return
    path = Path(name).expanduser()
    if name.lower() in KNOWN_DATASETS or path.is_dir() or (path.is_file() and path.suffix.lower() == ".npz"):
        return
    what = "not a .npz file or a folder" if path.exists() else "not a known name, and no such file or folder"
    raise UserError(f"unknown dataset {name!r} ({what})",
                    f"use one of {', '.join(KNOWN_DATASETS)}, a .npz file with arrays x and y, or a folder of class folders")


def data_inputs(data: Optional[str]) -> list[Path]:
    """A --data that is a file: an input no output may overwrite."""
    return [Path(data)] if data is not None and Path(data).is_file() else []


def check_checkpoints(output: Path, checkpoint_dir: Optional[Path], epochs: int, inputs: list[Path]) -> None:
    """finetune's checkpoint files, checked like every output before any work: OUT.ckpt.safetensors
    next to -o, or --checkpoint-dir/epoch-NNNN.ckpt.safetensors for each epoch."""
    from harden.training.finetune import default_checkpoint, epoch_checkpoint

    if checkpoint_dir is None:
        try:
            check_output_path(default_checkpoint(output), inputs, option="checkpoint", suffixes=BUNDLE)
        except UserError as error:
            raise UserError(f"{error.what} (the checkpoint of -o {output})",
                            "choose another -o, or give --checkpoint-dir") from None
        return
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"--checkpoint-dir {checkpoint_dir} is a file, not a folder",
                        "give a folder (it is created when missing)")
    for epoch in range(1, epochs + 1):
        path = epoch_checkpoint(checkpoint_dir, epoch)
        if epoch == 1:
            check_output_path(path, inputs, option="--checkpoint-dir", suffixes=BUNDLE)
        elif any(source.exists() and path.exists() and path.samefile(source) for source in inputs):
            raise UserError(f"--checkpoint-dir {checkpoint_dir}: {path.name} is also an input of this command",
                            "choose another --checkpoint-dir")


def training_data(bundle, data: str | None, limit: int | None, log):
    """The train and test splits for fine-tuning or pruning `bundle` (its own dataset unless --data),
    checked against the model before anything is printed; records the dataset in the bundle's
    metadata when it has none."""
    from certify.data.datasets import load_dataset
    from harden.training.finetune import check_data

    dataset = data or bundle.data.get("dataset")
    if dataset is None:
        raise UserError("the model records no dataset", "give --data mnist|fashion-mnist|file.npz|folder")
    messages: list[str] = []
    train_set = load_dataset(dataset, split="train", log=messages.append).subset(limit)
    test_set = load_dataset(dataset, split="test", log=messages.append)
    check_data(bundle, train_set, test_set)
    if log is not None:
        for message in messages:
            log(message)
    bundle.data.setdefault("dataset", dataset)
    bundle.data.setdefault("classes", train_set.classes)
    bundle.data.setdefault("input_range", [0.0, 1.0])
    return train_set, test_set


def training_splits(data: str, log):
    """train's two splits of --data, checked against each other (classes, image size) before training."""
    from certify.data.datasets import load_dataset

    messages: list[str] = []
    train_set = load_dataset(data, split="train", log=messages.append)
    test_set = load_dataset(data, split="test", log=messages.append)
    if len(train_set.classes) < 2:
        raise UserError(f"the data {data} has {len(train_set.classes)} class(es)",
                        "a classifier needs at least 2 classes")
    if tuple(test_set.x.shape[1:]) != tuple(train_set.x.shape[1:]):
        raise UserError(f"the test images have shape {tuple(test_set.x.shape[1:])}, the training images "
                        f"{tuple(train_set.x.shape[1:])}", "give a dataset whose splits have one image size")
    if len(test_set) and int(test_set.y.max()) >= len(train_set.classes):
        raise UserError(f"the test data has label {int(test_set.y.max())}, the training data "
                        f"{len(train_set.classes)} classes", "give a dataset whose splits have the same classes")
    for message in messages:
        log(message)
    return train_set, test_set
