"""Pruning under a condition-number constraint: exact sparsity, real zeros in the ONNX, kappa as
numpy computes it, the constraint at work on a small MNIST problem, reload, CLI errors."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from certify.common.errors import UserError
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle, save_bundle
from harden.io.export import PARITY_ATOL, export_onnx
from harden.layers.norms import effective_weight
from harden.layers.masks import attach_masks, prunable_layers
from harden.pruning.prune import (PruneConfig, condition_hinge, condition_logdet, cubic_sparsity, kappa, layer_kappas,
                                  live_kappa, magnitude_masks, objective_from_history, prune, pruning_events,
                                  transformed_l1)
from harden.layers.spectral import apply_spectral_norm
from harden.training.train import train_clean
from harden.io.zoo import mlp, small_cnn


def _zeros(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (int((effective_weight(layer) == 0).sum()), effective_weight(layer).numel())
            for name, layer in prunable_layers(model)}


@pytest.fixture(scope="module")
def small_data(mnist_train, mnist_test):
    return mnist_train.subset(1000), mnist_test.subset(300)


@pytest.fixture(scope="module")
def quick_cnn(small_data):
    """The small CNN after one clean epoch on 1000 MNIST images (a few seconds)."""
    train, test = small_data
    torch.manual_seed(0)
    bundle = Bundle(small_cnn(), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"dataset": "mnist", "classes": [str(k) for k in range(10)], "input_range": [0.0, 1.0]})
    train_clean(bundle, train, test, epochs=1, seed=0, quiet=True)
    return bundle


# -- the pieces -------------------------------------------------------------------------------------

def test_kappa_is_numpys_condition_number():
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    masks = attach_masks(nn.Sequential(conv))
    masks["0"].mask.copy_(torch.rand(conv.weight.shape, generator=generator) > 0.5)
    for weight in (torch.randn(30, 70, generator=generator), torch.randn(70, 30, generator=generator),
                   effective_weight(conv)):
        matrix = weight.reshape(weight.shape[0], -1).double().numpy()  # conv: C_out x C_in*k*k
        assert kappa(weight) == pytest.approx(np.linalg.cond(matrix), rel=1e-10)
    assert effective_weight(conv).reshape(8, -1).shape == (8, 27)
    # A pruned row: numpy agrees the matrix is rank-deficient; its cond is digits of round-off.
    singular = torch.randn(20, 50, generator=generator)
    singular[3] = 0
    assert math.isinf(kappa(singular))
    assert np.linalg.matrix_rank(singular.double().numpy()) < 20 and np.linalg.cond(singular.double().numpy()) > 1e12
    # The live part drops zero rows and columns: it is the 19 x 50 matrix that remains.
    kept = torch.cat([singular[:3], singular[4:]])
    assert live_kappa(singular) == pytest.approx(np.linalg.cond(kept.double().numpy()), rel=1e-10)


def test_condition_terms_match_their_formulas():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(10, 40, generator=generator, dtype=torch.float64)
    k = np.linalg.cond(weight.numpy())
    assert float(condition_hinge(weight, k * 2)) == 0.0
    assert float(condition_hinge(weight, k / 3)) == pytest.approx(math.log(3) ** 2, rel=1e-9)
    gram = weight.numpy() @ weight.numpy().T / 10
    assert float(condition_logdet(weight)) == pytest.approx(math.log(1e-5 + np.linalg.det(gram)) ** 2, rel=1e-9)
    # rho_a on |w|: even in w, no pole at w = -a, (a+1)t/(a+t) per entry.
    w = torch.tensor([-100.0, -1.0, 0.0, 2.0])
    assert float(transformed_l1(w, 100.0)) == pytest.approx(101 * 100 / 200 + 101 / 101 + 0 + 202 / 102)
    # The hinge's gradient lowers kappa: one small step against it.
    w = weight.clone().requires_grad_(True)
    condition_hinge(w, 2.0).backward()
    with torch.no_grad():
        assert kappa(w - 1e-3 * w.grad) < kappa(w)


def test_masks_reach_the_exact_count_and_only_grow():
    generator = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(7, 13, generator=generator), "b": torch.randn(5, 3, 3, 3, generator=generator),
               "c": 10 * torch.randn(3, 11, generator=generator)}
    total = sum(w.numel() for w in weights.values())
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    for s in (0.3, 0.61, 0.9, 0.97):
        new = magnitude_masks(weights, masks, s, "global")
        assert sum(int((~m).sum()) for m in new.values()) == round(s * total)
        assert all(bool((new[n] <= masks[n]).all()) for n in weights)  # nothing pruned comes back
        masks = new
    per_layer = magnitude_masks(weights, {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()},
                                0.77, "per-layer")
    assert {n: int((~m).sum()) for n, m in per_layer.items()} == {n: round(0.77 * w.numel()) for n, w in weights.items()}


def test_cubic_schedule_ends_exactly_at_the_target():
    events = pruning_events(100, 0.95, "cubic", 10, 0.5)
    assert events[0][0] == 0 and events[-1] == (45, 0.95) and len(events) == 10
    assert all(a[1] < b[1] and a[0] <= b[0] for a, b in zip(events, events[1:]))
    assert events[0][1] == pytest.approx(cubic_sparsity(1, 10, 0.95)) == pytest.approx(0.95 * (1 - 0.9 ** 3))
    assert pruning_events(100, 0.9, "oneshot", 10, 0.5) == [(0, 0.9)]


# -- pruning a real model -----------------------------------------------------------------------------

def test_global_sparsity_exact_and_onnx_has_the_zeros(tmp_path, quick_cnn, small_data):
    train, test = small_data
    bundle = copy.deepcopy(quick_cnn)
    config = PruneConfig(sparsity=0.9, prune_steps=3, epochs=1, batch_size=100, eval_limit=200)
    record = prune(bundle, train, test, config, quiet=True)
    counts = _zeros(bundle.module)
    total = sum(n for _, n in counts.values())
    assert sum(z for z, _ in counts.values()) == round(0.9 * total) == record["final"]["zeros"]
    assert record["test_clean_accuracy"] > 0.2  # twice chance: still a classifier after 10 steps
    assert [e["target_sparsity"] for e in record["events"]][-1] == 0.9
    for event in record["events"]:  # kappa of every layer before and after each event
        assert set(event["layers"]) == set(counts)
        assert all({"kappa_before", "kappa_after"} <= set(v) for v in event["layers"].values())
    reported = {name: v["kappa"] for name, v in record["final"]["per_layer"].items()}
    ours = layer_kappas(bundle.module, list(counts))
    assert reported == {n: (k if math.isfinite(k) else None) for n, k in ours.items()}
    assert bundle.recipe[-1] == {"step": "prune", "layers": list(counts)}

    # harden inspect reads the masked weights: its sparsity and condition columns are ours.
    from harden.inspect import inspect_bundle

    rows = {row["name"]: row for row in inspect_bundle(bundle, max_iters=50)["layers"] if row["name"] in counts}
    layers = dict(prunable_layers(bundle.module))
    for name, (zeros, entries) in counts.items():
        assert rows[name]["sparsity"] == zeros / entries
        assert rows[name]["condition_number"] == reported[name]
        live = live_kappa(effective_weight(layers[name]))
        assert rows[name]["live_condition_number"] == (pytest.approx(live) if math.isfinite(live) else None)

    path = tmp_path / "pruned.onnx"
    parity = export_onnx(bundle, path)
    assert parity["max_abs_diff"] <= PARITY_ATOL
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    weights = [w for w in weights if w.ndim >= 2]  # Conv / Gemm weights; biases stay dense
    assert len(weights) == 4
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * total)


def test_per_layer_sparsity_under_spectral_norm_and_reload(tmp_path, quick_cnn, small_data):
    train, _ = small_data
    bundle = copy.deepcopy(quick_cnn)
    apply_spectral_norm(bundle.module, 2.0, input_shape=(1, 28, 28))
    bundle.recipe.append({"step": "spectral-norm", "beta": 2.0})
    config = PruneConfig(sparsity=0.8, scope="per-layer", schedule="oneshot", epochs=1, batch_size=100)
    prune(bundle, train, None, config, quiet=True)
    # The mask sits before the norm: exact zeros, and the norm still holds for the masked weight.
    for name, (zeros, entries) in _zeros(bundle.module).items():
        assert zeros == round(0.8 * entries), name
    layer = dict(prunable_layers(bundle.module))["5"]
    assert [type(p).__name__ for p in layer.parametrizations.weight] == ["Mask", "OperatorSpectralNorm"]

    path = tmp_path / "pruned.safetensors"
    save_bundle(bundle, path)
    again = load_bundle(path)
    assert [s["step"] for s in again.recipe] == ["spectral-norm", "prune"]
    x = train.x[:64]
    bundle.module.eval()
    with torch.no_grad():
        assert torch.equal(again.module(x), bundle.module(x))
    assert _zeros(again.module) == _zeros(bundle.module)
    onnx_path = tmp_path / "pruned.onnx"
    assert export_onnx(again, onnx_path)["max_abs_diff"] <= PARITY_ATOL
    weights = [w for w in map(numpy_helper.to_array, onnx.load(str(onnx_path)).graph.initializer) if w.ndim >= 2]
    assert sorted(int((w == 0).sum()) for w in weights) == sorted(round(0.8 * w.size) for w in weights)


def test_constraint_keeps_kappa_under_kappa_max(small_data, mnist_train):
    """An MLP (784-128-10) on 3000 MNIST images, pruned to 95% per layer with and without the hinge
    at kappa_max = 10, same budget. kappa here is that of the live part of each matrix (without
    pruned-away rows/columns: both runs lose a few hidden units, which makes the full 128 x 784
    matrix singular whatever the constraint does)."""
    _, test = small_data
    train = mnist_train.subset(3000)
    torch.manual_seed(0)
    base = Bundle(nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)), (1, 28, 28), 10,
                  {"kind": "zoo", "name": "test-mlp"}, data={"dataset": "mnist", "input_range": [0.0, 1.0]})
    train_clean(base, train, test, epochs=2, seed=0, quiet=True)
    results = {}
    for kappa_max in (None, 10.0):
        bundle = copy.deepcopy(base)
        config = PruneConfig(sparsity=0.95, scope="per-layer", epochs=2, kappa_max=kappa_max)
        prune(bundle, train, None, config, quiet=True)
        results[kappa_max] = max(layer_kappas(bundle.module, ["1", "3"], live=True).values())
    assert results[None] > 10.0  # plain pruning exceeds the bound ...
    assert results[10.0] <= 10.0  # ... the constraint keeps it under


def test_pruned_bundle_reloads_with_identical_outputs_cli(tmp_path, small_data):
    train, _ = small_data
    torch.manual_seed(0)
    bundle = Bundle(mlp(), (1, 28, 28), 10, {"kind": "zoo", "name": "mlp"},
                    data={"dataset": "mnist", "classes": [str(k) for k in range(10)], "input_range": [0.0, 1.0]})
    source = tmp_path / "mlp.safetensors"
    save_bundle(bundle, source)
    out = tmp_path / "pruned.safetensors"
    run = subprocess.run([sys.executable, "-m", "harden", "prune", str(source), "--sparsity", "0.5", "--train", "pgd",
                          "--eps", "0.1", "--steps", "2", "--epochs", "1", "--limit", "256", "--eval-limit", "100",
                          "--prune-steps", "2", "--kappa-max", "50", "--tsc-weight", "1e-5", "--quiet", "-o", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "sparsity 50.00%" in run.stderr and "pgd-2" in run.stderr
    pruned = load_bundle(out)
    record = pruned.history[-1]
    assert record["run"] == "prune" and record["train"] == "pgd" and record["kappa_max"] == 50.0
    assert len(record["events"]) == 2
    counts = _zeros(pruned.module)
    assert sum(z for z, _ in counts.values()) == round(0.5 * sum(n for _, n in counts.values()))
    again = load_bundle(out)
    with torch.no_grad():
        assert torch.equal(again.module(train.x[:32]), pruned.module(train.x[:32]))


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "--sparsity 1.0 is outside [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity -0.1 is outside [0, 1)"),
    (["--sparsity", "0.5", "--kappa-max", "0.5"], "--kappa-max 0.5 is not above 1"),
    (["--sparsity", "0.5", "--kappa-max", "1"], "--kappa-max 1.0 is not above 1"),
    (["--sparsity", "0.5", "--schedule", "linear"], "unknown --schedule 'linear'"),
    (["--sparsity", "0.5", "--train", "pgd"], "--train pgd needs --eps > 0"),
    (["--sparsity", "0.5", "--cond-weight", "2"], "--cond-weight with the hinge form needs --kappa-max"),
])
def test_cli_errors_are_one_line_exit_2_no_output(tmp_path, args, message):
    from typer.testing import CliRunner

    from harden.cli import app

    source = tmp_path / "mlp.safetensors"
    save_bundle(Bundle(mlp(), (1, 28, 28), 10, {"kind": "zoo", "name": "mlp"}, data={"dataset": "mnist"}), source)
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["prune", str(source), *args, "-o", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


def test_reference_logdet_form_pulls_det_to_one_and_saturates(small_data):
    """(log(1e-5 + det(G/r)))^2: with det(G/r) >> 1e-5 its gradient pulls det(G/r) toward 1; when
    det(G/r) << 1e-5 (e.g. small weights, r = 32: the product of 32 eigenvalues ~0.01) the 1e-5
    dominates and the gradient vanishes -- the reference formula's own behaviour, kept as it is."""
    generator = torch.Generator().manual_seed(3)
    large = torch.randn(10, 100, generator=generator, dtype=torch.float64).requires_grad_(True)
    condition_logdet(large).backward()
    logdet = lambda w: float(torch.linalg.slogdet(w @ w.T / 10)[1])  # noqa: E731
    assert logdet(large.detach()) > 5
    with torch.no_grad():
        assert 0 < logdet(large - 1e-3 * large.grad) < logdet(large)
    small = (0.02 * torch.randn(32, 784, generator=generator, dtype=torch.float64)).requires_grad_(True)
    condition_logdet(small).backward()
    assert float(small.grad.abs().max()) < 1e-30
    # In the loop: the reference form with its default weight, exact sparsity all the same.
    train, _ = small_data
    torch.manual_seed(0)
    bundle = Bundle(nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)), (1, 28, 28), 10,
                    {"kind": "zoo", "name": "test-mlp"}, data={"dataset": "mnist", "input_range": [0.0, 1.0]})
    record = prune(bundle, train.subset(256), None, PruneConfig(sparsity=0.5, cond_form="logdet", epochs=1,
                                                               prune_steps=2), quiet=True)
    assert record["cond_weight"] == 1e-3 and record["cond_form"] == "logdet"
    assert record["final"]["zeros"] == round(0.5 * record["final"]["entries"])


def test_objective_comes_from_the_last_adversarial_finetuning():
    bundle = Bundle(mlp(), (1, 28, 28), 10, {"kind": "zoo", "name": "mlp"})
    assert objective_from_history(bundle) is None
    bundle.history += [{"run": "finetune", "train": "trades", "eps": 0.2, "norm": "2"},
                       {"run": "train", "loss": "clean"},
                       {"run": "finetune", "train": "pgd", "eps": 0.1, "norm": "inf"},
                       {"run": "finetune", "train": "clean", "eps": 0.0, "norm": "inf"}]
    assert objective_from_history(bundle) == ("pgd", 0.1, "inf")


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="prune fraction"):
        PruneConfig(sparsity=0.5, prune_fraction=0.0).validate()
    with pytest.raises(UserError, match="--tsc-a"):
        PruneConfig(sparsity=0.5, tsc_a=0.0).validate()
