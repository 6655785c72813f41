"""Soundness of the certificates on our own model (the conftest CNN, exported to ONNX): a verified
sample has no adversarial example that a strong attack or 10,000 random points of its box can
find, every bound lies below every margin sampled in its box, and no sample is ever both verified
and falsified."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from certify.attacks.gradient import find_adversarial
from certify.bounds.bounder import MarginBounder, empirical_margins, margin_matrix
from certify.data.datasets import load_dataset
from certify.verdicts.dataset import certify_model
from certify.onnx_import.certifiable import load_certifiable
from certify.verdicts.cascade import FALSIFIED, VERIFIED, lower_bounds

EPS = [0.02, 0.06]
SAMPLES = 8
RANDOM_POINTS = 10_000


@pytest.fixture(scope="module")
def cnn_onnx(trained_small_cnn, tmp_path_factory) -> Path:
    from harden.io.export import export_onnx

    path = tmp_path_factory.mktemp("soundness") / "cnn.onnx"
    export_onnx(trained_small_cnn, path)
    return path


@pytest.fixture(scope="module")
def run(cnn_onnx):
    return certify_model(cnn_onnx, EPS, limit=SAMPLES, batch_size=SAMPLES, methods=("ibp", "crown"),
                         attack_steps=30, quiet=True)


@pytest.fixture(scope="module")
def module(cnn_onnx):
    return load_certifiable(cnn_onnx).module


@pytest.fixture(scope="module")
def data():
    test = load_dataset("mnist", "test")
    return test.x[:SAMPLES], test.y[:SAMPLES]


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _points(lower: torch.Tensor, upper: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` points of the box: uniform ones, plus random corners (where ReLU nets are extreme)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(count, *lower.shape, generator=generator)
    u[: count // 4] = u[: count // 4].round()
    return lower + u * (upper - lower)


def test_never_both_verified_and_falsified(run):
    for i in range(SAMPLES):
        verdicts = [result.samples[i].verdict for result in run.results]
        # falsified at eps means an adversarial point in every larger box: no larger eps is verified
        for k, verdict in enumerate(verdicts):
            if verdict == FALSIFIED:
                assert VERIFIED not in verdicts[k:], verdicts
    counts = [result.summary() for result in run.results]
    assert counts[0]["verified"] >= SAMPLES * 3 // 4  # the check below has samples to look at
    assert counts[-1]["falsified"] >= 1


def test_falsified_samples_are_really_falsifiable(run, module, data, cnn_onnx):
    """Every falsified verdict decided at its eps: the file misclassifies the clean image, or an
    independent strong attack finds an adversarial point in the box that onnxruntime confirms."""
    from certify.onnx_import.parity import onnxruntime_logits, onnxruntime_session

    x, y = data
    session = onnxruntime_session(cnn_onnx)
    checked = 0
    for k, eps in enumerate(EPS):
        for s in run.results[k].samples:
            if s.verdict != FALSIFIED or s.reused_from is not None:
                continue
            i = s.index
            assert s.method in ("clean", "pgd")
            if s.method == "clean":
                assert onnxruntime_logits(session, x[i:i + 1]).argmax(1)[0] != int(y[i])
            else:
                lower, upper = _box(x[i:i + 1], eps)
                found, adversarial = find_adversarial(module, x[i:i + 1], y[i:i + 1], lower, upper, steps=100,
                                                      restarts=10, seed=31)
                assert found.item(), i
                assert onnxruntime_logits(session, adversarial).argmax(1)[0] != int(y[i])
            checked += 1
    assert checked >= 1


def test_verified_samples_survive_strong_attacks_and_random_points(run, module, data):
    x, y = data
    checked = 0
    for k, eps in enumerate(EPS):
        # a verdict reused from a larger eps is checked there, on a box that holds this one
        rows = [s.index for s in run.results[k].samples if s.verdict == VERIFIED and s.reused_from is None]
        if not rows:
            continue
        rows_t = torch.tensor(rows)
        lower, upper = _box(x[rows_t], eps)
        found, _ = find_adversarial(module, x[rows_t], y[rows_t], lower, upper, steps=50, restarts=10, seed=11)
        assert not found.any(), f"PGD broke verified samples {rows_t[found].tolist()} at eps {eps}"
        for j, row in enumerate(rows):
            points = _points(lower[j], upper[j], RANDOM_POINTS, seed=row)
            with torch.no_grad():
                margins = empirical_margins(module(points), y[row].expand(RANDOM_POINTS))
            bound = run.results[k].samples[row].margin_lower_bound
            assert margins.min().item() > 0, f"sample {row} verified at eps {eps} but a random point is misclassified"
            assert bound <= margins.min(1).values.min().item() + 1e-5
            checked += 1
    assert checked >= SAMPLES * 3 // 4


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_lie_below_every_sampled_margin(module, data, method):
    x, y = data
    lower, upper = _box(x, 0.04)
    bounder = MarginBounder(module, (1, 28, 28))
    # the engine's own bound call, on the whole batch
    bound = lower_bounds(bounder, lower, upper, margin_matrix(y, 10), method)  # (samples, classes - 1)
    assert torch.equal(bound, bounder.lower_margins(lower, upper, y, method))
    # batching never loosens a sample's bound (the IBP reference bounds keep each neuron's own)
    for i in range(SAMPLES):
        alone = bounder.lower_margins(lower[i:i + 1], upper[i:i + 1], y[i:i + 1], method)
        assert (bound[i] >= alone[0] - 1e-4).all(), i
    _, adversarial = find_adversarial(module, x, y, lower, upper, steps=50, restarts=2, seed=2)
    with torch.no_grad():
        attacked = empirical_margins(module(adversarial), y)
    assert (bound <= attacked + 1e-5).all()
    for i in range(SAMPLES):
        points = _points(lower[i], upper[i], 1_000, seed=100 + i)
        with torch.no_grad():
            margins = empirical_margins(module(points), y[i].expand(len(points)))
        # per class, not only the smallest margin: each row of C is its own claim
        assert (bound[i] <= margins.min(0).values + 1e-5).all(), i


def test_alpha_crown_on_a_few_samples(module, data):
    """alpha-CROWN (seconds per sample here): sound, and at least as tight as CROWN."""
    x, y = data
    lower, upper = _box(x[:1], 0.04)
    bounder = MarginBounder(module, (1, 28, 28))
    c = margin_matrix(y[:1], 10)
    crown = lower_bounds(bounder, lower, upper, c, "crown")
    alpha = lower_bounds(bounder, lower, upper, c, "alpha-crown")
    assert (alpha >= crown - 1e-4).all() and (alpha > crown + 1e-3).any()
    for i in range(1):
        points = _points(lower[i], upper[i], 5_000, seed=200 + i)
        with torch.no_grad():
            margins = empirical_margins(module(points), y[i].expand(len(points)))
        assert (alpha[i] <= margins.min(0).values + 1e-5).all()
