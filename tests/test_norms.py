"""Exact layer norms against the explicit matrix of the layer, and norm decay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from certify.common.errors import UserError
from conv_layers import conv_configs  # tests/conv_layers.py
from harden.layers.norm_decay import NormDecay
from harden.layers.norms import (condition_number, conv_operator_matrix, l1_norm, linf_norm, operator_spectral_norm,
                                 sparsity)

CONFIGS = conv_configs()
# 'same' padding is uneven for even kernels (one more zero on the right/bottom).
SAME = [(dict(in_channels=2, out_channels=3, kernel_size=(4, 3), padding="same", dilation=(1, 2)), (6, 9)),
        (dict(in_channels=2, out_channels=2, kernel_size=(2, 6), padding="same", groups=2), (5, 7))]
OTHER_MODES = [(dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1, padding_mode=mode), (7, 6))
               for mode in ("circular", "reflect", "replicate")]


def make_conv(kwargs: dict, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(**kwargs)


def test_explicit_matrix_is_the_layer():
    # Everything below is checked against this matrix, so check it against the layer first.
    for seed, (kwargs, hw) in enumerate(CONFIGS[:8] + SAME + OTHER_MODES):
        conv = make_conv(kwargs, seed).double()
        matrix = conv_operator_matrix(conv, hw)
        x = torch.randn(3, conv.in_channels, *hw, dtype=torch.float64)
        with torch.no_grad():
            expected = (conv(x) - conv.bias.reshape(1, -1, 1, 1)).reshape(3, -1)
        assert matrix.shape == (expected.shape[1], x[0].numel())
        torch.testing.assert_close(x.reshape(3, -1) @ matrix.t(), expected, rtol=0, atol=1e-12)


def test_conv_l1_linf_equal_the_explicit_matrix():
    assert len(CONFIGS) >= 30
    for seed, (kwargs, hw) in enumerate(CONFIGS + SAME):
        conv = make_conv(kwargs, seed)
        matrix = conv_operator_matrix(conv, hw).abs()
        l1, linf = l1_norm(conv, hw), linf_norm(conv, hw)
        assert l1 == pytest.approx(float(matrix.sum(0).max()), rel=1e-12), (kwargs, hw)
        assert linf == pytest.approx(float(matrix.sum(1).max()), rel=1e-12), (kwargs, hw)
        # Without a size: the large-input value, an upper bound for any size.
        assert l1_norm(conv) >= l1 * (1 - 1e-12) and linf_norm(conv) >= linf * (1 - 1e-12)


def test_conv_norms_without_size_are_the_kernel_formulas():
    # The definitions (max absolute row / column sum), written out with loops, on an input large enough
    # that every tap class is met in full: all three values agree.
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, kernel_size=(5, 4), stride=(2, 3), padding=(2, 1))
    kernel = conv.weight.detach().double().abs()
    by_class = [float(kernel[:, c, a::2, b::3].sum()) for c in range(3) for a in range(2) for b in range(3)]
    formula_l1 = max(by_class)
    formula_linf = float(kernel.sum((1, 2, 3)).max())
    matrix = conv_operator_matrix(conv, (20, 21)).abs()
    assert l1_norm(conv) == pytest.approx(formula_l1, rel=1e-12)
    assert float(matrix.sum(0).max()) == pytest.approx(formula_l1, rel=1e-12)
    assert linf_norm(conv) == pytest.approx(formula_linf, rel=1e-12)
    assert float(matrix.sum(1).max()) == pytest.approx(formula_linf, rel=1e-12)
    # Stride 1: l1 is the largest per-input-channel sum of |K|.
    conv1 = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    assert l1_norm(conv1) == pytest.approx(float(conv1.weight.detach().double().abs().sum((0, 2, 3)).max()), rel=1e-12)


def test_conv_spectral_norm_equals_top_singular_value():
    for seed, (kwargs, hw) in enumerate(CONFIGS + SAME + OTHER_MODES):
        conv = make_conv(kwargs, seed)
        exact = float(torch.linalg.matrix_norm(conv_operator_matrix(conv, hw), ord=2))
        sigma, steps = operator_spectral_norm(conv, hw, iters=5000, tol=1e-9)
        assert sigma == pytest.approx(exact, rel=1e-4), (kwargs, hw, steps)
        assert sigma <= exact * (1 + 1e-9)  # power iteration approaches from below
        assert 1 <= steps <= 5000


def test_spectral_norm_stops_on_tolerance_and_is_deterministic():
    conv = make_conv(*CONFIGS[0][:1], seed=0)
    hw = CONFIGS[0][1]
    loose = operator_spectral_norm(conv, hw, iters=1000, tol=1e-3)
    assert loose[1] < operator_spectral_norm(conv, hw, iters=1000, tol=1e-12)[1]
    assert operator_spectral_norm(conv, hw, iters=1000, tol=1e-3) == loose


def test_linear_norms():
    torch.manual_seed(2)
    layer = nn.Linear(13, 7)
    w = layer.weight.detach().double().numpy()
    assert l1_norm(layer) == pytest.approx(np.linalg.norm(w, 1), rel=1e-12)
    assert linf_norm(layer) == pytest.approx(np.linalg.norm(w, np.inf), rel=1e-12)
    sigma, _ = operator_spectral_norm(layer, iters=5000, tol=1e-13)
    assert sigma == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)


def test_unsupported_cases_are_user_errors():
    circular = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
    with pytest.raises(UserError, match="circular"):
        l1_norm(circular, (6, 6))
    with pytest.raises(UserError, match="circular"):
        linf_norm(circular)
    with pytest.raises(UserError, match="input size"):
        operator_spectral_norm(nn.Conv2d(1, 1, 3))
    with pytest.raises(UserError, match="too small"):
        operator_spectral_norm(nn.Conv2d(1, 1, 5), (3, 3))
    with pytest.raises(UserError):
        l1_norm(nn.Conv1d(1, 1, 3))


def test_parametrized_layer_is_measured_on_its_effective_weight():
    class Half(nn.Module):
        def forward(self, w):
            return 0.5 * w

    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    before = (l1_norm(conv, (5, 5)), linf_norm(conv, (5, 5)), operator_spectral_norm(conv, (5, 5))[0])
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Half())
    after = (l1_norm(conv, (5, 5)), linf_norm(conv, (5, 5)), operator_spectral_norm(conv, (5, 5))[0])
    for b, a in zip(before, after):
        assert a == pytest.approx(0.5 * b, rel=1e-9)


def test_condition_number_matches_numpy():
    rng = np.random.default_rng(4)
    for shape in [(5, 5), (4, 9), (9, 4)]:
        w = rng.standard_normal(shape)
        assert condition_number(torch.from_numpy(w).float()) == pytest.approx(
            np.linalg.cond(w.astype(np.float32).astype(np.float64), 2), rel=1e-9)
    kernel = torch.randn(6, 2, 3, 3)
    assert condition_number(kernel) == pytest.approx(np.linalg.cond(kernel.double().reshape(6, -1).numpy(), 2), rel=1e-9)
    singular = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert condition_number(torch.zeros(3, 3)) == float("inf")
    assert condition_number(singular) > 1e15 or condition_number(singular) == float("inf")


def test_sparsity():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 3.0, 4.0]])
    assert sparsity(w) == pytest.approx(0.5)
    assert sparsity(torch.ones(3)) == 0.0


def _constant_loss_step(model: nn.Module, decay: NormDecay, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    (0.0 * model(x).sum()).backward()  # a constant loss: every gradient is zero
    decay.apply(model)
    optimizer.step()


def test_norm_decay_linf_moves_only_the_argmax_row():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    decay = NormDecay(beta=0.01, p="inf")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(8, 6)
    first = model[0].weight.detach().clone()
    row = int(first.abs().sum(1).argmax())
    _constant_loss_step(model, decay, optimizer, x)
    change = model[0].weight.detach() - first
    assert torch.count_nonzero(change[torch.arange(5) != row]) == 0
    # First step: momentum 0.5 from zero, so exactly beta * 0.5 * sign on the arg-max row.
    torch.testing.assert_close(change[row], -0.005 * first[row].sign(), rtol=0, atol=1e-7)
    norms = [linf_norm(model[0])]
    for _ in range(30):
        _constant_loss_step(model, decay, optimizer, x)
        norms.append(linf_norm(model[0]))
    assert norms[-1] < norms[0] - 0.05
    assert all(b <= a + 1e-6 for a, b in zip(norms, norms[1:]))


def test_norm_decay_l1_moves_only_the_argmax_tap_class_of_a_strided_conv():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, kernel_size=4, stride=2, padding=1))
    kernel = model[0].weight.detach().clone()
    # The arg-max (input channel, residue class mod stride), written out directly.
    sums = {(c, a, b): float(kernel[:, c, a::2, b::2].abs().sum()) for c in range(2) for a in range(2) for b in range(2)}
    c, a, b = max(sums, key=sums.get)
    expected = torch.zeros_like(kernel, dtype=torch.bool)
    expected[:, c, a::2, b::2] = True
    decay = NormDecay(beta=0.02, p="1")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(2, 2, 8, 8)
    before = l1_norm(model[0])
    _constant_loss_step(model, decay, optimizer, x)
    change = model[0].weight.detach() - kernel
    assert torch.equal(change != 0, expected & (kernel != 0))
    assert l1_norm(model[0]) < before
    assert model[0].bias.grad.abs().max() == 0  # biases untouched


def test_norm_decay_rejects_bad_options():
    with pytest.raises(UserError):
        NormDecay(0.01, p="2")
    with pytest.raises(UserError):
        NormDecay(-1.0)
