"""Reports of a certification run: a JSON certificate for machines, a table for people."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

from rich.table import Table

from certify.compat import applied_patches
from certify.engine import CertifyRun
from certify.files import atomic_path

REPORT_SCHEMA = "harden.certify/1"


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


def report_document(run: CertifyRun) -> dict:
    return {
        "schema": REPORT_SCHEMA,
        "model": {"path": run.model_path, "sha256": run.model_sha256, "input_shape": list(run.input_shape)},
        "spec": {**run.spec.to_json(), "dataset": run.dataset, "split": run.split,
                 "methods": list(run.options.methods), "attack": {
                     "enabled": run.options.attack, "kind": "pgd-linf-margin",
                     "steps": run.options.attack_steps, "restarts": run.options.attack_restarts},
                 "seed": run.options.seed},
        "tools": tool_versions(),
        "results": [{**result.summary(), "per_sample": [s.to_json() for s in result.samples]}
                    for result in run.results],
    }


def write_json(document: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1))


def summary_table(run: CertifyRun) -> Table:
    table = Table(title=f"certify {Path(run.model_path).name} on {run.dataset} ({run.split}), "
                        f"l-inf, methods {'+'.join(run.options.methods)}")
    for column in ("eps", "samples", "clean", "attacked", "certified", "verified by", "unknown", "time"):
        table.add_column(column, justify="right")
    for result in run.results:
        s = result.summary()
        by = ", ".join(f"{k} {v}" for k, v in s["verified_by"].items()) or "-"
        table.add_row(f"{s['eps']:g}", str(s["samples"]), f"{100 * s['clean_accuracy']:.1f}%",
                      f"{100 * s['attacked_accuracy']:.1f}%", f"{100 * s['certified_accuracy']:.1f}%",
                      by, str(s["unknown"]), f"{s['seconds']:.1f} s")
    return table
