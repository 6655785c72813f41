"""The Lipschitz-margin stage (certify.bounds.lipschitz) and its operator norms.

Its constants are UPPER bounds: at least every gradient norm found by sampling and by gradient
ascent, and the Gram / SVD layer norms at least the exact norm of the explicit matrix. Its bounds
lie below sampled and attacked margins (l2 and l-infinity); a sample it verifies at l2 survives
PGD-l2 with restarts; graphs where the product rule fails are refused, and the stage then decides
nothing.
"""

from __future__ import annotations

import json

import pytest
import test_soundness
import torch
from torch import nn

from certify.attacks.gradient import PGD, find_adversarial
from certify.bounds.bounder import (MarginBounder, empirical_margins,
                                    margin_matrix)
from certify.bounds.lipschitz import analyse
from certify.bounds.operator_norms import (EXACT_SVD, GRAM_FFT, GRAM_MATRIX,
                                           ROUNDING, conv_fft_gram,
                                           conv_matrix, conv_norms,
                                           gram_iteration, matrix_l2)
from certify.data.datasets import load_dataset
from certify.verdicts.cascade import (FALSIFIED, UNKNOWN, VERIFIED,
                                      CascadeOptions, certify_batch,
                                      lower_bounds)

cnn_onnx, module = test_soundness.cnn_onnx, test_soundness.module

# (in, out, kernel, stride, padding, dilation, groups, size): strides, uneven fits, dilation, groups.
CONVS = [(3, 8, 3, 1, 1, 1, 1, 10), (4, 6, 4, 2, 1, 1, 2, 9), (2, 5, 3, 1, 0, 2, 1, 11),
         (2, 5, 3, 3, 2, 2, 1, 11), (3, 4, 5, 2, 0, 1, 1, 12), (1, 6, 4, 2, 1, 1, 1, 13)]


@pytest.mark.parametrize("shape", CONVS)
def test_conv_bounds_are_at_least_the_exact_norm(shape):
    c_in, c_out, k, s, p, d, g, size = shape
    torch.manual_seed(sum(shape))
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g)
    matrix = conv_matrix(conv, (c_in, size, size))
    with torch.no_grad():
        x = torch.randn(3, c_in, size, size, dtype=torch.float64)
        assert torch.allclose((matrix @ x.flatten(1).T).T, conv._conv_forward(x, conv.weight.double(), None).flatten(1))
    exact = float(torch.linalg.matrix_norm(matrix, ord=2))
    gram = conv_fft_gram(conv, (c_in, size, size))
    l2, linf = conv_norms(conv, (c_in, size, size))
    assert exact <= gram * (1 + ROUNDING) and gram <= 1.25 * exact  # an upper bound, and not a useless one
    assert l2.method == EXACT_SVD and exact <= l2.value <= exact * (1 + 1e-5)
    assert linf == pytest.approx(float(matrix.abs().sum(1).max()), rel=1e-12)


def test_gram_iteration_bounds_dense_and_complex_matrices():
    generator = torch.Generator().manual_seed(0)
    for matrices in (torch.randn(5, 30, 7, generator=generator, dtype=torch.float64),
                     torch.randn(4, 6, 9, generator=generator, dtype=torch.complex128)):
        exact = torch.linalg.matrix_norm(matrices, ord=2)
        bound = gram_iteration(matrices)
        assert (bound * (1 + ROUNDING) >= exact).all() and (bound <= exact * 1.01).all()
    assert gram_iteration(torch.zeros(1, 3, 3)).item() == 0.0
    large = torch.randn(1100, 1000, generator=generator, dtype=torch.float64)  # past the explicit limit
    bound, exact = matrix_l2(large), float(torch.linalg.matrix_norm(large, ord=2))
    assert bound.method == GRAM_MATRIX and exact <= bound.value <= exact * 1.02


def test_large_convs_use_the_gram_bound():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    l2, _ = conv_norms(conv, (16, 16, 16))
    assert l2.method == GRAM_FFT
    # power iteration from below must not exceed it
    x = torch.randn(1, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = conv.weight.detach().double()
    for _ in range(60):
        y = conv._conv_forward(x, weight, None)
        x = torch.nn.grad.conv2d_input(x.shape, weight, y, padding=1)
        x = x / x.norm()
    assert conv._conv_forward(x, weight, None).norm().item() <= l2.value


def _mixed_net(activation: nn.Module) -> nn.Module:
    """Every kind of step: strided conv, BatchNorm with real statistics, pooling, scaling, dense."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), activation,
                        nn.Conv2d(4, 6, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2),
                        nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(24, 12), nn.Sigmoid(), nn.Linear(12, 5))
    net.train()
    with torch.no_grad():
        net(torch.rand(64, 1, 12, 12) * 3)  # running statistics away from (0, 1)
    return net.eval()


def _gradients(net: nn.Module, x: torch.Tensor, c: torch.Tensor, *, create_graph=False) -> torch.Tensor:
    x = x.detach().requires_grad_(True) if not x.requires_grad else x
    (grad,) = torch.autograd.grad((net(x) * c).sum(), x, create_graph=create_graph)
    return grad.flatten(1)


@pytest.mark.parametrize("activation", [nn.Tanh(), nn.ELU(1.5)])
def test_constant_is_at_least_every_gradient_norm(activation):
    """Sampled gradient norms, then gradient ascent on ||J^T c|| (the nets are smooth enough here)."""
    net = _mixed_net(activation).double()
    chain = analyse(net, (1, 12, 12))
    assert chain.refused is None and chain.head_name == "10"
    assert chain.steps[0].kind == "Conv2d+BatchNorm"  # folded: diag(scale) W, not max|scale| * ||W||
    c = margin_matrix(torch.tensor([2]), 5)[0].double()  # rows e_2 - e_j
    l2, linf = chain.l2_constants(c[None])[0], chain.linf_constants(c[None])[0]
    generator = torch.Generator().manual_seed(4)
    for k in range(c.shape[0]):
        x = torch.rand(256, 1, 12, 12, generator=generator, dtype=torch.float64) * 2 - 0.5
        grads = _gradients(net, x, c[k])
        assert grads.norm(dim=1).max() <= l2[k] and grads.abs().sum(1).max() <= linf[k]
        x = x[grads.norm(dim=1).argsort()[-8:]].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=0.05)
        for _ in range(60):
            loss = -_gradients(net, x, c[k], create_graph=True).norm(dim=1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        grads = _gradients(net, x, c[k])
        assert grads.norm(dim=1).max() <= l2[k] and grads.abs().sum(1).max() <= linf[k]


def test_constant_is_at_least_every_difference_quotient_of_a_relu_net():
    """ReLU nets have piecewise-constant gradients: ascend |g(x + d) - g(x)| / ||d|| instead."""
    net = _mixed_net(nn.ReLU()).double()
    chain = analyse(net, (1, 12, 12))
    c = margin_matrix(torch.tensor([0]), 5).double()
    l2 = chain.l2_constants(c)[0]
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(32, 1, 12, 12, generator=generator, dtype=torch.float64).requires_grad_(True)
    d = (torch.randn(32, 1, 12, 12, generator=generator, dtype=torch.float64) * 0.1).requires_grad_(True)
    optimizer = torch.optim.Adam([x, d], lr=0.02)
    for _ in range(80):
        quotient = ((net(x + d) - net(x)) @ c[0].T).abs() / d.flatten(1).norm(dim=1, keepdim=True)
        optimizer.zero_grad()
        (-quotient.sum()).backward()
        optimizer.step()
    with torch.no_grad():
        quotient = ((net(x + d) - net(x)) @ c[0].T).abs() / d.flatten(1).norm(dim=1, keepdim=True)
    assert (quotient.max(0).values <= l2).all()
    assert (quotient.max(0).values > 0.01 * l2).all()  # the ascent found real slopes


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x + torch.relu(self.inner(x)))


class _Concatenated(_Residual):
    def forward(self, x):
        return self.head(torch.cat([x[:, :3], torch.relu(self.inner(x))[:, 3:]], 1))


class _Squared(_Residual):
    def forward(self, x):
        return self.head(self.inner(x) * x)


@pytest.mark.parametrize("net", [_Residual(), _Concatenated(), _Squared()])
def test_joins_are_refused_and_the_stage_decides_nothing(net):
    net = net.eval()
    chain = analyse(net, (6,))
    assert chain.refused is not None and "product rule" in chain.refused
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 0])
    bounder = MarginBounder(net, (6,))
    bound = lower_bounds(bounder, x - 1e-3, x + 1e-3, margin_matrix(y, 3), "lipschitz")
    assert torch.isinf(bound).all() and (bound < 0).all()
    options = CascadeOptions(methods=("lipschitz",), attack=False)
    verdicts = certify_batch(net, bounder, x, y, (x - 1e-3, x + 1e-3), list(range(4)), options)
    assert {v.verdict for v in verdicts} <= {UNKNOWN, FALSIFIED} and all(v.method in (None, "clean") for v in verdicts)


def test_unknown_operations_are_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    assert "GELU" in analyse(net, (4,)).refused


@pytest.fixture(scope="module")
def data():
    test = load_dataset("mnist", "test")
    return test.x[:40].reshape(-1, 1, 28, 28), test.y[:40]


def test_imported_chain_matches_the_torch_model(module, trained_small_cnn):
    imported, original = analyse(module, (1, 28, 28)), analyse(trained_small_cnn.module.eval(), (1, 28, 28))
    assert imported.refused is None and imported.head is not None
    assert imported.to_json()["l2_product"] == pytest.approx(original.to_json()["l2_product"], rel=1e-9)


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_bounds_lie_below_sampled_and_attacked_margins(module, data, norm):
    x, y = data[0][:8], data[1][:8]
    eps = 0.3 if norm == "2" else 0.02
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    bounder = MarginBounder(module, (1, 28, 28))
    ball = (x, torch.full((8,), eps, dtype=torch.float64)) if norm == "2" else None
    bound = lower_bounds(bounder, lower, upper, margin_matrix(y, 10), "lipschitz", l2_ball=ball)
    assert torch.isfinite(bound).all()
    attacked = PGD(module, eps, norm=norm, steps=50, restarts=2, loss="margin",
                   generator=torch.Generator().manual_seed(6))(x, y)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        assert (bound <= empirical_margins(module(attacked), y) + 1e-5).all()
        for i in range(8):
            noise = torch.randn(500, 1, 28, 28, generator=generator)
            if norm == "2":
                noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
            else:
                noise = noise.sign() * eps
            points = (x[i] + noise).clamp(0, 1)
            margins = empirical_margins(module(points), y[i].expand(500))
            assert (bound[i] <= margins.min(0).values + 1e-5).all()


def test_verified_at_l2_survives_pgd_l2(module, data):
    x, y = data
    eps = 0.05
    bounder = MarginBounder(module, (1, 28, 28))
    radii = torch.full((len(y),), eps, dtype=torch.float64)
    options = CascadeOptions(methods=("lipschitz",), attack=False)
    verdicts = certify_batch(module, bounder, x, y, ((x - eps).clamp(0, 1), (x + eps).clamp(0, 1)),
                             list(range(len(y))), options, l2_radii=radii)
    rows = torch.tensor([v.index for v in verdicts if v.verdict == VERIFIED])
    assert len(rows) >= 20 and all(v.method == "lipschitz" for v in verdicts if v.verdict == VERIFIED)
    found, _ = find_adversarial(module, x[rows], y[rows], (x[rows] - eps).clamp(0, 1), (x[rows] + eps).clamp(0, 1),
                                steps=100, restarts=10, seed=8, l2_ball=(x[rows], radii[rows]))
    assert not found.any()
    other = PGD(module, eps, norm="2", steps=100, restarts=10, loss="margin",
                generator=torch.Generator().manual_seed(9))(x[rows], y[rows])
    with torch.no_grad():
        assert (module(other).argmax(1) == y[rows]).all()


class _FlatResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.flatten(x, 1)
        return self.head(h + torch.relu(self.inner(h)))


def test_an_imported_residual_graph_is_refused(tmp_path):
    from certify.onnx_import.certifiable import load_certifiable
    from harden.io.bundle import Bundle
    from harden.io.export import export_onnx

    torch.manual_seed(0)
    path = tmp_path / "residual.onnx"
    export_onnx(Bundle(_FlatResidual().eval(), (1, 4, 4), 3, {"kind": "test"}), path)
    chain = analyse(load_certifiable(path).module, (1, 4, 4))
    assert chain.refused is not None and "joins two computed values" in chain.refused


def test_certify_model_runs_the_lipschitz_stage(cnn_onnx):
    from certify.verdicts.dataset import certify_model

    run = certify_model(cnn_onnx, [0.05], limit=10, batch_size=10, methods=("lipschitz",), attack_steps=10,
                        quiet=True, norm="2")
    summary = run.results[0].summary()
    assert summary["verified_by"].get("lipschitz", 0) >= 3 and set(summary["verified_by"]) == {"lipschitz"}


def test_vnnlib_runs_say_why_the_lipschitz_stage_decides_nothing(tmp_path, capfd):
    from certify.verdicts.vnnlib_check import check_properties
    from harden.io.bundle import Bundle
    from harden.io.export import export_onnx

    torch.manual_seed(0)
    path = tmp_path / "residual.onnx"
    export_onnx(Bundle(_FlatResidual().eval(), (1, 4, 4), 3, {"kind": "test"}), path)
    lines = [f"(declare-const X_{i} Real)" for i in range(16)] + [f"(declare-const Y_{j} Real)" for j in range(3)]
    lines += [f"(assert (>= X_{i} 0.4))\n(assert (<= X_{i} 0.6))" for i in range(16)]
    lines.append("(assert (or (>= Y_1 Y_0) (>= Y_2 Y_0)))")
    prop = tmp_path / "prop.vnnlib"
    prop.write_text("\n".join(lines) + "\n")
    capfd.readouterr()
    run = check_properties(path, [prop], methods=("lipschitz", "ibp"), attack_steps=5, quiet=False)
    err = capfd.readouterr().err
    assert "warning: the lipschitz stage decides nothing on residual.onnx" in err
    assert "joins two computed values" in err
    assert run.properties[0].method != "lipschitz"


def test_the_report_records_how_each_layer_was_bounded(cnn_onnx):
    from certify.reports.report import report_document
    from certify.verdicts.dataset import certify_model

    document = report_document(certify_model(cnn_onnx, [0.05], limit=4, batch_size=4, methods=("lipschitz", "ibp"),
                                             attack_steps=5, quiet=True, norm="2"))
    record = document["lipschitz"]
    assert record["refused"] is None and record["layers"]
    assert json.loads(json.dumps(record)) == record  # plain JSON
    assert record["l2_product"] > 0
    from certify.bounds.operator_norms import EXACT_SVD, GRAM_FFT, GRAM_MATRIX

    sound = {EXACT_SVD, GRAM_FFT, GRAM_MATRIX}
    assert sum(layer["method"] in sound for layer in record["layers"]) >= 2  # the CNN's convs and dense layers
    without = report_document(certify_model(cnn_onnx, [0.05], limit=4, batch_size=4, methods=("ibp",),
                                            attack_steps=5, quiet=True))
    assert without["lipschitz"] is None
