"""A model trained on normalized inputs, end to end: the normalization is given once (convert),
recorded in the bundle, applied by finetune and prune, written by export, and used by certify; a wrong or
conflicting normalization is caught (a warning before training, a one-line refusal later)."""

from __future__ import annotations

import json
import re

import onnx
import pytest
import torch
from typer.testing import CliRunner

from certify.common.errors import UserError
from harden.cli import app
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle
from harden.io.normalization import take_normalization
from harden.io.zoo import small_cnn
from harden.training.loop import training_module

MEAN, STD = 0.1307, 0.3081
NORMALIZE = ["--mean", str(MEAN), "--std", str(STD)]


def harden(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def user_model(mnist_train, tmp_path_factory):
    """A user's small CNN trained (300 Adam steps) on (x - 0.1307) / 0.3081, saved as a state dict."""
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows = torch.randint(0, len(mnist_train), (64,), generator=order)
        loss = torch.nn.functional.cross_entropy(model((mnist_train.x[rows] - MEAN) / STD), mnist_train.y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("user") / "user.pt"
    torch.save(model.state_dict(), path)
    return path


def finetune(model, out, *extra) -> tuple[int, str]:
    return harden("finetune", model, "--data", "mnist", "--train", "pgd", "--eps", "0.05", "--steps", "2",
                  "--limit", "1000", "--eval-limit", "200", "--quiet", "-o", out, *extra)


def test_convert_finetune_prune_export_certify_keep_the_normalization(user_model, mnist_test, tmp_path):
    from certify.cli import app as certify_app

    converted, tuned, exported = tmp_path / "hard.safetensors", tmp_path / "ft.safetensors", tmp_path / "m.onnx"
    pruned = tmp_path / "pruned.safetensors"
    code, output = harden("convert", user_model, "--arch", "small-cnn", *NORMALIZE, "-o", converted)
    assert code == 0, output
    assert load_bundle(converted).data["mean"] == [MEAN] and load_bundle(converted).data["std"] == [STD]
    code, output = finetune(converted, tuned)
    assert code == 0, output
    assert "warning" not in output  # the right normalization: no warning before training
    code, output = harden("prune", tuned, "--data", "mnist", "--sparsity", "0.5", "--epochs", "1", "--limit", "1000",
                          "--eval-limit", "200", "--quiet", "-o", pruned)
    assert code == 0 and "warning" not in output, output
    code, output = harden("export", pruned, "-o", exported)
    assert code == 0, output
    data = json.loads({p.key: p.value for p in onnx.load(str(exported)).metadata_props}["harden.data"])
    assert data["mean"] == [MEAN] and data["std"] == [STD]

    report = tmp_path / "report.json"
    result = CliRunner().invoke(certify_app, [str(exported), "--eps", "0.01", "--limit", "200", "--method", "ibp",
                                              "--no-attack", "--quiet", "--json", str(report)])
    assert result.exit_code == 0, result.output
    certified = json.loads(report.read_text())["results"][0]["clean_accuracy"]
    bundle = load_bundle(pruned)
    with torch.no_grad():
        predictions = training_module(bundle)(mnist_test.x[:200]).argmax(1)
        raw_predictions = bundle.module(mnist_test.x[:200]).argmax(1)
    in_torch = int((predictions == mnist_test.y[:200]).sum()) / 200
    assert certified == in_torch and in_torch > 0.9
    assert (raw_predictions != predictions).any()  # the normalization really changes what the model says


def test_forgetting_the_normalization_is_warned_about_before_finetuning(user_model, tmp_path):
    converted = tmp_path / "hard.safetensors"
    assert harden("convert", user_model, "--arch", "small-cnn", "-o", converted)[0] == 0
    code, output = finetune(converted, tmp_path / "ft.safetensors", "--epochs", "1")
    assert code == 0, output
    warning = " ".join(line for line in output.splitlines() if line.strip())
    assert "warning: clean accuracy before fine-tuning" in warning and "normalization is probably wrong" in warning
    assert re.search(r"with --mean 0\.1\d* --std 0\.3\d* \(this data's own statistics\)", warning), warning


def test_a_later_conflicting_normalization_is_refused_in_one_line(user_model, tmp_path):
    converted = tmp_path / "hard.safetensors"
    assert harden("convert", user_model, "--arch", "small-cnn", *NORMALIZE, "-o", converted)[0] == 0
    for command, out in (("finetune", tmp_path / "ft.safetensors"), ("export", tmp_path / "m.onnx")):
        args = ["--data", "mnist", "--train", "clean", "--quiet"] if command == "finetune" else []
        code, output = harden(command, converted, *args, "--mean", "0.5", "--std", "0.5", "-o", out)
        lines = [line for line in output.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, output
        assert lines[0].startswith("error: --mean 0.5 --std 0.5 disagrees with the normalization the model records")
        assert not out.exists()
    # Giving the recorded values again is no conflict.
    assert harden("export", converted, *NORMALIZE, "-o", tmp_path / "same.onnx")[0] == 0


def small_bundle(input_shape=(3, 8, 8)) -> Bundle:
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))
    return Bundle(module, input_shape, 10, {"kind": "zoo", "name": "small-cnn"})


def test_take_normalization_records_once_and_compares_per_channel():
    bundle = small_bundle()
    take_normalization(bundle, [0.5], [0.25])
    assert bundle.data["mean"] == [0.5] and bundle.data["std"] == [0.25]
    take_normalization(bundle, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # the same map, written per channel
    take_normalization(bundle, None, None)  # nothing given: the record stands
    with pytest.raises(UserError, match="disagrees with the normalization the model records"):
        take_normalization(bundle, [0.5, 0.4, 0.5], [0.25, 0.25, 0.25])
    with pytest.raises(UserError, match="gives 2 values, the model's input has 3 channel"):
        take_normalization(small_bundle(), [0.5, 0.4], [0.25, 0.25])


def test_a_model_trained_on_raw_pixels_takes_no_normalization_later():
    bundle = small_bundle()
    bundle.history.append({"run": "train"})
    with pytest.raises(UserError, match="already trained on raw pixels"):
        take_normalization(bundle, [0.5], [0.25])


def test_a_model_near_chance_is_warned_about(mnist_train, mnist_test):
    from harden.training.plausibility import warn_if_implausible

    torch.manual_seed(0)
    bundle = Bundle(small_cnn(), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"})  # untrained
    messages: list[str] = []
    found = warn_if_implausible(bundle, mnist_train.subset(1000), mnist_test, messages.append, when="before pruning")
    assert found < 0.3 and len(messages) == 1
    assert messages[0].startswith(f"warning: clean accuracy before pruning is {100 * found:.1f}% on 500 samples")


def test_harden_train_trains_behind_the_normalization_and_records_it(mnist_test, tmp_path):
    """`harden train --mean/--std` trains on normalized inputs (the accuracy it reports is the one
    measured behind the map) and records the map, so a later step needs no --mean/--std and a
    different one is refused."""
    from harden.training.train import accuracy

    out = tmp_path / "m.safetensors"
    code, output = harden("train", "--data", "mnist", "--epochs", "1", *NORMALIZE, "--quiet", "-o", out)
    assert code == 0, output
    bundle = load_bundle(out)
    assert (bundle.data["mean"], bundle.data["std"]) == ([MEAN], [STD])
    reported = bundle.history[-1]["test_accuracy"]
    behind_map = accuracy(training_module(bundle), mnist_test, device=torch.device("cpu"))
    assert abs(behind_map - reported) < 1e-9 and reported > 0.9
    assert accuracy(bundle.module, mnist_test, device=torch.device("cpu")) < reported  # raw pixels: not what it learnt
    code, output = finetune(out, tmp_path / "ft.safetensors", "--mean", "0.5", "--std", "0.5")
    assert code == 2 and "disagrees with the normalization the model records" in output
