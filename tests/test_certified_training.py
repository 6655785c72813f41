"""Certified training end to end on small real runs: a Dropout model fine-tunes under IBP, a short
run from scratch collapses with a squeezed ramp and not with the step plan (better still with the
recipe and BatchNorm), a
BatchNorm model exports folded and certifies soundly, the new objectives and options reach the
command line."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from finetune_inputs import write_finetune_inputs  # tests/finetune_inputs.py
from certify.attacks.gradient import PGD
from certify.bounds.bounder import MarginBounder, empirical_margins
from harden.cli import app
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle
from harden.io.export import export_onnx
from harden.io.zoo import ARCHITECTURES
from harden.layers.spectral import fold_batchnorm
from harden.training.finetune import FinetuneConfig, finetune
from harden.training.train import train_clean

SHAPE = (1, 28, 28)


def bundle_of(module: nn.Module, classes, arch: str = "small-cnn") -> Bundle:
    return Bundle(module, SHAPE, 10, {"kind": "zoo", "name": arch},
                  data={"dataset": "mnist", "classes": classes, "input_range": [0.0, 1.0]})


def ibp_verified(module: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample IBP verdicts by certify's own bounder on the eval-mode, BatchNorm-folded model,
    Dropout removed (what export writes; auto_LiRPA turns a Dropout module back to train mode)."""
    folded = fold_batchnorm(copy.deepcopy(module).eval())
    for sequence in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for key, layer in sequence._modules.items():
            if isinstance(layer, nn.Dropout):
                sequence._modules[key] = nn.Identity()
    lower = MarginBounder(folded, SHAPE).lower_margins((x - eps).clamp(0, 1), (x + eps).clamp(0, 1), y, "ibp")
    return lower.min(1).values > 0


def test_ibp_fine_tuning_of_a_dropout_model_bounds_the_eval_network(mnist_train, mnist_test):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(16 * 14 * 14, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))
    bundle = bundle_of(module, mnist_test.classes)
    train_clean(bundle, mnist_train.subset(2000), mnist_test.subset(100), epochs=1, batch_size=64, quiet=True)
    config = FinetuneConfig(train="ibp", eps=0.03, epochs=1, batch_size=50, lr=3e-3, eps_ramp_epochs=0.3)
    test = mnist_test.subset(200)
    record = finetune(bundle, mnist_train.subset(1000), test, config, quiet=True)
    verified = ibp_verified(bundle.module, test.x, test.y, 0.03)
    # The training graph's verdict is certify's verdict on the network with Dropout off.
    assert int(verified.sum()) == round(record["test_robust_accuracy"] * len(test)) and verified.float().mean() > 0.2
    attacked = PGD(bundle.module.eval(), 0.03, steps=10)(test.x[verified], test.y[verified])
    assert (bundle.module(attacked).argmax(1) == test.y[verified]).all()


@pytest.fixture(scope="module")
def short_runs(mnist_train, mnist_test):
    """A few dozen IBP steps from scratch at eps 0.1: the plain small CNN with the ramp squeezed into
    its first steps and with the default step plan, and the BatchNorm CNN with Shi et al.'s recipe."""
    train, test = mnist_train.subset(3000), mnist_test.subset(300)
    runs = {}
    for name, arch, options in (("squeezed", "small-cnn", {"eps_ramp_epochs": 0.3}), ("plain", "small-cnn", {}),
                                ("recipe", "small-cnn-bn", {"shi_recipe": True})):
        torch.manual_seed(0)
        bundle = bundle_of(ARCHITECTURES[arch](), mnist_test.classes, arch)
        record = finetune(bundle, train, None, FinetuneConfig(train="ibp", eps=0.1, batch_size=64, **options), quiet=True)
        accuracy = (bundle.module.eval()(test.x).argmax(1) == test.y).float().mean().item()
        runs[name] = bundle, record, test, accuracy
    return runs


def test_a_squeezed_ramp_collapses_and_the_step_plan_does_not(short_runs):
    squeezed, _, test, squeezed_accuracy = short_runs["squeezed"]
    _, plain_record, _, plain_accuracy = short_runs["plain"]
    recipe, recipe_record, _, recipe_accuracy = short_runs["recipe"]
    assert recipe_record["step_plan"] == plain_record["step_plan"] == {"total_steps": 47, "warmup_steps": 2,
                                                                       "ramp_steps": 42}
    assert recipe_record["lr_schedule"] == "step" and recipe_record["grad_clip"] == 10.0
    # Collapsed: (almost) one class for every image.
    assert squeezed.module(test.x).argmax(1).unique().numel() <= 2 and squeezed_accuracy < 0.3, squeezed_accuracy
    # The plain CNN stays fragile this short; BatchNorm and the recipe are what carry it.
    assert recipe_accuracy > 0.6 and recipe_accuracy > plain_accuracy + 0.1, (plain_accuracy, recipe_accuracy)
    assert ibp_verified(recipe.module, test.x, test.y, 0.05).float().mean() > 0.1


def test_a_batchnorm_model_exports_folded_and_its_verdicts_are_sound(short_runs, tmp_path):
    bundle, _, test, _ = short_runs["recipe"]
    path = tmp_path / "bn.onnx"
    export_onnx(bundle, path)
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    x, y = test.x[:100], test.y[:100]
    folded = fold_batchnorm(copy.deepcopy(bundle.module).eval())
    assert torch.allclose(folded(x), bundle.module.eval()(x), atol=1e-4)
    lower = MarginBounder(folded, SHAPE).lower_margins((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1), y, "ibp")
    attacked = PGD(bundle.module.eval(), 0.05, steps=10)(x, y)
    assert (empirical_margins(bundle.module(attacked), y) >= lower - 1e-4).all()


@pytest.fixture(scope="module")
def clean_cnn(mnist_train, mnist_test) -> Bundle:
    """The small CNN after one clean epoch on 4,000 images (not robust at all). Deep-copy it."""
    torch.manual_seed(0)
    bundle = bundle_of(ARCHITECTURES["small-cnn"](), mnist_test.classes)
    train_clean(bundle, mnist_train.subset(4000), mnist_test.subset(100), epochs=1, batch_size=64, quiet=True)
    return bundle


@pytest.mark.parametrize("objective", ["mtl-ibp", "sabr"])
def test_expressive_objectives_raise_ibp_verified_accuracy_of_a_clean_model(clean_cnn, mnist_train, mnist_test,
                                                                            objective):
    bundle = copy.deepcopy(clean_cnn)
    test = mnist_test.subset(200)
    before = ibp_verified(bundle.module, test.x, test.y, 0.03).float().mean()
    config = FinetuneConfig(train=objective, eps=0.03, epochs=1, batch_size=50, lr=3e-3, steps=2, eps_ramp_epochs=0.3,
                            ibp_weight=0.8)
    record = finetune(bundle, mnist_train.subset(1000), None, config, quiet=True)
    after = ibp_verified(bundle.module, test.x, test.y, 0.03).float().mean()
    assert before < 0.05 and after > before + 0.05, (before, after)
    assert record["objective"]["objective"] == objective and record["objective"]["steps"] == 2


def test_a_planned_batchnorm_run_resumes_to_the_same_weights_and_cannot_grow(mnist_train, mnist_test, tmp_path):
    from certify.common.errors import UserError
    from harden.training.finetune import epoch_checkpoint

    train = mnist_train.subset(192)

    def run(epochs: int, **where) -> Bundle:
        torch.manual_seed(0)
        bundle = bundle_of(ARCHITECTURES["small-cnn-bn"](), mnist_test.classes, "small-cnn-bn")
        config = FinetuneConfig(train="sabr", eps=0.1, steps=1, epochs=epochs, batch_size=64, shi_recipe=True, seed=2)
        finetune(bundle, train, None, config, quiet=True, **where)
        return bundle

    straight = run(2, checkpoint_dir=tmp_path)
    resumed = run(2, resume=epoch_checkpoint(tmp_path, 1))
    a, b = straight.module.state_dict(), resumed.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # running statistics included
    with pytest.raises(UserError, match="other settings"):  # the plan depends on the run's length
        run(3, resume=epoch_checkpoint(tmp_path, 2))


@pytest.mark.parametrize("arch", ["small-cnn-bn", "wide-cnn-bn", "medium-cnn-bn"])
def test_batchnorm_cnns_fold_to_the_same_function(arch):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]()
    model.train()(torch.rand(16, *SHAPE))  # running statistics away from their initial values
    x = torch.rand(4, *SHAPE)
    expected = model.eval()(x)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert torch.allclose(folded(x), expected, atol=1e-4)


# --- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(clean_cnn, mnist_train, tmp_path_factory):
    return write_finetune_inputs(clean_cnn, mnist_train, tmp_path_factory.mktemp("certified_cli"), 100)


def test_finetune_help_says_which_objective_and_architecture_to_pick():
    result = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for word in ("sabr", "mtl-ibp", "medium-cnn-bn", "wide-cnn-bn", "small-cnn-bn", "--shi-recipe", "--grad-clip", "eps 0.3"):
        assert word in result.output, word


def test_cli_trains_with_sabr_and_records_the_plan(cli_files):
    out = cli_files / "sabr.safetensors"
    result = CliRunner().invoke(app, ["finetune", str(cli_files / "model.safetensors"), "--data",
                                      str(cli_files / "small.npz"), "--train", "sabr", "--eps", "0.1", "--steps", "1",
                                      "--sabr-shrink", "0.5", "--batch-size", "50", "--eval-limit", "20", "--quiet",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = load_bundle(out).history[-1]
    assert record["objective"]["shrink"] == 0.5 and record["step_plan"]["total_steps"] == 2
    assert record["lr_schedule"] == "step" and record["grad_clip"] == 10.0


@pytest.mark.parametrize("args, message", [
    (["--train", "mtl-ibp", "--ibp-weight", "1.5"], "--ibp-weight 1.5"),
    (["--train", "sabr", "--sabr-shrink", "0"], "--sabr-shrink 0"),
    (["--train", "sabr", "--norm", "2", "--eps", "1.0"], "linf"),
    (["--train", "ibp", "--grad-clip", "-1"], "--grad-clip -1"),
    (["--train", "ibp", "--lr-schedule", "exp"], "unknown --lr-schedule"),
])
def test_cli_refuses_bad_certified_training_options_in_one_line(cli_files, args, message):
    out = cli_files / "never.safetensors"
    given = args if "--eps" in args else [*args, "--eps", "0.1"]
    result = CliRunner().invoke(app, ["finetune", str(cli_files / "model.safetensors"), "--data",
                                      str(cli_files / "small.npz"), *given, "--quiet", "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()
