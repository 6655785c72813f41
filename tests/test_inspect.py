"""`harden inspect`: per-layer numbers equal the norms module's, the Lipschitz products really bound
the network, and it works on ONNX files and on spectrally normalized bundles."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
from torch import nn
from typer.testing import CliRunner

from harden.io.bundle import Bundle

from harden.io.bundle_file import save_bundle
from harden.cli import app
from harden.convert import convert
from harden.io.export import export_onnx
from harden.inspect import MAX_ITERS, TOLERANCE, inspect_model
from harden.layers.norms import (condition_number, conv_operator_matrix, l1_norm, linf_norm,
                          operator_spectral_norm, sparsity)
from harden.io.zoo import small_cnn

SHAPE = (1, 14, 14)


def known_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 4 x 7 x 7
        nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(1, 2)), nn.ReLU(),  # 6 x 7 x 5
        nn.MaxPool2d(3, stride=2, padding=1),  # 6 x 4 x 3, overlapping windows
        nn.Flatten(), nn.Linear(72, 20), nn.Tanh(), nn.Linear(20, 5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.2, 2.0)
        model[1].weight.uniform_(-2, 2)
        model[7].weight[:, :18] = 0.0  # 25% zeros
    return model.eval()


def rows_by_name(document: dict) -> dict[str, dict]:
    return {row["name"]: row for row in document["layers"]}


def test_layer_values_equal_the_norms_functions():
    model = known_model()
    document = inspect_model(model, SHAPE)
    rows = rows_by_name(document)
    assert [row["name"] for row in document["layers"]] == [str(i) for i in range(10)]
    for name, input_hw in (("0", (14, 14)), ("3", (7, 7)), ("7", None), ("9", None)):
        layer, row = model[int(name)], rows[name]
        sigma, steps = operator_spectral_norm(layer, input_hw, iters=MAX_ITERS, tol=TOLERANCE)
        assert row["spectral_norm"]["value"] == sigma and row["spectral_norm"]["iterations"] == steps
        assert row["spectral_norm"]["converged"]
        assert row["l1_norm"] == l1_norm(layer, input_hw) and row["linf_norm"] == linf_norm(layer, input_hw)
        assert row["condition_number"] == condition_number(layer.weight)
        assert row["sparsity"] == sparsity(layer.weight)
        assert row["weight_shape"] == list(layer.weight.shape)
        # Converged means near the true norm: compare with the explicit operator matrix.
        matrix = conv_operator_matrix(layer, input_hw) if input_hw else layer.weight.double()
        assert sigma == pytest.approx(float(torch.linalg.matrix_norm(matrix, 2)), rel=1e-4)
    assert rows["3"]["input_shape"] == [4, 7, 7] and rows["3"]["output_shape"] == [6, 7, 5]
    assert rows["7"]["sparsity"] == pytest.approx(0.25)
    bn = model[1]
    gain = float((bn.weight / (bn.running_var + bn.eps).sqrt()).abs().max())
    assert rows["1"]["l2_gain"] == pytest.approx(gain) and rows["1"]["linf_gain"] == pytest.approx(gain)
    # 3x3 windows at stride 2: a pixel lies in up to 2 windows per axis.
    assert rows["5"]["l2_gain"] == pytest.approx(2.0) and rows["5"]["linf_gain"] == 1.0
    bounds = document["lipschitz"]
    product = 1.0
    for row in document["layers"]:
        product *= row["l2_gain"]
    assert bounds["l2_upper_bound"] == pytest.approx(product) and bounds["why_not"] is None
    assert bounds["l2_upper_bound_hoelder"] >= bounds["l2_upper_bound"]  # sqrt(l1 linf) >= sigma


def test_a_stalled_power_iteration_falls_back_to_the_explicit_matrix():
    model = known_model()
    rows = rows_by_name(inspect_model(model, SHAPE, max_iters=3))
    for name, input_hw in (("0", (14, 14)), ("3", (7, 7)), ("7", None)):
        spectral = rows[name]["spectral_norm"]
        matrix = conv_operator_matrix(model[int(name)], input_hw) if input_hw else model[int(name)].weight.double()
        assert not spectral["converged"] and spectral["method"].startswith("explicit matrix")
        assert spectral["value"] == pytest.approx(float(torch.linalg.matrix_norm(matrix, 2)), rel=1e-9)
        assert spectral["power_iteration_value"] <= spectral["value"] * (1 + 1e-12)  # it approaches from below
        assert rows[name]["l2_gain"] == spectral["value"]


def observed_ratios(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x) - model(y)
    diff = (x - y).flatten(1)
    l2 = (out.norm(dim=1) / diff.norm(dim=1)).max()
    linf = (out.abs().amax(1) / diff.abs().amax(1)).max()
    return float(l2), float(linf)


def test_lipschitz_bounds_hold_on_random_pairs():
    model = known_model()
    bounds = inspect_model(model, SHAPE)["lipschitz"]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(400, *SHAPE, generator=generator)
    for scale in (1e-3, 1e-1, 1.0):
        y = x + scale * torch.randn(x.shape, generator=generator)
        l2, linf = observed_ratios(model, x, y)
        assert 0 < l2 <= bounds["l2_upper_bound"] and 0 < linf <= bounds["linf_upper_bound"]


def test_bounds_are_attained_by_a_linear_model():
    """On one Linear layer the product bounds are the exact Lipschitz constants: a pair along the
    top singular vector reaches the l2 bound, one along the sign of the heaviest row the linf bound."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    bounds = inspect_model(model, (1, 4, 4))["lipschitz"]
    weight = model[1].weight.detach()
    top = torch.linalg.svd(weight).Vh[0].reshape(1, 1, 4, 4)
    heaviest = weight[weight.abs().sum(1).argmax()].sign().reshape(1, 1, 4, 4)
    x = torch.rand(1, 1, 4, 4)
    assert observed_ratios(model, x + top, x)[0] == pytest.approx(bounds["l2_upper_bound"], rel=1e-5)
    assert observed_ratios(model, x + heaviest, x)[1] == pytest.approx(bounds["linf_upper_bound"], rel=1e-5)


def test_inspect_an_onnx_file_through_the_cli(tmp_path):
    shape = (1, 12, 12)
    model = small_cnn(shape).eval()
    path = tmp_path / "model.onnx"
    export_onnx(Bundle(model, shape, 10, {"kind": "zoo", "name": "small-cnn"}), path)
    result = CliRunner().invoke(app, ["inspect", str(path), "--json", "-"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["model"]["path"] == str(path) and len(document["model"]["sha256"]) == 64
    names = [row["name"] for row in document["layers"]]
    assert names == ["conv2d_0", "relu_0", "conv2d_1", "relu_1", "flatten", "linear_0", "relu_2", "linear_1"]
    direct = inspect_model(model, shape)
    for row, reference in zip([r for r in document["layers"] if "spectral_norm" in r],
                              [r for r in direct["layers"] if "spectral_norm" in r]):
        assert row["spectral_norm"]["value"] == pytest.approx(reference["spectral_norm"]["value"], rel=1e-6)
        assert row["linf_norm"] == pytest.approx(reference["linf_norm"], rel=1e-6)
    for key in ("l2_upper_bound", "linf_upper_bound"):
        assert document["lipschitz"][key] == pytest.approx(direct["lipschitz"][key], rel=1e-5)


def test_inspect_a_spectrally_normalized_bundle_shows_sigma_below_beta(tmp_path):
    torch.manual_seed(0)
    shape = (1, 12, 12)
    bundle = Bundle(small_cnn(shape), shape, 10, {"kind": "zoo", "name": "small-cnn"})
    convert(bundle, spectral_norm=0.5)
    path = save_bundle(bundle, tmp_path / "sn.safetensors")
    out = tmp_path / "report" / "inspect.json"
    result = CliRunner().invoke(app, ["inspect", str(path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "<= 0.5" in result.stdout and "upper bound" in result.stdout
    document = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["inspect.json"]  # written atomically, no leftovers
    weight_rows = [row for row in document["layers"] if "spectral_norm" in row]
    assert len(weight_rows) == 4
    for row in weight_rows:
        assert row["sn_beta"] == 0.5
        assert row["spectral_norm"]["value"] <= 0.5 * (1 + 1e-3)
    assert document["lipschitz"]["l2_upper_bound"] <= 0.5 ** 4 * (1 + 1e-3) ** 4


def test_a_residual_graph_gets_no_product_bound():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.flatten, self.inner, self.outer = nn.Flatten(), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.flatten(x)
            return self.outer(h + torch.relu(self.inner(h)))

    document = inspect_model(fx.symbolic_trace(Residual()), (1, 4, 4))
    assert document["lipschitz"]["l2_upper_bound"] is None
    assert "joins two computed values" in document["lipschitz"]["why_not"]
    # A plain module with its own forward is traced the same way: the residual is found, not multiplied through.
    plain = inspect_model(Residual(), (1, 4, 4))["lipschitz"]
    assert plain["l2_upper_bound"] is None and plain["l2_upper_bound_hoelder"] is None
    assert "joins two computed values" in plain["why_not"]


RESIDUAL_FACTORY = """
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = x.view(x.size(0), -1)
        return self.outer(h + torch.relu(self.inner(h)))


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x.view(x.size(0), -1))))


def residual():
    return Residual()


def chain():
    return Chain()
"""


def test_inspect_of_a_factory_bundle_refuses_the_product_for_a_residual(tmp_path, monkeypatch):
    """A bundle whose architecture is a user factory: its forward is Python, not a graph; a
    residual there must give no "upper bound" (the product of layer norms does not bound x + f(x))."""
    (tmp_path / "residual_arch.py").write_text(RESIDUAL_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    from harden.io.architecture import build_plain_module, resolve_arch

    documents = {}
    for name in ("residual", "chain"):
        record = resolve_arch(f"residual_arch:{name}")
        torch.manual_seed(0)
        bundle = Bundle(build_plain_module(record, (1, 4, 4), 3), (1, 4, 4), 3, record)
        path = save_bundle(bundle, tmp_path / f"{name}.safetensors")
        result = CliRunner().invoke(app, ["inspect", str(path), "--trust-code", "--json", "-"])
        assert result.exit_code == 0, result.output
        documents[name] = json.loads(result.stdout)["lipschitz"]
    assert documents["residual"]["l2_upper_bound"] is None and documents["residual"]["linf_upper_bound"] is None
    assert "joins two computed values" in documents["residual"]["why_not"]
    # The same layers in a chain (x.size(0) is a size, not a second value) keep their bound.
    assert documents["chain"]["why_not"] is None and documents["chain"]["l2_upper_bound"] > 0


def test_inspect_errors(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and "does not exist" in result.output

