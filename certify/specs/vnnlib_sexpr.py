"""Reading VNN-LIB text: the file's bytes (one-line errors), and s-expressions with their lines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

from certify.common.errors import UserError

_COMMENT = re.compile(r";[^\n]*")
# Newlines become this token so that the reader counts lines in the same pass as it reads.
_NEWLINE = "\x00"
# VNN-COMP properties nest 4 to 5 levels; the reader refuses more than this, so that the formula
# walk (recursive) can never exhaust Python's stack.
_MAX_DEPTH = 100


class _List:
    """A parenthesised list. Atoms are plain strings (cheap: the mnistfc properties are long);
    their line is the list's own line unless recorded in `atom_lines` (list spanning lines)."""

    __slots__ = ("items", "line", "atom_lines")

    def __init__(self, line: int):
        self.items: list[str | _List] = []
        self.line = line
        self.atom_lines: dict[int, int] | None = None

    def line_of(self, k: int) -> int:
        item = self.items[k]
        if isinstance(item, _List):
            return item.line
        return self.atom_lines.get(k, self.line) if self.atom_lines else self.line

    def head(self) -> str | None:
        return self.items[0] if self.items and isinstance(self.items[0], str) else None

    def args(self) -> list[tuple[str | _List, int]]:
        """The items after the head, each with its line."""
        return [(self.items[k], self.line_of(k)) for k in range(1, len(self.items))]

    def args_all(self) -> list[tuple[str | _List, int]]:
        """All items, each with its line (for the root list, which has no head)."""
        return [(item, self.line_of(k)) for k, item in enumerate(self.items)]


_Expr = Union[str, _List]


def _fail(path: Path, line: int, what: str, hint: str) -> UserError:
    return UserError(f"{path}:{line}: {what}", hint)


def _read_forms(text: str, path: Path) -> _List:
    """Tokenize and read the whole file into a root list holding the top-level forms."""
    if _NEWLINE in text:
        raise _fail(path, text.count("\n", 0, text.index(_NEWLINE)) + 1, "NUL character", "expected a text file")
    # Padding parentheses and splitting run in C, not token by token in Python as a regex tokenizer would.
    spaced = _COMMENT.sub("", text).replace("(", " ( ").replace(")", " ) ").replace("\n", f" {_NEWLINE} ")
    root = _List(1)
    stack = [root]
    current = root
    line = 1
    for token in spaced.split():
        if token == _NEWLINE:
            line += 1
        elif token == "(":
            if len(stack) > _MAX_DEPTH:
                raise _fail(path, line, f"expressions nested more than {_MAX_DEPTH} levels deep",
                            "write the property with flat (and ...) / (or ...) lists")
            opened = _List(line)
            current.items.append(opened)
            stack.append(opened)
            current = opened
        elif token == ")":
            if len(stack) == 1:
                raise _fail(path, line, "unexpected ')'", "remove it or add the matching '('")
            stack.pop()
            current = stack[-1]
        else:
            if line != current.line:
                if current.atom_lines is None:
                    current.atom_lines = {}
                current.atom_lines[len(current.items)] = line
            current.items.append(token)
    if len(stack) > 1:
        # The outermost open list is where the missing ')' belongs: all that follows nested into it.
        raise _fail(path, stack[1].line, "'(' is never closed (end of file reached)", "add the missing ')'")
    return root


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}", "check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} is a folder: {path}", "give a file") from None
    except (OSError, ValueError) as error:  # permissions, a name too long, a NUL byte in the name
        raise UserError(f"cannot read {what} {path} ({getattr(error, 'strerror', None) or error})",
                        "check the path") from None


def _decode(raw: bytes, path: Path, what: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark some editors write is not part of the text
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x})",
                        f"expected a {what} (UTF-8 text)") from None


def _read_text(path: Path, what: str) -> str:
    return _decode(_read_bytes(path, what), path, what)
