"""`certify --norm 2`: l2 balls of radius eps in pixel units, on the conftest CNN exported to ONNX.

The bounds of every method lie below every margin found by dense sampling in the ball (directions
on the sphere, several radii, clipped to the pixel range) and by PGD-l2; a sample verified at l2
survives PGD-l2 with restarts; every counterexample lies in the ball and the range; the bisected
l2 radii are radii where the cascade verifies; a bad --norm is one line, exit code 2.
"""

from __future__ import annotations

import json

import pytest
import test_soundness
import torch
from typer.testing import CliRunner

from certify.attacks.gradient import PGD, find_adversarial, in_l2_ball
from certify.bounds.bounder import (MarginBounder, empirical_margins,
                                    margin_matrix)
from certify.cli import app
from certify.data.datasets import load_dataset
from certify.onnx_import.certifiable import load_certifiable
from certify.reports.report import report_document, summary_table
from certify.verdicts.cascade import (FALSIFIED, UNKNOWN, VERIFIED,
                                      CascadeOptions, certify_batch,
                                      lower_bounds)
from certify.verdicts.dataset import certify_model

# The same exported CNN and its imported module as the l-infinity soundness tests (pytest fixtures).
cnn_onnx, module = test_soundness.cnn_onnx, test_soundness.module

SAMPLES = 6
EPS = [0.1, 1.5]  # l2, pixel units: most samples verify at the small one, some fall at the large one


@pytest.fixture(scope="module")
def data():
    test = load_dataset("mnist", "test")
    return test.x[:SAMPLES].reshape(-1, 1, 28, 28), test.y[:SAMPLES]


@pytest.fixture(scope="module")
def run(cnn_onnx):
    return certify_model(cnn_onnx, EPS, limit=SAMPLES, batch_size=SAMPLES, methods=("ibp", "crown"),
                         attack_steps=30, quiet=True, norm="2")


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _ball_points(x: torch.Tensor, eps: float, count: int, seed: int) -> torch.Tensor:
    """`count` points of the l2 ball around one image, clipped to [0, 1] (clipping never leaves the
    ball: the centre lies in the range): half on the sphere, the rest at random radii."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(count, *x.shape, generator=generator)
    direction /= direction.flatten(1).norm(dim=1).view(-1, *([1] * x.dim()))
    radius = torch.rand(count, generator=generator)
    radius[: count // 2] = 1.0
    return (x + direction * (radius * eps).view(-1, *([1] * x.dim()))).clamp(0, 1)


def _l2_attack(module, x, y, eps: float, *, restarts: int, seed: int):
    """PGD-l2 twice: the cascade's search and the independent PGD class (its own projection)."""
    lower, upper = _box(x, eps)
    radii = torch.full((x.shape[0],), eps, dtype=torch.float64)
    found, adversarial = find_adversarial(module, x, y, lower, upper, steps=100, restarts=restarts, seed=seed,
                                          l2_ball=(x, radii))
    other = PGD(module, eps, norm="2", steps=100, restarts=restarts, loss="margin",
                generator=torch.Generator().manual_seed(seed))(x, y)
    return found, adversarial, other


@pytest.mark.parametrize("method,rows", [("ibp", SAMPLES), ("crown", SAMPLES), ("alpha-crown", 1)])
def test_l2_bounds_lie_below_sampled_and_attacked_margins(module, data, method, rows):
    x, y = data[0][:rows], data[1][:rows]
    eps = 0.5
    lower, upper = _box(x, eps)
    bounder = MarginBounder(module, (1, 28, 28))
    radii = torch.full((rows,), eps, dtype=torch.float64)
    bound = lower_bounds(bounder, lower, upper, margin_matrix(y, 10), method, l2_ball=(x, radii))
    assert torch.isfinite(bound).all()
    # the ball is much smaller than its bounding box: its bound must be the tighter one
    box_bound = lower_bounds(bounder, lower, upper, margin_matrix(y, 10), method)
    assert (bound >= box_bound - 1e-4).all() and (bound > box_bound + 1e-2).any()
    found, adversarial, other = _l2_attack(module, x, y, eps, restarts=3, seed=5)
    assert in_l2_ball(adversarial, x, radii).all() and in_l2_ball(other, x, radii * (1 + 1e-5)).all()
    with torch.no_grad():
        for points in (adversarial, other):
            assert (bound <= empirical_margins(module(points), y) + 1e-5).all()
    for i in range(rows):
        points = _ball_points(x[i], eps, 2_000, seed=300 + i)
        with torch.no_grad():
            margins = empirical_margins(module(points), y[i].expand(len(points)))
        assert (bound[i] <= margins.min(0).values + 1e-5).all(), i


def _decided_here(run, verdict: str) -> list[tuple[float, torch.Tensor]]:
    """(eps, rows) of the samples given `verdict` at eps itself (not carried over from another eps)."""
    decided = [(eps, [s.index for s in result.samples if s.verdict == verdict and s.reused_from is None])
               for eps, result in zip(EPS, run.results)]
    return [(eps, torch.tensor(rows)) for eps, rows in decided if rows]


def test_verified_at_l2_survives_pgd_l2(run, module, data):
    x, y = data
    decided = _decided_here(run, VERIFIED)
    assert sum(len(rows) for _, rows in decided) >= SAMPLES // 2
    for eps, rows in decided:
        found, _, other = _l2_attack(module, x[rows], y[rows], eps, restarts=10, seed=17)
        assert not found.any(), f"PGD-l2 broke verified samples {rows[found].tolist()} at eps {eps}"
        with torch.no_grad():
            assert (module(other).argmax(1) == y[rows]).all()


def test_certify_model_l2_end_to_end(run, module, data):
    document = report_document(run)
    assert document["spec"]["norm"] == "2"
    assert document["spec"]["attack"]["kind"] == "pgd-l2-margin"
    assert "l2" in str(summary_table(run).title)
    for result in run.results:
        s = result.summary()
        assert s["verified"] + s["falsified"] + s["unknown"] == SAMPLES
        assert all(v.verdict in (VERIFIED, FALSIFIED, UNKNOWN) for v in result.samples)
    assert run.results[0].summary()["verified"] >= SAMPLES // 2
    assert run.results[-1].summary()["falsified"] >= 1
    # a falsified verdict at l2 eps has a counterexample in the ball and the range
    x, y = data
    falsified = _decided_here(run, FALSIFIED)
    assert falsified
    for eps, rows in falsified:
        assert all(run.results[EPS.index(eps)].samples[i].method == "pgd" for i in rows.tolist())
        found, adversarial, _ = _l2_attack(module, x[rows], y[rows], eps, restarts=10, seed=23)
        radii = torch.full((len(rows),), eps, dtype=torch.float64)
        assert found.all() and in_l2_ball(adversarial, x[rows], radii).all()
        assert ((adversarial >= 0) & (adversarial <= 1)).all()
        with torch.no_grad():
            assert (module(adversarial).argmax(1) != y[rows]).all()


def test_l2_linf_boxes_are_not_l2_balls(cnn_onnx):
    """The same eps in l2 is a far smaller region than in l-inf: fewer samples fall at l2."""
    linf = certify_model(cnn_onnx, [0.1], limit=SAMPLES, batch_size=SAMPLES, methods=("crown",), attack_steps=20,
                         quiet=True)
    l2 = certify_model(cnn_onnx, [0.1], limit=SAMPLES, batch_size=SAMPLES, methods=("crown",), attack_steps=20,
                       quiet=True, norm="2")
    assert linf.spec.norm == "inf" and l2.spec.norm == "2"
    assert l2.results[0].summary()["verified"] > linf.results[0].summary()["verified"]


def test_l2_radius_is_verified_at_the_radius(cnn_onnx, module, data):
    run = certify_model(cnn_onnx, [], limit=4, batch_size=4, methods=("ibp", "crown"), attack_steps=20,
                        quiet=True, norm="2", radius=True, radius_tol=0.02, radius_max=2.0)
    records = run.radius.samples
    assert any(r.radius > 0 for r in records)
    x, y = data
    rows = [r.index for r in records if r.radius > 0]
    rows_t = torch.tensor(rows)
    radii = torch.tensor([r.radius for r in records if r.radius > 0], dtype=torch.float64)
    assert all(r.radius <= r.upper <= r.radius + 0.02 + 1e-9 for r in records)
    bounder = MarginBounder(module, (1, 28, 28))
    box = (torch.cat([_box(x[i:i + 1], float(r))[0] for i, r in zip(rows, radii)]),
           torch.cat([_box(x[i:i + 1], float(r))[1] for i, r in zip(rows, radii)]))
    verdicts = certify_batch(module, bounder, x[rows_t], y[rows_t], box, rows,
                             CascadeOptions(methods=("ibp", "crown"), attack=False), l2_radii=radii)
    assert all(v.verdict == VERIFIED for v in verdicts), [v.verdict for v in verdicts]
    for i, r in zip(rows, radii):
        found, _, _ = _l2_attack(module, x[i:i + 1], y[i:i + 1], float(r), restarts=5, seed=41)
        assert not found.any(), i


@pytest.mark.parametrize("args,expected", [(["--norm", "3"], "unknown --norm '3'"),
                                           (["--norm", "2", "--vnnlib", "p.vnnlib"], "--norm does not apply")])
def test_bad_norm_is_one_line_exit_2(cnn_onnx, args, expected):
    eps = [] if "--vnnlib" in args else ["--eps", "0.1"]
    result = CliRunner().invoke(app, [str(cnn_onnx), *eps, *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.output


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_l2_bounds_hold_behind_a_normalization(cnn_onnx, data, method):
    """With --mean/--std the ball stays in pixel space: the Normalize module is part of the bounded
    graph, so the bound must hold for pixel-space points of the ball through the normalized model."""
    from certify.specs.input_spec import InputSpec
    from certify.verdicts.file_outputs import certified_module

    model = load_certifiable(cnn_onnx)
    spec = InputSpec(mean=[0.1307], std=[0.3081], norm="2")
    module, bounder, _ = certified_module(cnn_onnx, model, spec, torch.device("cpu"))
    x, y = data
    eps = 0.3
    lower, upper = _box(x, eps)
    radii = torch.full((x.shape[0],), eps, dtype=torch.float64)
    bound = lower_bounds(bounder, lower, upper, margin_matrix(y, 10), method, l2_ball=(x, radii))
    assert torch.isfinite(bound).all()
    _, adversarial, _ = _l2_attack(module, x, y, eps, restarts=2, seed=7)
    with torch.no_grad():
        assert (bound <= empirical_margins(module(adversarial), y) + 1e-5).all()
    for i in range(x.shape[0]):
        points = _ball_points(x[i], eps, 1_000, seed=500 + i)
        with torch.no_grad():
            margins = empirical_margins(module(points), y[i].expand(len(points)))
        assert (bound[i] <= margins.min(0).values + 1e-5).all(), i


def test_branch_and_bound_searches_l2_balls_from_the_command_line(cnn_onnx, module, data, tmp_path):
    """--norm 2 --timeout: what CROWN leaves open at l2 is searched (not "not applicable"), and every
    sample the search verifies survives PGD-l2 with restarts."""
    out = tmp_path / "l2_bab.json"
    result = CliRunner().invoke(app, [str(cnn_onnx), "--norm", "2", "--eps", "0.2", "--limit", str(SAMPLES),
                                      "--method", "ibp,crown,bab", "--timeout", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    samples = json.loads(out.read_text())["results"][0]["per_sample"]
    searched = [s for s in samples if s["bab"] is not None]
    assert searched, "eps 0.2 leaves samples that CROWN cannot decide"
    assert all(s["bab"]["method"] == "bab" and s["bab"]["reason"] != "not applicable" for s in searched)
    proved = torch.tensor([s["index"] for s in samples if s["method"] == "bab" and s["verdict"] == VERIFIED])
    assert len(proved), "the search proves a sample that IBP and CROWN leave open"
    x, y = data
    found, _, other = _l2_attack(module, x[proved], y[proved], 0.2, restarts=10, seed=29)
    assert not found.any()
    with torch.no_grad():
        assert (module(other).argmax(1) == y[proved]).all()
