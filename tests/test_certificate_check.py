"""`certify check REPORT.json`: a real certificate holds for its file; a changed file, a tampered
verdict, a forged counterexample or a damaged report do not, each with the right exit code.

The report comes from a real run of the command line on a small MLP trained on real MNIST; the
tampering is done the way a careful forger would, keeping the report's counts and its reuse links
consistent, so that only recomputing the verdicts can catch it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

import harden
from certify.check_cli import check_app
from certify.cli import app

ROOT = Path(__file__).resolve().parents[1]
EPS = (0.01, 0.1)


@pytest.fixture(scope="module")
def certified(tmp_path_factory, mnist_test) -> Path:
    """A folder with m.onnx and r.json, the report of `certify m.onnx --eps 0.01 --eps 0.1 --json r.json`."""
    folder = tmp_path_factory.mktemp("certified")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    harden.finetune(model, mnist_test.x[1000:3000], mnist_test.y[1000:3000], objective="clean", lr=1e-2,
                    batch_size=64, seed=0)
    harden.export_module(model, folder / "m.onnx", input_shape=(1, 28, 28), dataset="mnist")
    result = CliRunner().invoke(app, [str(folder / "m.onnx"), *[a for e in EPS for a in ("--eps", str(e))],
                                      "--limit", "30", "--method", "ibp,crown", "--attack-steps", "20",
                                      "--json", str(folder / "r.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "r.json").read_text())
    verdicts = {(s["verdict"], s["method"]) for r in report["results"] for s in r["per_sample"]}
    assert ("falsified", "pgd") in verdicts and any(v == "verified" for v, _ in verdicts)
    return folder


def check(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(check_app, [*args, "--quiet"])
    return result.exit_code, result.output


def forge(folder: Path, index: int, k: int, **fields) -> Path:
    """A copy of the report with sample `index` at results[k] changed, kept self-consistent: reuse
    links to the changed record are cut and every count is recomputed."""
    report = json.loads((folder / "r.json").read_text())
    eps = report["results"][k]["eps"]
    for result in report["results"]:
        for record in result["per_sample"]:
            if record["index"] == index and record["reused_from"] == eps:
                record["reused_from"] = None
    record = next(r for r in report["results"][k]["per_sample"] if r["index"] == index)
    record.update(fields, reused_from=None)
    for result in report["results"]:
        samples = result["per_sample"]
        for verdict in ("verified", "falsified", "unknown"):
            result[verdict] = sum(s["verdict"] == verdict for s in samples)
        result["verified_by"] = {}
        for s in samples:
            if s["verdict"] == "verified":
                result["verified_by"][s["method"]] = result["verified_by"].get(s["method"], 0) + 1
        result["certified_accuracy"] = result["verified"] / len(samples)
        result["attacked_accuracy"] = 1 - result["falsified"] / len(samples)
    path = folder / f"forged_{index}_{k}.json"
    path.write_text(json.dumps(report))
    return path


def records(folder: Path) -> list[list[dict]]:
    return [r["per_sample"] for r in json.loads((folder / "r.json").read_text())["results"]]


def test_a_real_certificate_holds_from_the_command_line(certified):
    # Through `python -m certify check`: the dispatch beside `certify MODEL --eps ...` (see the fixture).
    done = subprocess.run([sys.executable, "-m", "certify", "check", str(certified / "r.json"), "--sample", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "the certificate holds" in done.stdout and "sha256" in done.stderr
    assert check(str(certified / "r.json"), "--all") == (0, f"the certificate holds for {certified / 'm.onnx'}\n")


def test_a_changed_weight_fails_the_hash(certified):
    model = onnx.load(str(certified / "m.onnx"))
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 1e-3
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(certified / "changed.onnx"))
    code, output = check(str(certified / "r.json"), "--model", str(certified / "changed.onnx"))
    assert code == 1 and "sha256" in output and "does not hold" in output


def test_a_falsified_sample_flipped_to_verified_fails(certified):
    per_eps = records(certified)
    k, target = next((k, s) for k, samples in enumerate(per_eps) for s in samples
                     if s["verdict"] == "falsified" and s["method"] == "pgd" and s["reused_from"] is None)
    forged = forge(certified, target["index"], k, verdict="verified", method="crown", margin_lower_bound=0.5)
    code, output = check(str(forged), "--all")
    assert code == 1 and f"sample {target['index']} at eps" in output and "recomputed margin bound" in output


def test_a_forged_counterexample_fails(certified):
    per_eps = records(certified)
    top = len(per_eps) - 1  # verified at the largest eps: robust at every eps of the report
    target = next(s for s in per_eps[top] if s["verdict"] == "verified")
    forged = forge(certified, target["index"], top, verdict="falsified", method="pgd", margin_lower_bound=None)
    code, output = check(str(forged), "--all")
    assert code == 1 and "no counterexample was found again" in output


def retag(report: dict, key: str) -> None:
    """Change the label (or the prediction) of a sample that is never verified, at every eps, to
    another class than its prediction (label): the report stays consistent with itself."""
    per_eps = [result["per_sample"] for result in report["results"]]
    column = next(i for i in range(len(per_eps[0])) if all(samples[i]["verdict"] != "verified" for samples in per_eps)
                  and per_eps[0][i]["method"] != "clean")
    other = "prediction" if key == "label" else "label"
    for samples in per_eps:
        samples[column][key] = (samples[column][other] + 1) % 10


@pytest.mark.parametrize("tamper, message", [
    (lambda r: r["results"][0].update(verified=r["results"][0]["verified"] + 1), "add up to"),
    (lambda r: retag(r, "label"), "label"),
    (lambda r: retag(r, "prediction"), "onnxruntime predicts"),
])
def test_an_inconsistent_report_does_not_hold(certified, tamper, message):
    report = json.loads((certified / "r.json").read_text())
    tamper(report)
    (certified / "t.json").write_text(json.dumps(report))
    code, output = check(str(certified / "t.json"), "--sample", "0")
    assert code == 1 and message in output, output


@pytest.mark.parametrize("damage", ["truncated", "no sha256", "verdict", "not json", "vnnlib", "no model file"])
def test_a_corrupt_report_is_one_line_exit_2(certified, damage):
    text = (certified / "r.json").read_text()
    report = json.loads(text)
    if damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "no sha256":
        del report["model"]["sha256"]
    elif damage == "verdict":
        report["results"][1]["per_sample"][3]["verdict"] = "probably"
    elif damage == "not json":
        text = "\x00\x01 binary"
    elif damage == "vnnlib":
        report["schema"] = "harden.certify.specs.vnnlib/1"
    else:
        report["model"]["path"] = str(certified / "gone.onnx")
    if damage not in ("truncated", "not json"):
        text = json.dumps(report)
    (certified / "c.json").write_text(text)
    code, output = check(str(certified / "c.json"))
    assert code == 2 and output.startswith("error: ") and output.count("\n") == 1, output
