"""The Python API on modules and tensors: certify.certify_module and harden's module functions.

certify_module must give what the command line gives on the exported file (the same cascade), its
margin bounds must hold on sampled and attacked points, and it must leave the user's model as it
was. harden's functions must do to a module what the command line does to a file.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import certify
import harden
from certify.api import frozen_copy
from certify.attacks.gradient import find_adversarial
from certify.bounds.bounder import empirical_margins
from certify.common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.1307], [0.3081]


class NormalizedCNN(nn.Module):
    """A CNN that expects normalized inputs, as many torchvision-style models do."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def trained(mnist_test):
    """A small normalized CNN after one clean epoch on 3000 MNIST test images (not the first 1000,
    which the tests certify), through harden.finetune."""
    torch.manual_seed(0)
    model = NormalizedCNN()
    record = harden.finetune(model, mnist_test.x[1000:4000], mnist_test.y[1000:4000], objective="clean", epochs=1,
                             lr=1e-2, batch_size=64, mean=MEAN, std=STD, seed=0, test=(mnist_test.x[:200], mnist_test.y[:200]))
    assert record["test_clean_accuracy"] > 0.8  # trained on normalized inputs, as the model expects
    return model.eval()


def test_certify_module_gives_the_verdicts_of_the_exported_file(trained, mnist_test, tmp_path):
    x, y = mnist_test.x[:24], mnist_test.y[:24]
    eps = [0.005, 0.03]
    settings = dict(methods=("ibp", "crown"), seed=3, attack_steps=10, batch_size=12)
    results = certify.certify_module(trained, x, y, eps=eps, mean=MEAN, std=STD, **settings)
    harden.export_module(trained, tmp_path / "m.onnx", input_shape=(1, 28, 28), mean=MEAN, std=STD,
                         dataset="mnist", classes=mnist_test.classes)
    run = certify.certify_model(tmp_path / "m.onnx", eps, limit=24, quiet=True, **settings)
    assert run.spec.mean == MEAN  # the export recorded the normalization; certify applied it
    for ours, theirs in zip(results, run.results):
        assert [(s.index, s.prediction, s.verdict, s.method) for s in ours.samples] == \
               [(s.index, s.prediction, s.verdict, s.method) for s in theirs.samples]
        for a, b in zip(ours.samples, theirs.samples):
            assert (a.margin_lower_bound is None) == (b.margin_lower_bound is None)
            if a.margin_lower_bound is not None:
                assert a.margin_lower_bound == pytest.approx(b.margin_lower_bound, abs=1e-3)
    verdicts = {s.verdict for r in results for s in r.samples}
    assert {"verified", "falsified"} <= verdicts  # the comparison covered both kinds of answer


def test_certify_module_margins_bound_sampled_and_attacked_points(trained, mnist_test):
    x, y = mnist_test.x[:16], mnist_test.y[:16]
    eps = 0.02
    (result,) = certify.certify_module(trained, x, y, eps=eps, mean=MEAN, std=STD, methods=("crown",), attack=False)
    normalized = nn.Sequential(certify_normalize(), trained).eval()
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    generator = torch.Generator().manual_seed(0)
    bounded = [s for s in result.samples if s.margin_lower_bound is not None]
    assert len(bounded) >= 12
    with torch.no_grad():
        for _ in range(20):
            points = lower + torch.rand(x.shape, generator=generator) * (upper - lower)
            margins = empirical_margins(normalized(points), y).min(1).values
            for s in bounded:
                assert margins[s.index] >= s.margin_lower_bound - 1e-5
    found, x_adv = find_adversarial(normalized, x, y, lower, upper, steps=20, restarts=1)
    with torch.no_grad():
        attacked = empirical_margins(normalized(x_adv), y).min(1).values
    for s in bounded:
        assert attacked[s.index] >= s.margin_lower_bound - 1e-5
        if s.verdict == "verified":
            assert not found[s.index]


def certify_normalize() -> nn.Module:
    from certify.specs.input_spec import Normalize

    return Normalize(MEAN, STD, 4)


def test_certify_module_leaves_a_parametrized_model_as_it_was(mnist_test):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    model = harden.spectral_normalize(model, beta=1.0, input_shape=(1, 28, 28))
    model.train()
    before = copy.deepcopy(model.state_dict())
    x, y = mnist_test.x[:8], mnist_test.y[:8]
    runs = [certify.certify_module(model, x, y, eps=[0.01, 0.1], methods=("ibp",), seed=5) for _ in range(2)]
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The same seed repeats the run exactly.
    decided = [[(s.verdict, s.method, s.margin_lower_bound) for r in run for s in r.samples] for run in runs]
    assert decided[0] == decided[1]
    assert torch.linalg.matrix_norm(model[1].weight.detach(), 2) <= 1.0 + 1e-3  # still parametrized
    model(x)  # and still runs


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: certify.certify_module(m, x * 2, y, eps=0.1), "outside the input range"),
    (lambda m, x, y: certify.certify_module(m, x, y[:3], eps=0.1), "y has shape"),
    (lambda m, x, y: certify.certify_module(m, x, y, eps=2.0), "out of range"),
    (lambda m, x, y: certify.certify_module(m, x, y + 10, eps=0.1), "label"),
    (lambda m, x, y: certify.certify_module("model.onnx", x, y, eps=0.1), "not a torch.nn.Module"),
    (lambda m, x, y: certify.certify_module(m, x[:, :, :10], y, eps=0.1), "does not run"),
    (lambda m, x, y: harden.finetune(m, x, None), "no labels"),
    (lambda m, x, y: harden.finetune(m, x, y, objective="pgd", eps=0.1, lr_typo=1), "lr_typo"),
    (lambda m, x, y: harden.export_module(m, "m.onnx", input_shape=(1, 28, 28), classes=["a"]), "1 classes"),
])
def test_bad_arguments_are_one_line_user_errors(call, message, mnist_test):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(UserError) as caught:
        call(model, mnist_test.x[:4], mnist_test.y[:4])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_harden_functions_take_tensors_or_a_loader_alike(mnist_test):
    x, y = mnist_test.x[1000:1600], mnist_test.y[1000:1600]

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))

    from_tensors, from_loader = fresh(), fresh()
    initial = copy.deepcopy(from_tensors.state_dict())
    harden.finetune(from_tensors, x, y, objective="fgm", eps=0.5, norm="2", seed=1)
    record = harden.finetune(from_loader, DataLoader(TensorDataset(x, y), batch_size=100), objective="fgm",
                             eps=0.5, norm="2", seed=1)
    assert record["train"] == "fgm" and record["train_samples"] == 600
    trained = from_tensors.state_dict()
    assert any(not torch.equal(value, initial[name]) for name, value in trained.items())
    # The loader's batches make the same training set: the run's seeded order does the rest.
    assert all(torch.equal(value, trained[name]) for name, value in from_loader.state_dict().items())


def test_prune_reaches_the_sparsity(mnist_test):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    record = harden.prune(model, mnist_test.x[1000:1512], mnist_test.y[1000:1512], sparsity=0.8, epochs=1, seed=0)
    weights = [layer.weight for layer in frozen_copy(model).modules() if isinstance(layer, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01) and record["final"]["sparsity"] == pytest.approx(zeros, abs=0.01)


def test_the_readme_example_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), "--out", str(tmp_path),
                           "--train", "500", "--certify", "10"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["module_certified"] == summary["file_certified"]
    assert (tmp_path / "model.onnx").is_file()
    assert "Warning" not in done.stderr, done.stderr[-2000:]


def test_certify_module_bounds_a_model_with_dropout_as_its_eval_network(trained, mnist_test):
    """auto_LiRPA 0.3 puts a graph with Dropout in training mode and refuses to bound it; the network a
    user certifies is the eval-mode one, where Dropout is the identity: same verdicts and margins."""
    with_dropout = copy.deepcopy(trained)
    with_dropout.head = nn.Sequential(with_dropout.head[0], nn.Dropout(0.5), *with_dropout.head[1:])
    x, y = mnist_test.x[:12], mnist_test.y[:12]
    settings = dict(eps=[0.02], methods=("ibp", "crown"), seed=1, attack_steps=5, mean=MEAN, std=STD)
    plain, dropped = (certify.certify_module(m, x, y, **settings)[0] for m in (trained, with_dropout))
    assert any(s.verdict == "verified" for s in plain.samples)
    assert [(s.verdict, s.method) for s in dropped.samples] == [(s.verdict, s.method) for s in plain.samples]
    for a, b in zip(plain.samples, dropped.samples):
        assert (a.margin_lower_bound is None) == (b.margin_lower_bound is None)
        if a.margin_lower_bound is not None:
            assert abs(a.margin_lower_bound - b.margin_lower_bound) < 1e-4
    assert any(isinstance(m, nn.Dropout) for m in with_dropout.modules())  # the user's model is unchanged
