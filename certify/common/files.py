"""Output files: every file the tools write appears whole or not at all, and only where it may.

`check_output_path` is the one guard both command lines run on every output path BEFORE any work
(training can take an hour; finding a read-only folder after it is too late). `atomic_path`
writes through a temporary file in the target's folder, made durable and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from certify.common.errors import UserError

# A temporary output is named .<target>.<pid>.<random>.partial; the pid tells whether the process
# that wrote it is still alive, so a killed run's leftovers can be removed by the next run.
_PARTIAL = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.partial$")
_STALE_UNKNOWN_OWNER_S = 3600.0  # partials of the older naming (no pid): stale after an hour


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *,
                      option: str = "-o", suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuse an output that would overwrite an input, is a folder, or cannot be written."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        wanted = " or ".join(suffixes)
        raise UserError(f"{option} {path}: this output is written as {wanted}, not {path.suffix or 'a file without suffix'}",
                        f"use {option} {path.with_suffix(suffixes[0])}")
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise UserError(f"{option} {path} is also an input of this command and would be overwritten",
                            f"choose another {option}")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder", f"give a file name, e.g. {option} {path / 'out'}{suffixes[0] if suffixes else ''}")
    folder = _nearest_existing_folder(path.parent)
    if folder is None:
        raise UserError(f"{option} {path}: its folder cannot be created (a file stands in the way)",
                        "choose an output in an existing folder")
    _probe_writable(folder, path, option)
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _nearest_existing_folder(folder: Path) -> Path | None:
    while not folder.exists():
        if folder.parent == folder:
            return None
        folder = folder.parent
    return folder if folder.is_dir() else None


def _probe_writable(folder: Path, path: Path, option: str) -> None:
    # os.access says yes to root on a read-only folder; creating a file is the real test.
    try:
        fd, probe = tempfile.mkstemp(prefix=".harden-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} {path} cannot be written ({exc.strerror or type(exc).__name__} in {folder})",
                        "choose a writable folder") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `target` on success.

    On any exception the temporary file is removed and `target` is left untouched, so an
    interrupted or failed run never leaves a half-written model or report behind. The file is
    flushed to disk before the rename, so a crash right after it cannot leave an empty target.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise UserError(f"cannot write {target} ({exc.strerror or type(exc).__name__})",
                        "choose a writable folder") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600), and a writer may replace it with a new private
        # file (safetensors does): give the finished output the usual permissions, after writing.
        _usual_permissions(tmp_path)
        _fsync(tmp_path)
        os.replace(tmp_path, target)
        _fsync_folder(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _usual_permissions(path: Path) -> None:
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def remove_stale_partials(target: Path) -> None:
    """Remove temporary files of `target` left by runs that were killed (their process is gone)."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(f".{target.name}.") and name.endswith(".partial")):
            continue
        match = _PARTIAL.match(name)
        try:
            if match and match["target"] == target.name:
                if not _process_alive(int(match["pid"])):
                    entry.unlink()
            elif time.time() - entry.stat().st_mtime > _STALE_UNKNOWN_OWNER_S:
                entry.unlink()
        except OSError:
            pass  # another run removed it first, or it is not ours to remove


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders; the rename itself is still atomic
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
