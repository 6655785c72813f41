"""`harden convert` end to end through the command line, on a really trained model."""

from __future__ import annotations

import copy
import re
import textwrap

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from harden.io.bundle import Bundle

from harden.io.bundle_file import load_bundle, save_bundle
from harden.cli import app
from harden.convert import DEFAULT_BETA, convert
from harden.io.loading import load_model
from harden.layers.norms import conv_operator_matrix
from harden.layers.spectral import spectral_layers
from harden.training.train import accuracy
from harden.io.zoo import small_cnn

runner = CliRunner()


def explicit_norms(module: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Every Conv2d / Linear's l2 operator norm from its explicit matrix (no power iteration), on
    the layer's real input size (recorded by hooks on one forward)."""
    sizes: dict[nn.Module, tuple[int, int]] = {}
    layers = {m: name for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def record(layer: nn.Module, args: tuple) -> None:
        sizes[layer] = tuple(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    module.eval()
    with torch.no_grad():
        module(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    norms = {}
    with torch.no_grad():
        for layer, name in layers.items():
            matrix = conv_operator_matrix(layer, sizes[layer]) if isinstance(layer, nn.Conv2d) \
                else layer.weight.double()
            norms[name] = top_singular_value(matrix)
    return norms


def top_singular_value(matrix: torch.Tensor) -> float:
    # sigma_max^2 is the top eigenvalue of the smaller Gram matrix: much cheaper than an SVD here.
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float(torch.linalg.eigvalsh(gram)[-1].sqrt())


@pytest.fixture(scope="module")
def norms_before(trained_small_cnn) -> dict[str, float]:
    return explicit_norms(copy.deepcopy(trained_small_cnn.module), (1, 28, 28))


@pytest.fixture(scope="module")
def converted(trained_small_cnn, tmp_path_factory):
    """`harden convert model.pt` with nothing else, on the trained CNN saved as TorchScript."""
    folder = tmp_path_factory.mktemp("convert")
    model = copy.deepcopy(trained_small_cnn.module).eval()
    torch.jit.trace(model, torch.zeros(1, 1, 28, 28)).save(str(folder / "model.pt"))
    result = runner.invoke(app, ["convert", str(folder / "model.pt")])
    assert result.exit_code == 0, result.output
    # Loaded once here: loading re-applies the recipe, which converges every power iteration.
    return folder, result, load_bundle(folder / "model.hard.safetensors")


def test_default_convert_writes_next_to_the_input_and_reports_each_layer(converted, norms_before):
    folder, result, _ = converted
    assert (folder / "model.hard.safetensors").is_file()
    lines = [line for line in result.output.splitlines() if "sigma" in line]
    assert [line.split()[0] for line in lines] == ["conv2d_0", "conv2d_1", "linear_0", "linear_1"]
    before = norms_before
    for line, sigma in zip(lines, before.values()):
        printed_before, printed_after = map(float, re.search(r"sigma ([\d.]+) -> ([\d.]+)", line).groups())
        assert printed_before == pytest.approx(sigma, abs=2e-3)  # the true operator norm, printed to 3 places
        assert printed_after == pytest.approx(min(sigma, DEFAULT_BETA), abs=2e-3)
        assert ("clipped" in line) == (sigma > DEFAULT_BETA)
    assert any(sigma > DEFAULT_BETA for sigma in before.values())  # the default does something here
    assert f"beta={DEFAULT_BETA}" in result.output


def test_every_layer_is_within_beta_after_save_load_and_onnx_round_trip(converted, tmp_path):
    folder, _, bundle = converted
    assert len(spectral_layers(bundle.module)) == 4
    for name, sigma in explicit_norms(bundle.module, (1, 28, 28)).items():
        assert sigma <= DEFAULT_BETA * (1 + 1e-3), name
    result = runner.invoke(app, ["export", str(folder / "model.hard.safetensors"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    imported = load_model(tmp_path / "m.onnx")
    norms = explicit_norms(imported.module, (1, 28, 28))
    assert len(norms) == 4
    for name, sigma in norms.items():
        assert sigma <= DEFAULT_BETA * (1 + 1e-3), name
    assert max(norms.values()) >= DEFAULT_BETA * (1 - 1e-3)  # clipped layers sit at beta


def test_converted_model_keeps_its_accuracy(converted, trained_small_cnn, mnist_test):
    _, _, bundle = converted
    test = mnist_test.subset(2000)
    cpu = torch.device("cpu")
    before = accuracy(copy.deepcopy(trained_small_cnn.module), test, device=cpu)
    after = accuracy(bundle.module, test, device=cpu)
    assert after >= 0.95 and after >= before - 0.02, (before, after)


def _fails(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_errors_are_one_line_and_write_nothing(converted, tmp_path):
    folder, _, _ = converted
    source = str(folder / "model.pt")
    for beta in ("0", "-1"):
        _fails(["convert", source, "--spectral-norm", beta, "-o", str(tmp_path / "x.safetensors")], "is not positive")
    _fails(["convert", source, "--layers", "conv,attention", "-o", str(tmp_path / "x.safetensors")],
           "unknown --layers kind attention")
    _fails(["convert", str(tmp_path / "missing.pt")], "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_converting_twice_is_refused(tmp_path):
    shape = (1, 12, 12)  # small: loading the converted file converges its power iterations again
    bundle = Bundle(small_cnn(shape), shape, 10, {"kind": "zoo", "name": "small-cnn"})
    convert(bundle)
    save_bundle(bundle, tmp_path / "once.safetensors")
    _fails(["convert", str(tmp_path / "once.safetensors"), "-o", str(tmp_path / "twice.safetensors")],
           "already has spectral normalization")
    assert not (tmp_path / "twice.safetensors").exists()


def test_reflect_padding_is_normalized_exactly(tmp_path, monkeypatch):
    """A conv with padding_mode='reflect' is a different linear map from zero padding; its norm is
    taken on that map (checked against the explicit matrix), not refused and not approximated."""
    (tmp_path / "reflectnet_arch.py").write_text(textwrap.dedent("""
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(3 * 10 * 9, 4))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    import reflectnet_arch

    model = reflectnet_arch.build()
    with torch.no_grad():
        model[0].weight.mul_(4.0)
    before = explicit_norms(copy.deepcopy(model), (1, 10, 9))
    zero_padded = nn.Conv2d(1, 3, 3, padding=1)
    zero_padded.load_state_dict(model[0].state_dict())
    assert abs(top_singular_value(conv_operator_matrix(zero_padded, (10, 9))) - before["0"]) > 1e-2
    torch.save(model.state_dict(), tmp_path / "reflect.pt")
    beta = 0.5
    result = runner.invoke(app, ["convert", str(tmp_path / "reflect.pt"), "--arch", "reflectnet_arch:build",
                                 "--input-shape", "1,10,9", "--spectral-norm", str(beta)])
    assert result.exit_code == 0, result.output
    assert f"sigma {before['0']:.3f}" in result.output
    bundle = load_bundle(tmp_path / "reflect.hard.safetensors", arch="reflectnet_arch:build")  # its factory: trusted by name
    for name, sigma in explicit_norms(bundle.module, (1, 10, 9)).items():
        assert beta * (1 - 1e-3) <= sigma <= beta * (1 + 1e-3), name

