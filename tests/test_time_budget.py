"""Bounded runtimes of the cascade: a failing bound method is contained per batch, alpha-CROWN is
skipped on samples whose CROWN bound is hopeless, and `certify --radius` has a per-sample budget
and prints progress lines."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from certify.bounds.bounder import MarginBounder, empirical_margins
from certify.cli import app as certify_app
from certify.common import progress
from certify.common.errors import UserError
from certify.specs.input_spec import InputSpec
from certify.verdicts import stages
from certify.verdicts.cascade import (FALSIFIED, UNKNOWN, VERIFIED,
                                      CascadeOptions, _SampleBatch,
                                      certify_batch)
from certify.verdicts.radius import bisect_radius


def conv_bn_maxpool() -> nn.Module:
    """The kind of user model on which auto_LiRPA 0.3's alpha-CROWN ends in an AssertionError."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, 10)).eval()


def trained_mlp(mnist_train) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(60):
        x, y = mnist_train.x[step * 50:(step + 1) * 50], mnist_train.y[step * 50:(step + 1) * 50]
        loss = nn.functional.cross_entropy(model(x.reshape(-1, 1, 28, 28)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def box(x: torch.Tensor, eps: float):
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


class FailingAlphaCROWN(stages.AlphaCROWN):
    """alpha-CROWN whose bound computation fails inside auto_LiRPA, as an unsupported relaxation does."""

    def run(self, problem, rows):
        raise RuntimeError("The size of tensor a (4) must match the size of tensor b (2) at non-singleton dimension 0")


def test_failing_alpha_crown_is_contained_to_its_batch(mnist_test, capsys):
    model = conv_bn_maxpool()
    x, y = mnist_test.x[:4].reshape(-1, 1, 28, 28), mnist_test.y[:4]
    with torch.no_grad():
        y = model(x).argmax(1)  # all correctly classified: every sample reaches the bounds
    bounder = MarginBounder(model, (1, 28, 28))
    batch = _SampleBatch(model, bounder, x, y, box(x, 0.02), CascadeOptions(attack=False), 0)
    stages.run_stages([FailingAlphaCROWN()], batch)
    assert batch.verdict == [UNKNOWN] * 4
    assert bool(torch.isinf(batch.best).all())  # no bound was recorded
    warning = capsys.readouterr().err
    assert "warning: alpha-crown failed on a batch of 4 (RuntimeError: The size of tensor a" in warning
    assert len(warning.strip().splitlines()) == 1
    # With CROWN first, its verdicts stand whatever alpha-CROWN does afterwards.
    with_crown = _SampleBatch(model, bounder, x, y, box(x, 0.0005), CascadeOptions(attack=False), 0)
    stages.run_stages([stages.CROWN(), FailingAlphaCROWN()], with_crown)
    assert with_crown.verdict == [VERIFIED] * 4


def test_alpha_crown_bounds_a_max_pool_net_soundly_and_at_least_as_tight_as_crown(mnist_test):
    """auto_LiRPA 0.3's own max-pool alpha cannot be built on this torch: the pooling keeps CROWN's
    relaxation while the ReLU alphas are optimised (certify.bounds.compat)."""
    model = conv_bn_maxpool()
    x = mnist_test.x[:4].reshape(-1, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    bounder = MarginBounder(model, (1, 28, 28))
    lower, upper = box(x, 0.01)
    crown = bounder.lower_margins(lower, upper, y, "crown")
    alpha = bounder.lower_margins(lower, upper, y, "alpha-crown")
    assert bool((alpha >= crown - 1e-5).all()) and bool((alpha > crown + 1e-4).any())
    points = lower.unsqueeze(1) + torch.rand(4, 500, 1, 28, 28, generator=torch.Generator().manual_seed(0)) \
        * (upper - lower).unsqueeze(1)
    with torch.no_grad():
        sampled = empirical_margins(model(points.reshape(-1, 1, 28, 28)), y.repeat_interleave(500)).view(4, 500, -1)
    assert bool((alpha <= sampled.min(1).values + 1e-5).all())


class RefusingBound(stages.Bound):
    """A bound stage whose failure is the user's: it must reach the user, not be contained."""

    name = "crown"

    def run(self, problem, rows):
        raise UserError("bad input", "fix it")


class BrokenAttack:
    name = "pgd"

    def run(self, problem, rows):
        raise ZeroDivisionError("an attack's own failure is a bug, not contained")


def test_user_errors_and_attack_failures_are_not_contained(mnist_test):
    model = conv_bn_maxpool()
    x, y = mnist_test.x[:2].reshape(-1, 1, 28, 28), mnist_test.y[:2]
    with torch.no_grad():
        y = model(x).argmax(1)
    batch = _SampleBatch(model, MarginBounder(model, (1, 28, 28)), x, y, box(x, 0.01), CascadeOptions(), 0)
    with pytest.raises(UserError):
        stages.run_stages([RefusingBound()], batch)
    with pytest.raises(ZeroDivisionError):
        stages.run_stages([BrokenAttack()], batch)


def test_hopeless_rows_follow_the_gap_rule(mnist_train, mnist_test):
    model = trained_mlp(mnist_train)
    x, y = mnist_test.x[:40].reshape(-1, 1, 28, 28), mnist_test.y[:40]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    bounder = MarginBounder(model, (1, 28, 28))
    batch = _SampleBatch(model, bounder, x, y, box(x, 0.08), CascadeOptions(attack=False), 0)
    rows = batch.open_rows()
    stages.CROWN().run(batch, rows)
    rows = batch.open_rows()
    skipped = stages.hopeless(batch, rows)
    assert 0 < int(skipped.sum()) < len(rows), "the box should leave both kinds of sample open"
    with torch.no_grad():
        margins = empirical_margins(model(x[rows]), y[rows])
    lower = batch.best[rows]
    needed = (-lower / (margins - lower)).where(lower < 0, torch.zeros_like(lower)).max(1).values
    assert torch.equal(skipped, needed > stages.HOPELESS_GAP_FRACTION)
    # Skipping only leaves samples unknown: never a verdict the full cascade would not give.
    options = CascadeOptions(methods=("ibp", "crown", "alpha-crown"), attack_steps=10, attack_restarts=1)
    with_skip = certify_batch(model, bounder, x, y, box(x, 0.08), list(range(len(y))), options)
    saved = stages.HOPELESS_GAP_FRACTION
    stages.HOPELESS_GAP_FRACTION = math.inf
    try:
        without = certify_batch(model, bounder, x, y, box(x, 0.08), list(range(len(y))), options)
    finally:
        stages.HOPELESS_GAP_FRACTION = saved
    for a, b in zip(with_skip, without):
        assert a.verdict == b.verdict or (a.verdict == UNKNOWN and b.verdict == VERIFIED), (a, b)
        if a.verdict == FALSIFIED:
            assert b.verdict == FALSIFIED


def test_radius_budget_stops_bisection_at_a_verified_radius(mnist_train, mnist_test):
    model = trained_mlp(mnist_train)
    x, y = mnist_test.x[:6].reshape(-1, 1, 28, 28), mnist_test.y[:6]
    bounder = MarginBounder(model, (1, 28, 28))
    spec = InputSpec(dataset="mnist")
    options = CascadeOptions(methods=("ibp", "crown"), attack_steps=5, attack_restarts=1)
    start = dict(lower=torch.zeros(6, dtype=torch.float64), upper=torch.full((6,), 0.5, dtype=torch.float64),
                 attack_upper=torch.full((6,), math.inf, dtype=torch.float64), seed=0)
    lines: list[str] = []
    full = bisect_radius(model, bounder, spec, x, y, list(range(6)), options, tolerance=1e-3, **start,
                         progress=lines.append)
    short = bisect_radius(model, bounder, spec, x, y, list(range(6)), options, tolerance=1e-3, **start,
                          budget=1e-9)
    assert lines and all(line.startswith("radius round ") for line in lines)
    assert not any(r.out_of_time for r in full)
    assert all(f.upper - f.radius <= 1e-3 for f in full)
    for f, s in zip(full, short):
        # one round each: the radius is the first midpoint if it was verified, else 0; never above the full search
        assert s.radius in (0.0, 0.25) and s.radius <= f.radius
        assert s.out_of_time == (s.upper - s.radius > 1e-3)
    assert any(s.out_of_time for s in short)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory, mnist_train):
    path = tmp_path_factory.mktemp("budget") / "mlp.onnx"
    torch.onnx.export(trained_mlp(mnist_train), torch.zeros(1, 1, 28, 28), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return path


def test_certify_radius_prints_progress_and_honours_the_budget(small_onnx, tmp_path, monkeypatch):
    # A line at every update (a log otherwise gets one at least every LINE_EVERY_S seconds).
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(certify_app, [str(small_onnx), "--data", "mnist", "--eps", "0.01", "--radius",
                                              "--radius-budget", "0.000001", "--limit", "4", "--method", "ibp",
                                              "--json", str(report)])
    assert result.exit_code == 0, result.output
    radius_lines = [line for line in result.output.splitlines() if "radius round" in line]
    assert radius_lines and all(line.startswith("certify: ") and len(line) <= 120 for line in radius_lines)
    radius = json.loads(report.read_text())["radius"]
    assert radius["out_of_time"] == sum(r["out_of_time"] for r in radius["per_sample"]) > 0


@pytest.mark.parametrize("args, message", [
    (["--radius-budget", "5"], "--radius-budget applies only with --radius"),
    (["--radius", "--radius-budget", "0"], "--radius-budget 0.0 is out of range"),
])
def test_radius_budget_bad_input_is_one_line(small_onnx, args, message):
    result = CliRunner().invoke(certify_app, [str(small_onnx), "--data", "mnist", "--eps", "0.01", *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
