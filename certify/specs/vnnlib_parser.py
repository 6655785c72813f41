"""The VNN-LIB property parser: forms to linear rows, rows to one input box and an output region."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch

from certify.common.errors import UserError
from certify.specs.vnnlib_property import OutputConstraint, VnnlibProperty, _detect_label
from certify.specs.vnnlib_sexpr import _decode, _Expr, _fail, _List, _read_bytes, _read_forms

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
# X_i / Y_j indices: far more than any network has inputs (and short enough for int()).
_MAX_INDEX_DIGITS = 9

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
        plain_rows, disjunctions = self.read_asserts(text)
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
        branches = [self.live_branches(line, dnf, bounds) for line, dnf in disjunctions]
        empty_region = empty_region or any(not live for live in branches)
        lower, upper = bounds.finish(self)
        if not base_outputs and not any(rows for live in branches for rows in live) and not empty_region:
            raise _fail(self.path, 1, "no constraint on the outputs",
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
        return VnnlibProperty(path=self.path, lower=lower, upper=upper, n_outputs=n_outputs,
                              unsafe=unsafe, label=_detect_label(unsafe, n_outputs))

    def read_asserts(self, text: str) -> tuple[list[_Row], list[tuple[int, list[list[_Row]]]]]:
        """The declarations are recorded; the asserts come back as the rows of those without a
        real 'or' (all AND together) and, per 'or' assert, its line and disjunctive normal form."""
        plain_rows: list[_Row] = []
        disjunctions: list[tuple[int, list[list[_Row]]]] = []
        for form, line in _read_forms(text, self.path).args_all():
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
            elif command not in _IGNORED_COMMANDS:
                found = repr(command) if command else "something else"
                raise self.fail(line, f"expected a command, found {found}",
                                "expected (declare-const ...) or (assert ...)")
        return plain_rows, disjunctions

    def live_branches(self, line: int, dnf: list[list[_Row]], bounds: "_Bounds") -> list[list[_Row]]:
        """The output rows of each branch of one 'or' that can hold; the input bounds, which every
        branch must repeat alike, go into `bounds`."""
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
        return live

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
