"""A certificate read back: the JSON report of a dataset run, every field checked before it is used.

The report may have been edited, truncated or written by something else, so nothing is taken on
trust: each field the re-check relies on is checked for its type and range here, and a report
that fails is one UserError naming the field. The claims it makes (which sample is verified at
which eps) are checked against the model file by certify.reports.check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from certify.common.errors import (UserError, is_finite_number,
                                   load_untrusted_json)
from certify.reports.report import REPORT_SCHEMA, VNNLIB_SCHEMA
from certify.verdicts.cascade import FALSIFIED, UNKNOWN, VERIFIED

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RECREATE = "re-create it with certify MODEL --eps ... --json REPORT.json"


@dataclass
class Claim:
    """One per-sample record of the report at one eps."""

    eps: float
    index: int
    label: int
    prediction: int
    verdict: str
    method: str | None
    margin_lower_bound: float | None
    reused_from: float | None

    @property
    def decided_at(self) -> float:
        """The eps whose box the verdict was decided on (a reused verdict was decided at another)."""
        return self.eps if self.reused_from is None else self.reused_from


@dataclass
class Certificate:
    path: Path
    model_path: str
    sha256: str
    input_shape: tuple[int, ...]
    graph_normalization: list[str]
    spec: dict
    eps: list[float]  # the eps of the results, in the report's order
    summaries: list[dict]  # per eps: the counts as the report states them
    claims: list[list[Claim]]  # per eps: the per-sample records
    radius: bool = False  # whether the report also holds per-sample radii


def read_certificate(path: str | Path) -> Certificate:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read the report {path} ({error.strerror or error})", "give a report written by "
                        "certify --json") from None
    document = load_untrusted_json(text, f"report {path}", _RECREATE)
    fields = _Fields(path)
    if not isinstance(document, dict):
        fields.bad("the document", "is not a JSON object")
    schema = document.get("schema")
    if schema == VNNLIB_SCHEMA:
        raise UserError(f"{path} is a VNN-LIB report; certify check re-checks dataset certificates ({REPORT_SCHEMA})",
                        "re-run certify --vnnlib to check the properties again")
    if schema != REPORT_SCHEMA:
        fields.bad("schema", f"is {schema!r}, not {REPORT_SCHEMA!r}")
    model = fields.get(document, "model", dict)
    sha256 = fields.get(model, "sha256", str, "model")
    if not _SHA256.match(sha256):
        fields.bad("model.sha256", "is not a sha256 in hex")
    input_shape = fields.get(model, "input_shape", list, "model")
    if not input_shape or not all(type(d) is int and d > 0 for d in input_shape):
        fields.bad("model.input_shape", "is not a list of positive integers")
    normalization = model.get("graph_normalization") or []
    if not isinstance(normalization, list) or not all(isinstance(op, str) for op in normalization):
        fields.bad("model.graph_normalization", "is not a list of op names")
    spec = _spec(fields, fields.get(document, "spec", dict))
    results = fields.get(document, "results", list)
    if not results:
        raise UserError(f"the report {path} holds no --eps results (a --radius run alone?), so no verdict to re-check",
                        "re-check the report of a run with --eps")
    eps_values, summaries, claims = [], [], []
    for k, result in enumerate(results):
        where = f"results[{k}]"
        if not isinstance(result, dict):
            fields.bad(where, "is not an object")
        eps = fields.number(result, "eps", where)
        eps_values.append(eps)
        summaries.append(result)
        claims.append([_claim(fields, record, eps, f"{where}.per_sample[{i}]")
                       for i, record in enumerate(fields.get(result, "per_sample", list, where))])
    return Certificate(path, fields.get(model, "path", str, "model"), sha256, tuple(input_shape), normalization, spec,
                       eps_values, summaries, claims, document.get("radius") is not None)


def _spec(fields: "_Fields", spec: dict) -> dict:
    checked = {"dataset": fields.get(spec, "dataset", str, "spec"), "split": fields.get(spec, "split", str, "spec"),
               "norm": str(fields.get(spec, "norm", str, "spec")), "seed": fields.integer(spec, "seed", "spec")}
    low, high = (fields.get(spec, "input_range", list, "spec") + [None, None])[:2]
    if not (is_finite_number(low) and is_finite_number(high) and low < high):
        fields.bad("spec.input_range", "is not an interval [low, high]")
    checked["input_range"] = (float(low), float(high))
    for key in ("mean", "std"):
        values = spec.get(key)
        if values is not None and not (isinstance(values, list) and values and all(map(is_finite_number, values))):
            fields.bad(f"spec.{key}", "is not null or a list of numbers")
        checked[key] = None if values is None else [float(v) for v in values]
    methods = fields.get(spec, "methods", list, "spec")
    if not methods or not all(isinstance(m, str) for m in methods):
        fields.bad("spec.methods", "is not a list of method names")
    checked["methods"] = tuple(methods)
    attack = fields.get(spec, "attack", dict, "spec")
    enabled = attack.get("enabled")
    if not isinstance(enabled, bool):
        fields.bad("spec.attack.enabled", "is not true or false")
    checked["attack"] = {"enabled": enabled, "steps": fields.integer(attack, "steps", "spec.attack"),
                         "restarts": fields.integer(attack, "restarts", "spec.attack")}
    checked["classes"] = spec.get("classes") if isinstance(spec.get("classes"), list) else []
    return checked


def _claim(fields: "_Fields", record, eps: float, where: str) -> Claim:
    if not isinstance(record, dict):
        fields.bad(where, "is not an object")
    verdict = record.get("verdict")
    if verdict not in (VERIFIED, FALSIFIED, UNKNOWN):
        fields.bad(f"{where}.verdict", f"is {verdict!r}, not verified, falsified or unknown")
    method = record.get("method")
    if method is not None and not isinstance(method, str):
        fields.bad(f"{where}.method", "is not a method name")
    if verdict != UNKNOWN and method is None:
        fields.bad(f"{where}.method", f"is missing for a {verdict} sample")
    bound = record.get("margin_lower_bound")
    if bound is not None and not is_finite_number(bound):
        fields.bad(f"{where}.margin_lower_bound", "is not null or a number")
    reused = record.get("reused_from")
    if reused is not None and not (is_finite_number(reused) and reused > 0):
        fields.bad(f"{where}.reused_from", "is not null or an eps")
    return Claim(eps, fields.integer(record, "index", where, minimum=0), fields.integer(record, "label", where, minimum=0),
                 fields.integer(record, "prediction", where, minimum=0), verdict, method,
                 None if bound is None else float(bound), None if reused is None else float(reused))


class _Fields:
    """Typed reads of the report's fields; a damaged one is a UserError that names it."""

    def __init__(self, path: Path):
        self.path = path

    def bad(self, where: str, problem: str):
        raise UserError(f"the report {self.path} is damaged: {where} {problem}", _RECREATE)

    def get(self, parent: dict, key: str, kind: type, where: str = ""):
        name = f"{where}.{key}" if where else key
        if not isinstance(parent, dict) or key not in parent:
            self.bad(name, "is missing")
        value = parent[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.bad(name, f"is not a{'n' if kind.__name__[0] in 'aeiou' else ''} {kind.__name__}")
        return value

    def integer(self, parent: dict, key: str, where: str, minimum: int | None = None) -> int:
        value = self.get(parent, key, int, where)
        if minimum is not None and value < minimum:
            self.bad(f"{where}.{key}", f"is below {minimum}")
        return value

    def number(self, parent: dict, key: str, where: str) -> float:
        value = parent.get(key) if isinstance(parent, dict) else None
        if not (is_finite_number(value) and value > 0):
            self.bad(f"{where}.{key}", "is not a positive number")
        return float(value)
