"""Which properties to check: a .vnnlib file, a folder of them, or a VNN-COMP instances.csv."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

from certify.common.errors import UserError
from certify.specs.vnnlib_sexpr import _fail, _read_text


def _natural_key(text: str) -> list:
    # "prop_2" before "prop_10": digit runs compare as numbers (split alternates str, int, str ...).
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))] + [text]


def find_properties(target: str | Path, *, skip_missing: bool = False) -> list[tuple[Path | None, Path]]:
    """The (onnx path or None, vnnlib path) pairs named by `target`.

    target: a .vnnlib file; a folder (every .vnnlib under it, recursively, in natural order, with no
    onnx); or a VNN-COMP instances.csv (rows `onnx,vnnlib[,timeout]`, paths relative to the csv's
    folder; a header row `onnx,vnnlib,...` and blank rows are skipped). A csv path that does not exist
    as written is looked for by its tail under the csv's folder (benchmarks often move the specs into
    a `vnnlib/` subfolder); a row whose file is still missing is an error, or is left out with
    `skip_missing=True`.
    """
    target = Path(target)
    try:
        exists = target.exists()
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {target} ({error})", "give a .vnnlib file, a folder of them, or an instances.csv") from None
    if not exists:
        raise UserError(f"not found: {target}", "give a .vnnlib file, a folder of them, or an instances.csv")
    if target.is_dir():
        found = sorted(target.rglob("*.vnnlib"), key=lambda p: _natural_key(p.relative_to(target).as_posix()))
        if not found:
            raise UserError(f"no .vnnlib files under {target}", "give a folder that holds .vnnlib files")
        return [(None, p) for p in found]
    if target.suffix.lower() == ".vnnlib":
        return [(None, target)]
    if target.suffix.lower() == ".csv":
        return _read_instances(target, skip_missing)
    raise UserError(f"cannot read properties from {target}", "give a .vnnlib file, a folder of them, or an instances.csv")


# The tail lookup of a csv path (see find_properties) walks the csv's folder once; a csv dropped
# into a huge tree (a home folder) must not walk it all.
_MAX_INDEXED_FILES = 200_000


def _read_instances(csv_path: Path, skip_missing: bool) -> list[tuple[Path | None, Path]]:
    return read_instances(csv_path, skip_missing=skip_missing)[0]

def read_instances(csv_path: str | Path, *, skip_missing: bool = False
                   ) -> tuple[list[tuple[Path | None, Path]], list[tuple[int, str, str]]]:
    """The pairs of `read_instance_rows` without their timeouts, and the rows left out."""
    rows, missing = read_instance_rows(csv_path, skip_missing=skip_missing)
    return [(onnx, vnnlib) for onnx, vnnlib, _ in rows], missing


def read_instance_rows(csv_path: str | Path, *, skip_missing: bool = False
                       ) -> tuple[list[tuple[Path | None, Path, float | None]], list[tuple[int, str, str]]]:
    """The (onnx or None, vnnlib) pairs of a VNN-COMP instances.csv, and the rows left out because a
    file is missing, as (line, onnx cell, vnnlib cell) (only with `skip_missing`; else an error).

    Rows are `onnx,vnnlib[,timeout]`, paths relative to the csv's folder. A path must stay inside
    that folder: absolute paths and `..` that climbs out of it are refused (VNN-COMP benchmarks
    name their files relative to the benchmark folder; a csv must not make certify read files
    elsewhere). Symbolic links inside the folder are followed: the folder is the user's. The
    timeout, when given, must be a positive number of seconds (None where the row has none);
    branch and bound enforces it.
    """
    csv_path = Path(csv_path)
    locator = _Locator(csv_path, skip_missing)
    text = _read_text(csv_path, "instances csv")
    if "\0" in text:
        raise _fail(csv_path, text.count("\n", 0, text.index("\0")) + 1, "NUL character", "expected a text file")
    pairs: list[tuple[Path | None, Path, float | None]] = []
    missing: list[tuple[int, str, str]] = []
    reader = csv.reader(text.splitlines())
    try:
        for cells in reader:
            line = reader.line_num
            cells = _row_cells(cells, csv_path, line)
            if cells is None:
                continue
            onnx = locator.locate(cells[0], line, "onnx file") if cells[0] else None
            vnnlib = locator.locate(cells[1], line, "vnnlib file")
            if vnnlib is None or (cells[0] and onnx is None):
                missing.append((line, cells[0], cells[1]))  # only reached with skip_missing
                continue
            pairs.append((onnx, vnnlib, float(cells[2]) if len(cells) == 3 else None))
    except csv.Error as error:
        raise _fail(csv_path, reader.line_num, f"not a readable csv ({error})", "expected rows onnx,vnnlib,timeout") from None
    if not pairs:
        raise UserError(f"no usable rows in {csv_path}", "expected rows 'onnx,vnnlib,timeout' naming existing files")
    return pairs, missing


def _row_cells(cells: list[str], csv_path: Path, line: int) -> list[str] | None:
    """The stripped onnx, vnnlib (and timeout, checked) cells of one row, or None for a blank,
    comment or header row."""
    cells = [c.strip() for c in cells]
    while cells and not cells[-1]:
        cells.pop()  # trailing empty cells ("a,b,60,")
    if not cells or cells[0].startswith("#"):
        return None
    if len(cells) < 2 or not cells[1] or len(cells) > 3:
        raise _fail(csv_path, line, f"expected 'onnx,vnnlib[,timeout]', found {len(cells)} column(s)",
                    "give both paths (and optionally the timeout) on every row")
    if cells[0].lower() == "onnx" and cells[1].lower() == "vnnlib":
        return None  # header
    if len(cells) == 3:
        try:
            timeout = float(cells[2])
        except ValueError:
            timeout = float("nan")
        if not (math.isfinite(timeout) and timeout > 0):
            raise _fail(csv_path, line, f"timeout {cells[2][:40]!r} is not a positive number of seconds",
                        "write the timeout in seconds, e.g. 120")
    return cells


class _Locator:
    """Finds the file a csv cell names under the csv's folder: as written, else by its tail (the
    folder is walked once, on first need)."""

    def __init__(self, csv_path: Path, skip_missing: bool):
        self.csv_path = csv_path
        self.folder = csv_path.parent
        self.skip_missing = skip_missing
        self.index: dict[str, list[Path]] | None = None  # file name -> files under the folder

    def build_index(self) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        try:
            for count, p in enumerate(self.folder.rglob("*")):
                if count >= _MAX_INDEXED_FILES:
                    break
                found.setdefault(p.name, []).append(p)
        except OSError:
            pass  # an unreadable subfolder: look up what was found so far
        return found

    def check_inside(self, cell: str, line: int, role: str) -> Path:
        if "\0" in cell:
            raise _fail(self.csv_path, line, f"{role} path holds a NUL character", "fix the row")
        relative = Path(cell)
        if relative.is_absolute() or cell.startswith("~"):
            raise _fail(self.csv_path, line, f"{role} {cell!r} is an absolute path",
                        f"write it relative to the csv's folder {self.folder}")
        if os.path.normpath(cell).split(os.sep)[0] == "..":
            raise _fail(self.csv_path, line, f"{role} {cell!r} lies outside the csv's folder {self.folder}",
                        "keep the benchmark's files under the folder of its instances.csv")
        return relative

    def locate(self, cell: str, line: int, role: str) -> Path | None:
        relative = self.check_inside(cell, line, role)
        direct = self.folder / relative
        if direct.is_file():
            return direct
        if self.index is None:
            self.index = self.build_index()
        wanted = tuple(part for part in relative.parts if part not in (".", ""))
        matches = [p for p in self.index.get(relative.name, []) if p.is_file() and p.parts[-len(wanted):] == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(str(m) for m in matches[:3])
            raise _fail(self.csv_path, line, f"{role} {cell!r} is ambiguous ({names})", "write its path relative to the csv")
        if self.skip_missing:
            return None
        raise _fail(self.csv_path, line, f"{role} {cell!r} not found under {self.folder}",
                    "fix the path, or pass skip_missing=True to run only the rows whose files exist")
