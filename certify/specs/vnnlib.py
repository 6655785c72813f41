"""VNN-LIB properties: one input box and a counterexample region over the outputs.

A VNN-LIB file (the SMT-LIB subset of VNN-COMP) declares inputs `X_0..X_{n-1}` and outputs
`Y_0..Y_{m-1}` and asserts constraints whose conjunction describes a COUNTEREXAMPLE: the property is
`sat` when some x in the input box gives an output y that meets the output constraints, `unsat`
(verified) when none does.

Supported forms: `;` comments, `(declare-const X_i Real)`, `(assert F)` where F is built from
`and`, `or` and the comparisons `<= >= < > =` (chains allowed) between linear terms (numbers,
declared variables, `+`, `-`, `*` by a constant). Strict comparisons are read as non-strict: the
closed region is empty only if the strict one is, so `unsat` stays sound (only a point exactly on a
strict boundary would be reported as a counterexample). Input constraints
must be per-variable bounds, i.e. one box; several asserts AND together; an `or` may repeat the
same input bounds in every branch (as vnncomp_test_tiny does) but not describe different boxes.
Every parse error is a `UserError` that names the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import NamedTuple, Union

import torch

from certify.common.errors import UserError
from certify.common.files import atomic_path

__all__ = [
    "OutputConstraint",
    "VnnlibProperty",
    "parse_vnnlib",
    "find_properties",
    "write_counterexample",
    "read_counterexample",
]

_COMMENT = re.compile(r";[^\n]*")
# Newlines become this token so that the reader counts lines in the same pass as it reads.
_NEWLINE = "\x00"
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_LOOKS_NUMERIC = re.compile(r"[+-]?\.?\d")
_VARIABLE = re.compile(r"([XY])_(0|[1-9]\d*)\Z")
_COMPARISONS = ("<=", ">=", "<", ">", "=")
_TERM_OPS = ("+", "-", "*")
_IGNORED_COMMANDS = ("set-logic", "set-info", "set-option", "check-sat", "get-model", "exit")
# Products of several `or` asserts grow multiplicatively; past this the file is not a box property.
_MAX_DISJUNCTS = 10_000
# The counterexample region is checked as a dense (disjuncts x rows) specification matrix: bound
# its size (disjuncts times the rows of the longest one) BEFORE expanding the formula, so that an
# `and` of `or`s cannot build hundreds of MB of rows before it is refused.
_MAX_EXPANDED_ROWS = 100_000
# VNN-COMP properties nest 4 to 5 levels; the reader refuses more than this, so that the formula
# walk (recursive) can never exhaust Python's stack.
_MAX_DEPTH = 100
# X_i / Y_j indices: far more than any network has inputs (and short enough for int()).
_MAX_INDEX_DIGITS = 9


class OutputConstraint(NamedTuple):
    """One conjunct of the counterexample region: every row of `C @ y <= d` holds.

    `C` is (rows, n_outputs) and `d` is (rows,), both float64. A NamedTuple so that
    `for C, d in prop.unsafe` works. Zero rows means "any output".
    """

    C: torch.Tensor
    d: torch.Tensor

    def holds(self, y: torch.Tensor) -> torch.Tensor:
        """For outputs `y` of shape (batch, n_outputs): a (batch,) bool tensor, row-wise AND."""
        return (y @ self.C.T <= self.d).all(dim=-1)


@dataclass
class VnnlibProperty:
    """A parsed VNN-LIB property.

    lower, upper: (n_inputs,) float64 input box, in the order X_0..X_{n-1} (row-major order of the
        ONNX input tensor). Values are kept as written in the file.
    n_outputs: number of declared outputs Y_0..Y_{m-1}.
    unsafe: the counterexample region is the OR over the items; an item (C, d) is the AND of its
        rows `C @ y <= d`. An empty list means the region is empty (trivially unsat).
    label: for robustness properties "Y_j >= Y_label for some j != label", over ALL other outputs,
        the label; else None. With a label, a counterexample is exactly "argmax is not uniquely
        the label", so margin-based certifiers and falsifiers may use it instead of `unsafe`.
    """

    path: Path
    lower: torch.Tensor
    upper: torch.Tensor
    n_outputs: int
    unsafe: list[OutputConstraint] = field(default_factory=list)
    label: int | None = None
    sha256: str | None = None  # of the file's bytes as parsed (parse_vnnlib)

    @property
    def n_inputs(self) -> int:
        return int(self.lower.numel())

    def counterexample_mask(self, ys: torch.Tensor) -> torch.Tensor:
        """For outputs of shape (batch, n_outputs): which rows lie in the counterexample region."""
        ys = torch.as_tensor(ys).detach().to("cpu", torch.float64)
        if ys.dim() != 2 or ys.shape[1] != self.n_outputs:
            raise ValueError(f"expected outputs of shape (batch, {self.n_outputs}), got {tuple(ys.shape)}")
        mask = torch.zeros(ys.shape[0], dtype=torch.bool)
        for item in self.unsafe:
            mask |= item.holds(ys)
        return mask

    def is_counterexample(self, y: torch.Tensor) -> bool:
        """Whether one output vector (any shape with n_outputs elements) meets the region."""
        y = torch.as_tensor(y).detach().reshape(1, -1)
        return bool(self.counterexample_mask(y)[0])


# ----------------------------------------------------------------------------- reading s-expressions


class _List:
    """A parenthesised list. Atoms are plain strings (cheap: the mnistfc files hold 20k tokens);
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
    # Padding parentheses and splitting runs in C: several times faster than a regex tokenizer.
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


# ----------------------------------------------------------------------------- formulas

_Key = tuple[str, int]  # ("X", i) or ("Y", j)
_Linear = tuple[dict[_Key, float], float]  # sum(coef * var) + const


@dataclass(slots=True)
class _Row:
    """sum(coefs[v] * v) + const <= 0, from one comparison on `line`."""

    coefs: dict[_Key, float]
    const: float
    line: int


class _Parser:
    def __init__(self, path: Path):
        self.path = path
        self.declared: dict[str, tuple[_Key, int]] = {}  # name -> (key, line of declaration)
        # name -> the linear term "1 * name"; shared, so coefficient dicts are never mutated in place.
        self.variable_terms: dict[str, _Linear] = {}

    def fail(self, line: int, what: str, hint: str) -> UserError:
        return _fail(self.path, line, what, hint)

    # -- terms

    def term(self, expr: _Expr, line: int) -> _Linear:
        if isinstance(expr, str):
            return self.atom(expr, line)
        op = expr.head()
        args = expr.args()
        if op not in _TERM_OPS:
            raise self.fail(line, f"unknown operator {op or '(...)'!r} in a term",
                            "expected a number, a declared X_i/Y_i, or (+ ...), (- ...), (* <number> ...)")
        if not args:
            raise self.fail(line, f"{op!r} without arguments", f"expected ({op} <term> ...)")
        parts = [self.term(a, a_line) for a, a_line in args]
        if op == "+":
            return self.finite(_combine(parts, [1.0] * len(parts)), line)
        if op == "-":
            signs = [-1.0] if len(parts) == 1 else [1.0] + [-1.0] * (len(parts) - 1)
            return self.finite(_combine(parts, signs), line)
        # '*': the expression stays linear only if at most one factor has variables.
        coefs: dict[_Key, float] = {}
        const = 1.0
        for part_coefs, part_const in parts:
            if part_coefs and coefs:
                raise self.fail(line, "product of two variables",
                                "only linear constraints are supported: multiply by constants")
            if part_coefs:
                coefs = {k: v * const for k, v in part_coefs.items()}
            else:
                coefs = {k: v * part_const for k, v in coefs.items()}
            const *= part_const
        return self.finite((coefs, const), line)

    def finite(self, term: _Linear, line: int) -> _Linear:
        coefs, const = term
        if not (math.isfinite(const) and all(math.isfinite(v) for v in coefs.values())):
            raise self.fail(line, "a coefficient or constant overflows to infinity",
                            "scale the constraint so that its numbers stay below about 1e308")
        return term

    def row(self, left: _Linear, right: _Linear, line: int) -> _Row:
        row = _row(left, right, line)
        if not (math.isfinite(row.const) and all(math.isfinite(v) for v in row.coefs.values())):
            raise self.fail(line, "a coefficient or constant overflows to infinity",
                            "scale the constraint so that its numbers stay below about 1e308")
        return row

    def atom(self, text: str, line: int) -> _Linear:
        found = self.variable_terms.get(text)
        if found is not None:
            return found
        if _NUMBER.match(text):
            value = float(text)
            if not math.isfinite(value):
                raise self.fail(line, f"number {text!r} is out of range", "write a finite number")
            return {}, value
        if _LOOKS_NUMERIC.match(text):
            raise self.fail(line, f"bad number {text!r}", "expected a decimal number such as 0.5, -1, 2.5e-3")
        if _VARIABLE.match(text):
            raise self.fail(line, f"{text[:40]} is used but not declared", f"add (declare-const {text[:40]} Real) before it")
        raise self.fail(line, f"unknown name {text!r}", "expected a number or a declared X_i / Y_i")

    # -- formulas, to disjunctive normal form: a list of conjunctions (lists of rows)

    def formula(self, expr: _Expr, line: int) -> list[list[_Row]]:
        if isinstance(expr, str):
            raise self.fail(line, f"expected a constraint, got {expr!r}",
                            "expected (<= a b), (>= a b), (and ...) or (or ...)")
        op = expr.head()
        if op in _COMPARISONS and len(expr.items) == 3 and op != "=":
            # The common (<= a b) / (>= a b), without the general chain below.
            left = self.term(expr.items[1], expr.line_of(1))
            right = self.term(expr.items[2], expr.line_of(2))
            return [[self.row(left, right, line) if op in ("<=", "<") else self.row(right, left, line)]]
        args = expr.args()
        if op in ("and", "or"):
            if not args:
                raise self.fail(line, f"({op}) without arguments", f"expected ({op} <constraint> ...)")
            children = [self.formula(a, a_line) for a, a_line in args]
            if op == "or":
                dnf = [conj for child in children for conj in child]
                self.check_expansion(len(dnf), max((len(conj) for conj in dnf), default=0), line, "'or'")
                return dnf
            # Count the expansion before building it: the product of the cases, each as long as
            # the longest case of every child together.
            size = math.prod(len(c) for c in children)
            longest = sum(max((len(conj) for conj in child), default=0) for child in children)
            self.check_expansion(size, longest, line, "'and' of 'or's")
            return [[row for conj in combo for row in conj] for combo in product(*children)]
        if op in _COMPARISONS:
            if len(args) < 2:
                raise self.fail(line, f"({op}) needs two terms", f"expected ({op} <term> <term>)")
            terms = [self.term(a, a_line) for a, a_line in args]
            rows = []
            for left, right in zip(terms, terms[1:]):
                if op in ("<=", "<", "="):
                    rows.append(self.row(left, right, line))  # left - right <= 0
                if op in (">=", ">", "="):
                    rows.append(self.row(right, left, line))
            return [rows]
        raise self.fail(line, f"unknown operator {op or '(...)'!r}",
                        "expected one of and, or, <=, >=, <, >, = (negation is not supported)")

    def check_expansion(self, cases: int, longest: int, line: int, what: str) -> None:
        if cases > _MAX_DISJUNCTS:
            raise self.fail(line, f"{what} {'expand' if what.endswith(',') else 'expands'} to {cases:,} cases",
                            f"at most {_MAX_DISJUNCTS:,} are supported; simplify the property")
        if cases * longest > _MAX_EXPANDED_ROWS:
            raise self.fail(line, f"{what} {'expand' if what.endswith(',') else 'expands'} to {cases:,} cases of up to {longest:,} constraints "
                                  f"({cases * longest:,} in all)",
                            f"at most {_MAX_EXPANDED_ROWS:,} are supported; simplify the property")

    # -- top level

    def parse(self, text: str) -> VnnlibProperty:
        path = self.path
        plain_rows: list[_Row] = []  # from asserts without a real 'or': all AND together
        disjunctions: list[tuple[int, list[list[_Row]]]] = []
        for form, line in _read_forms(text, path).args_all():
            command = form.head() if isinstance(form, _List) else None
            if command == "declare-const":
                self.declare(form)
            elif command == "assert":
                if len(form.items) != 2:
                    raise self.fail(line, "assert takes exactly one constraint", "expected (assert <constraint>)")
                dnf = self.formula(form.items[1], form.line_of(1))
                if len(dnf) == 1:
                    plain_rows.extend(dnf[0])
                else:
                    disjunctions.append((line, dnf))
            elif command in _IGNORED_COMMANDS:
                continue
            else:
                found = repr(command) if command else "something else"
                raise self.fail(line, f"expected a command, found {found}",
                                "expected (declare-const ...) or (assert ...)")

        n_inputs = self.count_declared("X")
        n_outputs = self.count_declared("Y")
        bounds = _Bounds(n_inputs)
        base_outputs: list[_Row] = []
        empty_region = False
        for row in plain_rows:
            kind = self.classify(row)
            if kind == "input":
                bounds.add(row, self)
            elif kind == "output":
                base_outputs.append(row)
            elif kind == "false":
                empty_region = True

        branches: list[list[list[_Row]]] = []  # per disjunction: output rows of each live branch
        for line, dnf in disjunctions:
            live: list[list[_Row]] = []
            shared_inputs: frozenset | None = None
            for conj in dnf:
                kinds = [(self.classify(r), r) for r in conj]
                if any(k == "false" for k, _ in kinds):
                    continue  # this branch can never hold
                inputs = [r for k, r in kinds if k == "input"]
                signature = frozenset(_bound_signature(r) for r in inputs)
                if shared_inputs is None:
                    shared_inputs = signature
                    for r in inputs:
                        bounds.add(r, self)
                elif signature != shared_inputs:
                    raise self.fail(line, "the branches of this 'or' constrain the inputs differently",
                                    "only one input box is supported: write one .vnnlib file per box")
                live.append([r for k, r in kinds if k == "output"])
            if not live:
                empty_region = True
            branches.append(live)

        lower, upper = bounds.finish(self)
        if not base_outputs and not any(rows for live in branches for rows in live) and not empty_region:
            raise _fail(path, 1, "no constraint on the outputs",
                        "add an (assert ...) over Y_0.. describing the counterexample region")

        unsafe: list[OutputConstraint] = []
        if not empty_region:
            count = math.prod(len(live) for live in branches)
            longest = len(base_outputs) + sum(max((len(rows) for rows in live), default=0) for live in branches)
            line = disjunctions[-1][0] if disjunctions else 1
            self.check_expansion(count, max(longest, 1), line, "the 'or' asserts, taken together,")
            for combo in product(*branches):
                rows = base_outputs + [r for rs in combo for r in rs]
                unsafe.append(_to_constraint(rows, n_outputs))
        return VnnlibProperty(path=path, lower=lower, upper=upper, n_outputs=n_outputs,
                              unsafe=unsafe, label=_detect_label(unsafe, n_outputs))

    def declare(self, form: _List) -> None:
        items = form.items
        if len(items) != 3 or not (isinstance(items[1], str) and isinstance(items[2], str)):
            raise self.fail(form.line, "malformed declaration", "expected (declare-const X_<i> Real)")
        name, sort = items[1], items[2]
        match = _VARIABLE.match(name)
        if match is None or len(match.group(2)) > _MAX_INDEX_DIGITS:
            raise self.fail(form.line, f"cannot declare {name[:40]!r}",
                            "only inputs X_<i> and outputs Y_<j> can be declared")
        if sort != "Real":
            raise self.fail(form.line, f"{name} has sort {sort[:40]!r}", f"expected (declare-const {name} Real)")
        if name in self.declared:
            raise self.fail(form.line, f"{name} is declared twice",
                            f"remove this line (first declared on line {self.declared[name][1]})")
        key = (match.group(1), int(match.group(2)))
        self.declared[name] = (key, form.line)
        self.variable_terms[name] = ({key: 1.0}, 0.0)

    def count_declared(self, kind: str) -> int:
        indices = sorted((key[1], line) for key, line in self.declared.values() if key[0] == kind)
        for expected, (index, line) in enumerate(indices):
            if index != expected:
                raise self.fail(line, f"{kind}_{index} is declared but {kind}_{expected} is not",
                                f"declare {kind}_0 .. {kind}_<n-1> without gaps")
        if not indices:
            role = "input" if kind == "X" else "output"
            raise _fail(self.path, 1, f"no {role} variables declared", f"add (declare-const {kind}_0 Real) ...")
        return len(indices)

    def classify(self, row: _Row) -> str:
        """'input' (a bound on one X), 'output' (only Y), 'true'/'false' (no variable)."""
        if len(row.coefs) == 1:
            ((kind, _), coef), = row.coefs.items()
            if coef != 0.0:
                return "input" if kind == "X" else "output"
        if 0.0 in row.coefs.values():
            row.coefs = {k: v for k, v in row.coefs.items() if v != 0.0}
        kinds = {k[0] for k in row.coefs}
        if not kinds:
            return "true" if row.const <= 0.0 else "false"
        if kinds == {"Y"}:
            return "output"
        if kinds == {"X"}:
            if len(row.coefs) > 1:
                raise self.fail(row.line, "linear constraint over several inputs",
                                "only boxes are supported: bound each X_i on its own, e.g. (<= X_0 0.5)")
            return "input"
        raise self.fail(row.line, "constraint mixes inputs and outputs",
                        "only box bounds on X_i and constraints on Y_j are supported")


def _combine(parts: list[_Linear], signs: list[float]) -> _Linear:
    coefs: dict[_Key, float] = {}
    const = 0.0
    for (part_coefs, part_const), sign in zip(parts, signs):
        for key, value in part_coefs.items():
            coefs[key] = coefs.get(key, 0.0) + sign * value
        const += sign * part_const
    return coefs, const


def _row(left: _Linear, right: _Linear, line: int) -> _Row:
    """left - right <= 0."""
    (left_coefs, left_const), (right_coefs, right_const) = left, right
    # Bounds (variable against number) are by far the most common rows: skip the merge.
    if not right_coefs:
        return _Row(left_coefs, left_const - right_const, line)
    if not left_coefs:
        return _Row({k: -v for k, v in right_coefs.items()}, left_const - right_const, line)
    coefs, const = _combine([left, right], [1.0, -1.0])
    return _Row(coefs, const, line)


def _bound_signature(row: _Row) -> tuple[int, bool, float]:
    """(input index, is_upper, value) of a one-variable row `a * X_i + c <= 0`."""
    ((key, coef),) = row.coefs.items()
    return key[1], coef > 0, -row.const / coef


class _Bounds:
    """The tightest per-input lower and upper bounds seen, with the lines that set them."""

    def __init__(self, n: int):
        self.lower = [-math.inf] * n
        self.upper = [math.inf] * n
        self.lower_line = [0] * n
        self.upper_line = [0] * n

    def add(self, row: _Row, parser: "_Parser") -> None:
        index, is_upper, value = _bound_signature(row)
        if not math.isfinite(value):
            raise parser.fail(row.line, f"the bound on X_{index} overflows to infinity",
                              "give finite bounds (divide the constraint through by its coefficient)")
        if is_upper:
            if value < self.upper[index]:
                self.upper[index], self.upper_line[index] = value, row.line
        elif value > self.lower[index]:
            self.lower[index], self.lower_line[index] = value, row.line

    def finish(self, parser: _Parser) -> tuple[torch.Tensor, torch.Tensor]:
        decl_line = {key[1]: line for key, line in parser.declared.values() if key[0] == "X"}
        for i, (lo, hi) in enumerate(zip(self.lower, self.upper)):
            for missing, side, op in ((lo == -math.inf, "lower", ">="), (hi == math.inf, "upper", "<=")):
                if missing:
                    raise parser.fail(decl_line[i], f"input X_{i} (declared here) has no {side} bound",
                                      f"add (assert ({op} X_{i} <number>)); only bounded boxes are supported")
            if lo > hi:
                line = max(self.lower_line[i], self.upper_line[i])
                raise parser.fail(line, f"empty input box: X_{i} >= {lo!r} and X_{i} <= {hi!r}",
                                  "make the lower bound at most the upper bound")
        return (torch.tensor(self.lower, dtype=torch.float64), torch.tensor(self.upper, dtype=torch.float64))


def _to_constraint(rows: list[_Row], n_outputs: int) -> OutputConstraint:
    C = torch.zeros(len(rows), n_outputs, dtype=torch.float64)
    d = torch.empty(len(rows), dtype=torch.float64)
    for r, row in enumerate(rows):
        for (_, j), coef in row.coefs.items():
            C[r, j] = coef
        d[r] = -row.const
    return OutputConstraint(C, d)


def _detect_label(unsafe: list[OutputConstraint], n_outputs: int) -> int | None:
    """The label L if the region is exactly OR over all j != L of (a * Y_L - a * Y_j <= 0), a > 0."""
    if n_outputs < 2 or len(unsafe) != n_outputs - 1:
        return None
    label: int | None = None
    others: set[int] = set()
    for C, d in unsafe:
        if C.shape[0] != 1 or d[0] != 0:
            return None
        row = C[0]
        nonzero = torch.nonzero(row).flatten().tolist()
        if len(nonzero) != 2:
            return None
        a, b = nonzero
        pos, neg = (a, b) if row[a] > 0 else (b, a)
        if not (row[pos] > 0 and row[neg] == -row[pos]):
            return None
        if label is None:
            label = pos
        elif pos != label:
            return None
        others.add(neg)
    if label is None or others != set(range(n_outputs)) - {label}:
        return None
    return label


# ----------------------------------------------------------------------------- public functions


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


def parse_vnnlib(path: str | Path) -> VnnlibProperty:
    """Read one .vnnlib file into an input box and an output counterexample region.

    Every problem of the file is a UserError naming the file and line; the file is read once, and
    its sha256 (of the bytes parsed) is kept for the report.
    """
    path = Path(path)
    raw = _read_bytes(path, "VNN-LIB file")
    prop = _Parser(path).parse(_decode(raw, path, "VNN-LIB file"))
    prop.sha256 = hashlib.sha256(raw).hexdigest()
    return prop


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
    """The (onnx or None, vnnlib) pairs of a VNN-COMP instances.csv, and the rows left out because a
    file is missing, as (line, onnx cell, vnnlib cell) (only with `skip_missing`; else an error).

    Rows are `onnx,vnnlib[,timeout]`, paths relative to the csv's folder. A path must stay inside
    that folder: absolute paths and `..` that climbs out of it are refused (VNN-COMP benchmarks
    name their files relative to the benchmark folder; a csv must not make certify read files
    elsewhere). Symbolic links inside the folder are followed: the folder is the user's. The
    timeout, when given, must be a positive number of seconds (it is read, not enforced).
    """
    csv_path = Path(csv_path)
    folder = csv_path.parent
    index: dict[str, list[Path]] | None = None  # file name -> files under the folder, built on first need

    def build_index() -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        try:
            for count, p in enumerate(folder.rglob("*")):
                if count >= _MAX_INDEXED_FILES:
                    break
                found.setdefault(p.name, []).append(p)
        except OSError:
            pass  # an unreadable subfolder: look up what was found so far
        return found

    def locate(cell: str, line: int, role: str) -> Path | None:
        nonlocal index
        if "\0" in cell:
            raise _fail(csv_path, line, f"{role} path holds a NUL character", "fix the row")
        relative = Path(cell)
        if relative.is_absolute() or cell.startswith("~"):
            raise _fail(csv_path, line, f"{role} {cell!r} is an absolute path",
                        f"write it relative to the csv's folder {folder}")
        if os.path.normpath(cell).split(os.sep)[0] == "..":
            raise _fail(csv_path, line, f"{role} {cell!r} lies outside the csv's folder {folder}",
                        "keep the benchmark's files under the folder of its instances.csv")
        direct = folder / relative
        if direct.is_file():
            return direct
        if index is None:
            index = build_index()
        wanted = tuple(part for part in relative.parts if part not in (".", ""))
        matches = [p for p in index.get(relative.name, []) if p.is_file() and p.parts[-len(wanted):] == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(str(m) for m in matches[:3])
            raise _fail(csv_path, line, f"{role} {cell!r} is ambiguous ({names})", "write its path relative to the csv")
        if skip_missing:
            return None
        raise _fail(csv_path, line, f"{role} {cell!r} not found under {folder}",
                    "fix the path, or pass skip_missing=True to run only the rows whose files exist")

    text = _read_text(csv_path, "instances csv")
    if "\0" in text:
        raise _fail(csv_path, text.count("\n", 0, text.index("\0")) + 1, "NUL character", "expected a text file")
    pairs: list[tuple[Path | None, Path]] = []
    missing: list[tuple[int, str, str]] = []
    reader = csv.reader(text.splitlines())
    try:
        for cells in reader:
            line = reader.line_num
            cells = [c.strip() for c in cells]
            while cells and not cells[-1]:
                cells.pop()  # trailing empty cells ("a,b,60,")
            if not cells or cells[0].startswith("#"):
                continue
            if len(cells) < 2 or not cells[1] or len(cells) > 3:
                raise _fail(csv_path, line, f"expected 'onnx,vnnlib[,timeout]', found {len(cells)} column(s)",
                            "give both paths (and optionally the timeout) on every row")
            if cells[0].lower() == "onnx" and cells[1].lower() == "vnnlib":
                continue  # header
            if len(cells) == 3:
                try:
                    timeout = float(cells[2])
                except ValueError:
                    timeout = float("nan")
                if not (math.isfinite(timeout) and timeout > 0):
                    raise _fail(csv_path, line, f"timeout {cells[2][:40]!r} is not a positive number of seconds",
                                "write the timeout in seconds, e.g. 120")
            onnx = locate(cells[0], line, "onnx file") if cells[0] else None
            vnnlib = locate(cells[1], line, "vnnlib file")
            if vnnlib is None or (cells[0] and onnx is None):
                missing.append((line, cells[0], cells[1]))  # only reached with skip_missing
                continue
            pairs.append((onnx, vnnlib))
    except csv.Error as error:
        raise _fail(csv_path, reader.line_num, f"not a readable csv ({error})", "expected rows onnx,vnnlib,timeout") from None
    if not pairs:
        raise UserError(f"no usable rows in {csv_path}", "expected rows 'onnx,vnnlib,timeout' naming existing files")
    return pairs, missing


def write_counterexample(path: str | Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """Write a VNN-COMP result file for a counterexample, atomically.

    Format (as the VNN-COMP scoring scripts read it): the verdict line `sat`, then one s-expression
    `((X_0 v)\\n (X_1 v)\\n ... (Y_0 v)\\n ... (Y_{m-1} v))`. x is flattened row-major (the order of
    the X_i), y likewise; values are written as the shortest text that reads back to the same float.
    """
    xs = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten().tolist()
    ys = torch.as_tensor(y).detach().to("cpu", torch.float64).flatten().tolist()
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError("a counterexample must be finite")
    entries = [f"(X_{i} {v!r})" for i, v in enumerate(xs)] + [f"(Y_{j} {v!r})" for j, v in enumerate(ys)]
    with atomic_path(path) as tmp:
        tmp.write_text("sat\n(" + "\n ".join(entries) + ")\n", encoding="utf-8")


def read_counterexample(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a counterexample written by `write_counterexample` (or by another VNN-COMP tool).

    Accepts the result file (leading `sat` line) or the bare `((X_0 v) ...)` s-expression; returns
    float64 tensors x (n_inputs,) and y (n_outputs,).
    """
    path = Path(path)
    forms = _read_forms(_read_text(path, "counterexample file"), path).args_all()
    if forms and forms[0][0] == "sat":
        forms = forms[1:]
    if len(forms) != 1 or not isinstance(forms[0][0], _List):
        line = forms[0][1] if forms else 1
        raise _fail(path, line, "expected one list ((X_0 v) ... (Y_0 v) ...)", "write 'sat' then the assignment")
    values: dict[str, list[float]] = {"X": [], "Y": []}
    for entry, line in forms[0][0].args_all():
        ok = isinstance(entry, _List) and len(entry.items) == 2 and all(isinstance(i, str) for i in entry.items)
        match = _VARIABLE.match(entry.items[0]) if ok else None
        if not ok or match is None or not _NUMBER.match(entry.items[1]):
            raise _fail(path, line, "expected (X_<i> <number>) or (Y_<j> <number>)", "fix this entry")
        kind, index = match.group(1), int(match.group(2))
        if index != len(values[kind]):
            raise _fail(path, line, f"{kind}_{index} out of order", f"expected {kind}_{len(values[kind])}")
        values[kind].append(float(entry.items[1]))
    return torch.tensor(values["X"], dtype=torch.float64), torch.tensor(values["Y"], dtype=torch.float64)
