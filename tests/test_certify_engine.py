"""The certification engine: reuse across eps, radius bisection, normalization, reports, CI gate,
sharding over two gloo ranks, exact repeats, and one-line errors -- on the small CNN really trained
on MNIST (conftest) and exported to ONNX."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from certify.verdicts.dataset import bisection_order, certify_model, graph_normalization
from certify.verdicts.cascade import FALSIFIED, VERIFIED

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.1307, 0.3081
CHEAP = dict(methods=("ibp", "crown"), attack_steps=20, quiet=True)


@pytest.fixture(scope="module")
def cnn_onnx(trained_small_cnn, tmp_path_factory) -> Path:
    from harden.io.export import export_onnx

    path = tmp_path_factory.mktemp("engine") / "cnn.onnx"
    export_onnx(trained_small_cnn, path)
    return path


def _records(run) -> list[list[tuple]]:
    """Per eps, per sample: everything but the time."""
    return [[(s.index, s.label, s.prediction, s.verdict, s.method, s.margin_lower_bound, s.reused_from)
             for s in result.samples] for result in run.results]


def test_bisection_order_visits_each_eps_once_middle_first():
    assert bisection_order([]) == []
    assert bisection_order([0.1]) == [0]
    assert bisection_order([1, 2, 3, 4, 5]) == [2, 0, 3, 1, 4]
    assert sorted(bisection_order(list(range(9)))) == list(range(9))


def test_reuse_across_eps_both_ways(cnn_onnx):
    eps = [0.005, 0.02, 0.04, 0.08]
    run = certify_model(cnn_onnx, eps, limit=12, batch_size=12, **CHEAP)
    assert [r.eps for r in run.results] == eps
    reused = {VERIFIED: 0, FALSIFIED: 0}
    for i in range(12):
        verdicts = [run.results[k].samples[i] for k in range(len(eps))]
        assert len({v.index for v in verdicts}) == 1
        kinds = [v.verdict for v in verdicts]
        # verified below the first non-verified eps only; falsified from the first falsified eps on
        first_not_verified = next((k for k, v in enumerate(kinds) if v != VERIFIED), len(eps))
        assert all(v != VERIFIED for v in kinds[first_not_verified:]), kinds
        first_falsified = next((k for k, v in enumerate(kinds) if v == FALSIFIED), len(eps))
        assert all(v == FALSIFIED for v in kinds[first_falsified:]), kinds
        for k, v in enumerate(verdicts):
            if v.reused_from is not None:
                reused[v.verdict] += 1
                assert v.seconds == 0.0
                # a verified verdict comes from a larger box, a falsified one from a smaller box
                assert (v.reused_from > eps[k]) if v.verdict == VERIFIED else (v.reused_from < eps[k])
                source = run.results[eps.index(v.reused_from)].samples[i]
                assert (source.verdict, source.method, source.reused_from) == (v.verdict, v.method, None)
    assert reused[VERIFIED] > 0 and reused[FALSIFIED] > 0, reused
    summaries = [r.summary() for r in run.results]
    assert summaries[0]["certified_accuracy"] >= 0.8  # CROWN proves the trained CNN at eps 0.005
    assert summaries[-1]["attacked_accuracy"] < summaries[0]["attacked_accuracy"]
    # against an independent recomputation: onnxruntime's predictions on the file itself
    from certify.data.datasets import load_dataset
    from certify.onnx_import.parity import onnxruntime_logits, onnxruntime_session

    test = load_dataset("mnist", "test")
    logits = onnxruntime_logits(onnxruntime_session(cnn_onnx), test.x[:12].reshape(12, 1, 28, 28))
    correct = torch.from_numpy(logits.argmax(1)) == test.y[:12]
    for s, result in zip(summaries, run.results):
        assert s["clean_accuracy"] == pytest.approx(correct.double().mean().item())
        clean_wrong = [v.index for v in result.samples if v.method == "clean"]
        assert clean_wrong == torch.nonzero(~correct).flatten().tolist()
        for kind in (VERIFIED, FALSIFIED, "unknown"):
            assert s[kind] == sum(v.verdict == kind for v in result.samples), kind
        assert s["certified_accuracy"] == pytest.approx(s["verified"] / 12)
        assert s["attacked_accuracy"] == pytest.approx(1 - s["falsified"] / 12)
        # no verified sample is misclassified by the file
        assert all(correct[v.index] for v in result.samples if v.verdict == VERIFIED)
    assert [s["certified_accuracy"] for s in summaries] == sorted((s["certified_accuracy"] for s in summaries), reverse=True)


def test_radius_bisection(cnn_onnx):
    from certify.attacks.gradient import find_adversarial
    from certify.data.datasets import load_dataset

    tol = 0.01
    run = certify_model(cnn_onnx, [0.02], limit=4, batch_size=4, radius=True, radius_tol=tol, radius_max=0.16,
                        **CHEAP)
    records = run.radius.samples
    assert [r.index for r in records] == list(range(4))
    at_002 = run.results[0].samples
    x = load_dataset("mnist", "test").x[:4]
    for r, v in zip(records, at_002):
        assert 0.0 <= r.radius <= r.upper <= 0.16
        assert r.upper - r.radius <= tol
        if v.verdict == VERIFIED:
            assert r.radius >= 0.02  # the --eps verdicts start the bisection
        if r.attack_upper is not None:
            assert r.attack_upper >= r.upper  # an adversarial example never lies within the radius
        if v.method == "clean":
            assert (r.radius, r.method) == (0.0, "clean")
        elif r.radius > 0:
            assert r.method in ("ibp", "crown")
    summary = run.radius.summary()
    radii = sorted(r.radius for r in records)
    assert summary["mean"] == pytest.approx(sum(radii) / 4)
    assert summary["median"] == pytest.approx((radii[1] + radii[2]) / 2)
    assert summary["certified_nonzero"] == sum(r > 0 for r in radii) >= 3
    # no adversarial example inside any certified radius
    from certify.onnx_import.certifiable import load_certifiable

    module = load_certifiable(cnn_onnx).module
    labels = torch.tensor([r.label for r in records])
    radius = torch.tensor([r.radius for r in records]).view(-1, 1, 1, 1)
    found, _ = find_adversarial(module, x, labels, (x - radius).clamp(0, 1), (x + radius).clamp(0, 1),
                                steps=50, restarts=5, seed=3)
    correct = torch.tensor([r.method != "clean" for r in records])
    assert not (found & correct).any()


class _ExpectsNormalized(nn.Module):
    """The trained CNN behind an input that must be normalized first: g(z) = f(z * std + mean).
    Per-channel (1, C, 1, 1) constants, as exporters write them: auto_LiRPA 0.3 bounds an
    element-wise op by a constant before a conv only with a 4-D constant (see the report)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.full((1, 1, 1, 1), MEAN))
        self.register_buffer("std", torch.full((1, 1, 1, 1), STD))

    def forward(self, z):
        return self.inner(z * self.std + self.mean)


class _NormalizesItself(_ExpectsNormalized):
    """A graph that starts with its own normalization: h(x) = g((x - mean) / std) = f(x)."""

    def forward(self, x):
        return super().forward((x - self.mean) / self.std)


def test_normalization_outside_and_inside_the_graph(trained_small_cnn, cnn_onnx, tmp_path):
    import copy

    from harden.io.export import module_to_onnx_bytes

    inner = copy.deepcopy(trained_small_cnn.module).eval()
    expects = tmp_path / "expects_normalized.onnx"
    expects.write_bytes(module_to_onnx_bytes(_ExpectsNormalized(inner), (1, 28, 28)))
    itself = tmp_path / "normalizes_itself.onnx"
    itself.write_bytes(module_to_onnx_bytes(_NormalizesItself(inner), (1, 28, 28)))
    assert graph_normalization(itself)[:2] == ["Sub", "Div"]
    assert graph_normalization(expects) == ["Mul", "Add"]
    assert graph_normalization(cnn_onnx) == []

    options = dict(limit=6, batch_size=6, attack=False, methods=("ibp", "crown"), quiet=True)
    plain = certify_model(cnn_onnx, [0.02], **options)
    outside = certify_model(expects, [0.02], data="mnist", mean=[MEAN], std=[STD], **options)
    inside = certify_model(itself, [0.02], data="mnist", **options)
    assert inside.graph_normalization[:2] == ["Sub", "Div"] and outside.spec.mean == [MEAN]
    for other in (outside, inside):
        for ours, theirs in zip(plain.results, other.results):
            assert [s.verdict for s in ours.samples] == [s.verdict for s in theirs.samples]
            for a, b in zip(ours.samples, theirs.samples):
                # the same function on the same pixel box: the same bounds up to float rounding
                assert a.margin_lower_bound == pytest.approx(b.margin_lower_bound, abs=2e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_give_the_one_process_verdicts(cnn_onnx, tmp_path):
    args = ["--eps", "0.01", "--eps", "0.05", "--limit", "4", "--batch-size", "1", "--method", "ibp,crown",
            "--attack-steps", "10", "--radius", "--radius-tol", "0.04", "--radius-max", "0.2", "--seed", "5", "--quiet"]
    report = tmp_path / "sharded.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                             "-m", "certify", str(cnn_onnx), *args, "--json", str(report)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(report.read_text())
    assert sharded["run"]["world_size"] == 2

    options = dict(limit=4, batch_size=1, methods=("ibp", "crown"), attack_steps=10, radius=True, radius_tol=0.04,
                   radius_max=0.2, seed=5, quiet=True)
    one = certify_model(cnn_onnx, [0.01, 0.05], **options)
    again = certify_model(cnn_onnx, [0.01, 0.05], **options)
    assert _records(one) == _records(again)  # --seed repeats a run exactly
    keys = ("index", "label", "prediction", "verdict", "method", "reused_from")
    for ours, theirs in zip(one.results, sharded["results"]):
        assert [s["index"] for s in theirs["per_sample"]] == list(range(4))
        assert [tuple(getattr(s, k) for k in keys) for s in ours.samples] == \
            [tuple(s[k] for k in keys) for s in theirs["per_sample"]]
        for s, t in zip(ours.samples, theirs["per_sample"]):
            assert (s.margin_lower_bound is None) == (t["margin_lower_bound"] is None)
            if s.margin_lower_bound is not None:
                assert s.margin_lower_bound == pytest.approx(t["margin_lower_bound"], abs=1e-4)
    assert [(r.index, r.radius, r.upper, r.method) for r in one.radius.samples] == \
        [(r["index"], r["radius"], r["upper"], r["method"]) for r in sharded["radius"]["per_sample"]]


def _cli(*args: str):
    from certify.cli import app

    return CliRunner().invoke(app, [*args, "--quiet"])


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and "Warning" not in line and "warnings.warn" not in line]


def test_cli_report_plot_and_fail_under(cnn_onnx, tmp_path):
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    result = _cli(str(cnn_onnx), "--eps", "0.01", "--eps", "0.3", "--limit", "6", "--method", "ibp,crown",
                  "--attack-steps", "10", "--radius", "--radius-tol", "0.02", "--fail-under", "0.5",
                  "--json", str(report), "--plot", str(plot))
    assert result.exit_code == 1, result.stderr
    assert _lines(result.stderr)[-1].startswith("fail: certified accuracy 0.0000 at eps 0.3 is below --fail-under 0.5")
    document = json.loads(report.read_text())  # the gate fails the job, the report is still whole
    assert document["schema"] == "harden.certify/1"
    assert set(document) >= {"model", "spec", "tools", "run", "results", "radius"}
    assert document["spec"]["methods"] == ["ibp", "crown"] and document["spec"]["input_range"] == [0.0, 1.0]
    first = document["results"][0]
    assert set(first) >= {"eps", "samples", "clean_accuracy", "attacked_accuracy", "certified_accuracy",
                          "verified", "falsified", "unknown", "verified_by", "reused", "seconds", "per_sample"}
    assert set(first["per_sample"][0]) == {"index", "label", "prediction", "verdict", "method",
                                           "margin_lower_bound", "seconds", "reused_from", "bab"}
    assert all(s["bab"] is None for s in first["per_sample"])  # no --timeout: no branch and bound
    assert set(document["radius"]["per_sample"][0]) == {"index", "label", "prediction", "radius", "upper",
                                                       "attack_upper", "method", "seconds", "out_of_time"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    passing = _cli(str(cnn_onnx), "--eps", "0.01", "--limit", "4", "--method", "ibp,crown", "--attack-steps", "5",
                   "--fail-under", "0.5")
    assert passing.exit_code == 0, passing.stderr


def test_bad_inputs_are_one_line_and_leave_no_report(cnn_onnx, tmp_path):
    report = tmp_path / "r.json"
    broken = tmp_path / "broken.vnnlib"
    broken.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 0.5)\n")
    small = tmp_path / "small.vnnlib"  # 2 inputs, 2 outputs: not the CNN's 784 / 10
    small.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                     "(declare-const Y_1 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 1))\n"
                     "(assert (>= X_1 0))\n(assert (<= Y_0 Y_1))\n")
    cases = {
        ("--eps", "0"): "eps 0.0 is out of range",
        ("--eps", "1.5"): "eps 1.5 is out of range",
        ("--eps", "0.1", "--radius", "--radius-tol", "0"): "--radius-tol",
        ("--eps", "0.1", "--fail-under", "2"): "--fail-under 2.0 is out of range",
        ("--eps", "0.1", "--plot", str(tmp_path / "p.txt")): "cannot write a plot",
        ("--eps", "0.1", "--method", "beta-crown"): "unknown --method",
        ("--eps", "0.1", "--device", "gpu"): "--device",
        ("--vnnlib", str(broken)): "broken.vnnlib:3",
        ("--vnnlib", str(small)): "declares 2 inputs",
        ("--vnnlib", str(small), "--eps", "0.1"): "--vnnlib takes its boxes from the files",
    }
    for args, message in cases.items():
        limit = () if "--vnnlib" in args else ("--limit", "2")  # --limit does not apply to --vnnlib
        result = _cli(str(cnn_onnx), *args, *limit, "--json", str(report))
        lines = _lines(result.stderr)
        assert result.exit_code == 2, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, lines)
        assert not report.exists() and not any(tmp_path.glob("*.partial")), args
