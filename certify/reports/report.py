"""Reports of a certification run: a JSON certificate for machines, a table for people.

Two documents, told apart by "schema":
- "harden.certify/1": a model certified on a dataset at several eps (and optionally per-sample
  certified radii);
- "harden.certify.specs.vnnlib/1": VNN-LIB properties checked on ONNX models.
Both name the exact files (sha256), the spec and the tool versions. The schemas are documented
in the README ("certify report format").
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

from rich.table import Table

from certify.bounds.compat import applied_patches
from certify.verdicts.dataset import CertifyRun
from certify.common.errors import UserError
from certify.common.files import atomic_path, sha256_file
from certify.verdicts.vnnlib_check import SAT, UNKNOWN, UNSAT, VnnlibRun

REPORT_SCHEMA = "harden.certify/1"
VNNLIB_SCHEMA = "harden.certify.specs.vnnlib/1"


def tool_versions() -> dict:
    versions = {}
    for package in ("harden", "torch", "auto_LiRPA", "onnx", "onnxruntime-gpu", "onnxruntime", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    versions["auto_LiRPA_patches"] = applied_patches()
    return versions


def _norm_name(norm: str) -> str:
    return "l-inf" if norm == "inf" else f"l{norm}"


def _attack_json(options, norm: str = "inf") -> dict:
    return {"enabled": options.attack, "kind": f"pgd-{'linf' if norm == 'inf' else 'l' + norm}-margin",
            "steps": options.attack_steps,
            "restarts": options.attack_restarts}


def report_document(run: CertifyRun) -> dict:
    radius = None
    if run.radius is not None:
        radius = {**run.radius.summary(), "per_sample": [r.to_json() for r in run.radius.samples]}
    return {
        "schema": REPORT_SCHEMA,
        "model": {"path": run.model_path, "sha256": run.model_sha256, "input_shape": list(run.input_shape),
                  "graph_normalization": run.graph_normalization},
        "spec": {**run.spec.to_json(), "dataset": run.dataset, "split": run.split,
                 "methods": list(run.options.methods), "attack": _attack_json(run.options, run.spec.norm),
                 "seed": run.options.seed},
        "tools": tool_versions(),
        "run": {"world_size": run.world_size, "batch_size": run.batch_size, "device": run.device,
                "seconds": round(run.seconds, 3)},
        "results": [{**result.summary(), "per_sample": [s.to_json() for s in result.samples]}
                    for result in run.results],
        "radius": radius,
        "lipschitz": run.lipschitz,
    }


def vnnlib_document(run: VnnlibRun) -> dict:
    return {
        "schema": VNNLIB_SCHEMA,
        "models": [{"path": path, **info} for path, info in run.models.items()],
        "spec": {"mean": run.spec.mean, "std": run.spec.std, "methods": list(run.options.methods),
                 "attack": {**_attack_json(run.options), "kind": "pgd-linf-spec"}, "seed": run.options.seed},
        "tools": tool_versions(),
        "run": {"world_size": run.world_size, "batch_size": run.batch_size, "device": run.device,
                "seconds": round(run.seconds, 3)},
        "summary": run.summary(),
        "properties": [{**p.to_json(), "vnnlib_sha256": p.vnnlib_sha256 or sha256_file(p.vnnlib)}
                       for p in run.properties],
        "skipped": run.skipped,
    }


def write_json(document: dict, path: str | Path) -> None:
    """Write the report whole or not at all (a temporary file renamed into place)."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(document, indent=1))
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error})",
                        "choose a writable folder with free space") from None


def summary_table(run: CertifyRun) -> Table:
    table = Table(title=f"certify {Path(run.model_path).name} on {run.dataset} ({run.split}), "
                        f"{_norm_name(run.spec.norm)}, methods {'+'.join(run.options.methods)}")
    for column in ("eps", "samples", "clean", "attacked", "certified", "verified by", "unknown", "time"):
        table.add_column(column, justify="right")
    for result in run.results:
        s = result.summary()
        by = ", ".join(f"{k} {v}" for k, v in s["verified_by"].items()) or "-"
        table.add_row(f"{s['eps']:g}", str(s["samples"]), f"{100 * s['clean_accuracy']:.1f}%",
                      f"{100 * s['attacked_accuracy']:.1f}%", f"{100 * s['certified_accuracy']:.1f}%",
                      by, f"{s['unknown']} {unknown_why([v.bab for v in result.samples if v.verdict == 'unknown'])}".strip(),
                      f"{s['seconds']:.1f} s")
    return table


def unknown_why(searches: list[dict | None]) -> str:
    """Why branch and bound left these unknown, counted by reason: "(timeout 2, domain limit 1)"."""
    reasons: dict[str, int] = {}
    for search in searches:
        if search is not None and search.get("result") == "unknown":
            reasons[search["reason"]] = reasons.get(search["reason"], 0) + 1
    return f"({', '.join(f'{reason} {count}' for reason, count in reasons.items())})" if reasons else ""


def radius_table(run: CertifyRun) -> Table:
    s = run.radius.summary()
    table = Table(title=f"certified {_norm_name(run.spec.norm)} radius per sample (bisection to {s['tolerance']:g}, "
                        f"up to {s['max_eps_searched']:g})")
    for column in ("samples", "mean", "median", "min", "max", "radius > 0", "attack found", "time"):
        table.add_column(column, justify="right")
    table.add_row(str(s["samples"]), f"{s['mean']:.4f}", f"{s['median']:.4f}", f"{s['min']:.4f}",
                  f"{s['max']:.4f}", str(s["certified_nonzero"]), str(s["falsified_by_attack"]),
                  f"{s['seconds']:.1f} s")
    return table


def vnnlib_table(run: VnnlibRun) -> Table:
    table = Table(title=f"VNN-LIB: {len(run.properties)} properties, methods {'+'.join(run.options.methods)}")
    for column in ("model", "properties", "unsat (verified)", "sat (counterexample)", "unknown", "time"):
        table.add_column(column, justify="right")
    summary = run.summary()
    for path, s in summary["per_model"].items():
        table.add_row(Path(path).name, str(s["properties"]), str(s[UNSAT]), str(s[SAT]), str(s[UNKNOWN]),
                      f"{s['seconds']:.1f} s")
    if len(summary["per_model"]) > 1:
        table.add_row("all", str(summary["properties"]), str(summary[UNSAT]), str(summary[SAT]),
                      str(summary[UNKNOWN]), f"{summary['seconds']:.1f} s")
    return table


def vnnlib_property_table(run: VnnlibRun) -> Table:
    table = Table(title="per property")
    for column in ("model", "property", "result", "by", "bound", "time"):
        table.add_column(column, justify="right")
    for p in run.properties:
        table.add_row(Path(p.onnx).name, Path(p.vnnlib).name, p.result, p.method or unknown_why([p.bab]) or "-",
                      "-" if p.bound is None else f"{p.bound:.4g}", f"{p.seconds:.2f} s")
    return table


def check_fail_under(threshold: float | None, run: CertifyRun | VnnlibRun) -> str | None:
    """The one-line reason to fail a CI gate, or None when the run passes (or no gate is set).

    Dataset runs: the certified accuracy at EVERY eps must reach the threshold. VNN-LIB runs: the
    fraction of properties verified (unsat).
    """
    if threshold is None:
        return None
    if isinstance(run, VnnlibRun):
        fraction = run.summary()["verified_fraction"]
        if fraction < threshold:
            return f"verified {fraction:.4f} of the properties, below --fail-under {threshold:g}"
        return None
    for result in run.results:
        accuracy = result.summary()["certified_accuracy"]
        if accuracy < threshold:
            return f"certified accuracy {accuracy:.4f} at eps {result.eps:g} is below --fail-under {threshold:g}"
    return None


def validate_fail_under(threshold: float | None, has_eps: bool, vnnlib: bool) -> None:
    if threshold is None:
        return
    if not (0.0 <= threshold <= 1.0) or threshold != threshold:
        raise UserError(f"--fail-under {threshold} is out of range", "give a fraction in [0, 1], e.g. 0.9")
    if not has_eps and not vnnlib:
        raise UserError("--fail-under gates the certified accuracy at the --eps values, and none is given",
                        "give --eps too")
