"""`harden finetune`: every objective moves what it should on a small MNIST budget, resumed runs
end on exactly the same weights, spectral norm survives fine-tuning, the CLI fails cleanly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from finetune_inputs import write_finetune_inputs  # tests/finetune_inputs.py
from certify.bounds.bounder import MarginBounder
from certify.data.datasets import Dataset
from harden.cli import app
from harden.convert import convert
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle, save_bundle
from harden.layers.norms import operator_spectral_norm
from harden.layers.spectral import spectral_layers
from harden.training.bound_graph import BoundGraph, bound_loss
from harden.training.finetune import FinetuneConfig, default_checkpoint, evaluate, finetune
from harden.training.objectives import eps_at, ramp_fraction

SHAPE = (1, 28, 28)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(mnist_train, mnist_test) -> Bundle:
    """A small CNN clean-trained on 8,000 images (about 94% test accuracy): cheap, and as
    non-robust as any clean model. Deep-copy before changing it."""
    from harden.io.zoo import small_cnn
    from harden.training.train import train_clean

    torch.manual_seed(0)
    bundle = Bundle(small_cnn(), SHAPE, 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"dataset": "mnist", "classes": mnist_test.classes, "input_range": [0.0, 1.0]})
    train_clean(bundle, mnist_train.subset(8000), mnist_test.subset(500), epochs=2, batch_size=64, seed=0, quiet=True)
    return bundle


@pytest.fixture(scope="module")
def small_train(mnist_train) -> Dataset:
    return mnist_train.subset(1000)


@pytest.fixture(scope="module")
def small_test(mnist_test) -> Dataset:
    return mnist_test.subset(300)


def tuned(base: Bundle, data: Dataset, **options) -> tuple[Bundle, dict]:
    bundle = copy.deepcopy(base)
    config = FinetuneConfig(**{"epochs": 1, "batch_size": 50, **options})
    record = finetune(bundle, data, None, config, quiet=True)
    return bundle, record


def robust_accuracy(module, test: Dataset, **options) -> float:
    config = FinetuneConfig(**options)
    return evaluate(module, test, config, (0.0, 1.0), SHAPE, device=CPU)["test_robust_accuracy"]


def test_pgd_training_beats_clean_training_under_pgd(base, small_train, small_test):
    pgd, pgd_record = tuned(base, small_train, train="pgd", eps=0.1, steps=3)
    clean, _ = tuned(base, small_train, train="clean")
    measure = {"train": "pgd", "eps": 0.1, "steps": 10}
    before = robust_accuracy(base.module, small_test, **measure)
    after_pgd = robust_accuracy(pgd.module, small_test, **measure)
    after_clean = robust_accuracy(clean.module, small_test, **measure)
    assert after_pgd > after_clean + 0.2, (before, after_clean, after_pgd)
    assert after_pgd > before + 0.2
    log = pgd_record["epochs_log"][0]
    assert log["eps"] == pytest.approx(0.1) and 0.0 < log["train_robust_accuracy"] < log["train_clean_accuracy"]
    assert pgd.history[-1] is pgd_record and pgd_record["objective"]["attack_labels"] == "predicted"


def test_fgm_l2_training_raises_accuracy_under_fgm(base, small_train, small_test):
    tuned_model, record = tuned(base, small_train, train="fgm", eps=1.5, norm="2")
    measure = {"train": "fgm", "eps": 1.5, "norm": "2"}
    before = robust_accuracy(base.module, small_test, **measure)
    after = robust_accuracy(tuned_model.module, small_test, **measure)
    assert after > before + 0.1, (before, after)
    assert record["norm"] == "2"


def test_trades_raises_pgd_accuracy_and_keeps_clean_accuracy(base, small_train, small_test):
    # TRADES (beta 6) gives up clean accuracy for robustness: a gentle lr keeps that in check here.
    tuned_model, _ = tuned(base, small_train.subset(600), train="trades", eps=0.1, steps=3, lr=5e-4)
    measure = {"train": "pgd", "eps": 0.1, "steps": 10}
    before = robust_accuracy(base.module, small_test, **measure)
    after = robust_accuracy(tuned_model.module, small_test, **measure)
    clean = evaluate(tuned_model.module, small_test, FinetuneConfig(train="clean"), (0.0, 1.0), SHAPE, device=CPU)
    assert after > before + 0.2, (before, after)
    assert clean["test_clean_accuracy"] > 0.8


def test_ibp_training_verifies_samples_and_the_weights_reach_the_bundle(base, small_train, small_test, tmp_path):
    options = {"train": "ibp", "eps": 0.03}
    before = robust_accuracy(base.module, small_test, **options)
    tuned_model, record = tuned(base, small_train, lr=3e-3, eps_ramp_epochs=0.3, **options)
    after = robust_accuracy(tuned_model.module, small_test, **options)
    assert before <= 0.01 and after >= 0.1, (before, after)
    assert record["epochs_log"][0]["eps"] == pytest.approx(0.03)
    # Saved and re-loaded, then bounded by certify's own bounder (not the training graph): the
    # trained weights are in the file.
    save_bundle(tuned_model, tmp_path / "ibp.safetensors")
    reloaded = load_bundle(tmp_path / "ibp.safetensors")
    bounder = MarginBounder(copy.deepcopy(reloaded.module), SHAPE)
    x, y = small_test.x, small_test.y
    lower = bounder.lower_margins((x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1), y, "ibp")
    assert int((lower.min(1).values > 0).sum()) == round(after * len(small_test))


def test_crown_ibp_training_tightens_the_bounds(base, small_train, small_test):
    def mean_bound_loss(module) -> float:
        graph = BoundGraph(copy.deepcopy(module).eval(), SHAPE, CPU)
        with torch.no_grad():
            lower, _ = graph.lower_margins(small_test.x[:100], small_test.y[:100], 0.03, "inf", 0.0, 1.0, "CROWN-IBP")
        return bound_loss(lower).mean().item()

    tuned_model, _ = tuned(base, small_train.subset(300), train="crown-ibp", eps=0.03, lr=3e-3, eps_ramp_epochs=1)
    before, after = mean_bound_loss(base.module), mean_bound_loss(tuned_model.module)
    assert after < 0.6 * before, (before, after)


def operator_norm(layer, input_hw) -> float:
    return operator_spectral_norm(layer, input_hw, iters=3000, tol=1e-9)[0]


def spectrally_normalized(bundle: Bundle, beta: float) -> Bundle:
    bundle = copy.deepcopy(bundle)
    convert(bundle, spectral_norm=beta)
    return bundle


def test_spectrally_normalized_model_keeps_sigma_below_beta(base, small_train, small_test):
    beta = 1.5
    sn = spectrally_normalized(base, beta)
    raw_before = {name: layer.parametrizations.weight.original.detach().clone() for name, layer, _ in spectral_layers(sn.module)}
    pgd, _ = tuned(sn, small_train.subset(500), train="pgd", eps=0.1, steps=3)
    clipped = 0
    for name, layer, param in spectral_layers(pgd.module):
        sigma = operator_norm(layer, param.input_hw)
        assert sigma <= beta * 1.001, (name, sigma)
        clipped += param.sigma.item() > beta  # the raw weight's norm: the clip is really at work
        assert not torch.equal(layer.parametrizations.weight.original, raw_before[name])
    assert clipped >= 2
    # Certified training goes through a plain mirror of the parametrized model: the bound's
    # gradient must still reach the raw weights, and sigma stays clipped.
    options = {"train": "ibp", "eps": 0.03}
    before = robust_accuracy(sn.module, small_test, **options)
    ibp, _ = tuned(sn, small_train, lr=3e-3, eps_ramp_epochs=0.3, **options)
    after = robust_accuracy(ibp.module, small_test, **options)
    assert after > before + 0.05, (before, after)
    for name, layer, param in spectral_layers(ibp.module):
        assert operator_norm(layer, param.input_hw) <= beta * 1.001, name


def test_resume_ends_on_exactly_the_same_weights(base, mnist_train, tmp_path):
    sn = spectrally_normalized(base, 2.0)  # its power-iteration state must survive the checkpoint too
    train = mnist_train.subset(256)

    def config(epochs: int) -> FinetuneConfig:
        return FinetuneConfig(train="pgd", eps=0.1, steps=2, epochs=epochs, batch_size=64, norm_decay=1e-3, seed=3)

    straight = copy.deepcopy(sn)
    finetune(straight, train, None, config(2), quiet=True)
    checkpoint = tmp_path / "run.ckpt.safetensors"
    first = copy.deepcopy(sn)
    finetune(first, train, None, config(1), checkpoint=checkpoint, quiet=True)
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys = set(handle.keys())
        meta = json.loads(handle.metadata()["harden.checkpoint"])
    assert meta["epoch"] == 1 and "rng.torch" in keys and any(k.startswith("optimizer.") for k in keys)
    assert any(k.startswith("norm_decay.") for k in keys) and any(k.endswith(".u") for k in keys)
    resumed = copy.deepcopy(sn)
    record = finetune(resumed, train, None, config(2), resume=checkpoint, quiet=True)
    a, b = straight.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["epoch"] for e in record["epochs_log"]] == [1, 2]
    # The first epoch alone is a different model (the comparison above can fail).
    assert not all(torch.equal(a[k], first.module.state_dict()[k]) for k in a)


def test_resume_with_other_settings_is_refused(base, mnist_train, tmp_path):
    from certify.common.errors import UserError

    train = mnist_train.subset(64)
    checkpoint = tmp_path / "c.ckpt.safetensors"
    finetune(copy.deepcopy(base), train, None, FinetuneConfig(train="clean", batch_size=32), checkpoint=checkpoint, quiet=True)
    with pytest.raises(UserError, match="other settings"):
        finetune(copy.deepcopy(base), train, None, FinetuneConfig(train="clean", batch_size=32, lr=0.1),
                 resume=checkpoint, quiet=True)


def test_layer_regularizers_join_the_loss(base, mnist_train):
    from harden.layers.wca import add_wca, wca_heads

    model = copy.deepcopy(base)
    add_wca(model.module, SHAPE)
    (_, head), = wca_heads(model.module)
    before = head.regularizer().item()
    tuned_model, record = tuned(model, mnist_train.subset(300), train="clean")
    assert record["layer_terms"] == ["WCAHead"]
    (_, tuned_head), = wca_heads(tuned_model.module)
    # -log tr(W Sigma W^T) only falls when the term is in the loss (cross-entropy alone has no
    # reason to grow the noise along W).
    assert tuned_head.regularizer().item() < before - 0.05


def test_eps_ramp_shapes():
    assert ramp_fraction(0, 0) == 1.0 and ramp_fraction(4, 10) == 0.5 and ramp_fraction(20, 10) == 1.0
    for schedule in ("linear", "smooth"):
        values = [eps_at(t / 100, 0.3, schedule) for t in range(101)]
        assert values[0] == 0.0 and values[-1] == pytest.approx(0.3)
        assert all(b >= a for a, b in zip(values, values[1:]))
        assert max(b - a for a, b in zip(values, values[1:])) < 0.3 * 0.02  # continuous, no jump
    assert eps_at(0.1, 0.3, "smooth") < eps_at(0.1, 0.3, "linear")  # smooth starts gently


# --- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(base, mnist_train, tmp_path_factory):
    return write_finetune_inputs(base, mnist_train, tmp_path_factory.mktemp("cli"), 200)


def run_cli(args: list[str]):
    return CliRunner().invoke(app, ["finetune", *args])


def test_cli_writes_the_bundle_with_history_and_checkpoint(cli_files):
    out = cli_files / "out.safetensors"
    result = run_cli([str(cli_files / "model.safetensors"), "--data", str(cli_files / "small.npz"), "--train", "pgd",
                      "--eps", "0.1", "--steps", "2", "--batch-size", "50", "--eval-limit", "50", "--quiet",
                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = load_bundle(out).history[-1]
    assert record["run"] == "finetune" and record["train"] == "pgd" and record["train_samples"] == 200
    assert record["test_samples"] == 50 and 0.0 <= record["test_robust_accuracy"] <= record["test_clean_accuracy"]
    assert default_checkpoint(out).is_file() and default_checkpoint(out).name == "out.ckpt.safetensors"


@pytest.mark.parametrize("args, message", [
    (["--train", "pgd", "--eps", "-0.1"], "--eps -0.1"),
    (["--train", "pgd", "--eps", "1.5"], "larger than the whole input range"),
    (["--train", "pgd", "--eps", "nan"], "not a finite number"),
    (["--train", "pgd"], "needs --eps"),
    (["--train", "madry", "--eps", "0.1"], "unknown --train"),
    (["--train", "pgd", "--eps", "0.1", "--norm", "1"], "unknown --norm"),
    (["--train", "pgd", "--eps", "0.1", "--epochs", "0"], "--epochs 0"),
    (["--train", "pgd", "--eps", "0.1", "--norm-decay-p", "2"], "--norm-decay-p"),
    (["--train", "ibp", "--eps", "0.1", "--resume", "missing.ckpt.safetensors"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(cli_files, args, message):
    out = cli_files / "never.safetensors"
    result = run_cli([str(cli_files / "model.safetensors"), "--data", str(cli_files / "small.npz"), *args,
                      "--quiet", "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists() and not default_checkpoint(out).exists()


def test_cli_refuses_a_wrong_output_suffix(cli_files):
    result = run_cli([str(cli_files / "model.safetensors"), "--train", "clean", "--quiet", "-o", str(cli_files / "x.onnx")])
    assert result.exit_code == 2 and ".safetensors" in result.output
    assert not (cli_files / "x.onnx").exists()
