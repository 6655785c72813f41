"""Spectral normalization of the true layer operator: sigma against the explicit matrix, clipping,
state handling, baking, BatchNorm folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certify.common.errors import UserError
from conv_layers import conv_configs  # tests/conv_layers.py
from harden.layers.norms import LinearOperator, conv_operator_matrix, effective_weight
from certify.common.modes import model_mode
from harden.layers.spectral import OperatorSpectralNorm, apply_spectral_norm, bake, fold_batchnorm, spectral_layers

BETA = 1.0
CONFIGS = conv_configs()
EXTRA = [(dict(in_channels=2, out_channels=3, kernel_size=(4, 3), padding="same", dilation=(1, 2)), (6, 9))] + [
    (dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1, padding_mode=mode), (7, 6))
    for mode in ("circular", "reflect", "replicate")]


def top_singular_value(layer: nn.Module, input_hw: tuple[int, int] | None = None) -> float:
    """The exact l2 norm of the layer's map, from its explicit float64 matrix."""
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(effective_weight(layer).double(), ord=2))
    matrix = conv_operator_matrix(layer, input_hw)
    small = matrix @ matrix.t() if matrix.shape[0] < matrix.shape[1] else matrix.t() @ matrix
    return float(torch.linalg.eigvalsh(small).max().sqrt())


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(1568, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():  # three layers above BETA (norms ~1.8, ~2, ~2.2), the last one below (~0.35)
        model[2].weight.mul_(2.0)
        model[5].weight.mul_(3.0)
        model[7].weight.mul_(0.5)
    return model


INPUT_HW = {"0": (28, 28), "2": (14, 14)}


def test_converged_sigma_is_the_top_singular_value_of_the_operator():
    assert len(CONFIGS) >= 30
    for seed, (kwargs, hw) in enumerate(CONFIGS + EXTRA):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(**kwargs))
        exact = top_singular_value(model[0], hw)
        (record,) = apply_spectral_norm(model, beta=1e3, input_shape=(kwargs["in_channels"], *hw))
        assert record["input_hw"] == list(hw) and record["converged"]
        assert record["sigma_before"] == pytest.approx(exact, rel=1e-4), (kwargs, hw)
        (_, _, sn), = spectral_layers(model)
        assert float(sn.sigma) == pytest.approx(exact, rel=1e-4)


def test_reshaped_kernel_norm_is_not_the_operator_norm():
    # torch.nn.utils.spectral_norm's quantity: the kernel as a C_out x C_in*kh*kw matrix.
    ratios = []
    for seed, (kwargs, hw) in enumerate(CONFIGS):
        torch.manual_seed(seed)
        conv = nn.Conv2d(**kwargs)
        reshaped = float(torch.linalg.matrix_norm(conv.weight.detach().double().reshape(conv.out_channels, -1), ord=2))
        ratios.append(reshaped / top_singular_value(conv, hw))
    differs = sum(abs(r - 1) > 0.01 for r in ratios)
    assert differs >= 0.75 * len(CONFIGS), f"only {differs} of {len(CONFIGS)} differ by > 1%"
    assert min(ratios) < 0.9 and max(ratios) > 1.1  # wrong in both directions


@pytest.fixture()
def clipped():
    model = small_cnn()
    plain = {name: layer.weight.detach().clone() for name, layer in model.named_children()
             if isinstance(layer, (nn.Conv2d, nn.Linear))}
    before = {name: top_singular_value(model.get_submodule(name), INPUT_HW.get(name)) for name in plain}
    records = apply_spectral_norm(model, BETA, input_shape=(1, 28, 28))
    return model, records, plain, before


def test_every_layer_is_clipped_at_beta_and_only_clipped(clipped):
    model, records, plain, before = clipped
    assert [r["name"] for r in records] == ["0", "2", "5", "7"]
    assert [r["type"] for r in records] == ["conv", "conv", "linear", "linear"]
    assert records[0]["input_hw"] == [28, 28] and records[1]["input_hw"] == [14, 14]
    model.eval()
    for record in records:
        name = record["name"]
        layer = model.get_submodule(name)
        after = top_singular_value(layer, INPUT_HW.get(name))
        assert record["sigma_before"] == pytest.approx(before[name], rel=1e-4)
        assert after <= BETA * (1 + 1e-3)
        if before[name] > BETA:
            assert after == pytest.approx(BETA, rel=1e-4)  # clipped to beta ...
            assert record["sigma_after"] == pytest.approx(BETA)
        else:  # ... and a layer already below beta is left exactly as it was
            assert torch.equal(layer.weight, plain[name])
            assert after == pytest.approx(before[name], rel=1e-9)
    assert sum(before[name] > BETA for name in before) == 3


def test_bake_keeps_the_function_and_the_bound(clipped):
    model, records, _, _ = clipped
    model.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    bake(model)
    assert spectral_layers(model) == []
    for record in records:
        layer = model.get_submodule(record["name"])
        assert type(layer) in (nn.Conv2d, nn.Linear) and isinstance(layer.weight, nn.Parameter)
        assert len(layer._forward_pre_hooks) == 0
        assert top_singular_value(layer, INPUT_HW.get(record["name"])) <= BETA * (1 + 1e-3)
    assert set(model.state_dict()) == {f"{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_power_iteration_state_moves_only_in_training_outside_frozen(clipped):
    model, _, _, _ = clipped
    (_, _, sn) = spectral_layers(model)[1]
    with torch.no_grad():
        sn.u.copy_(torch.randn_like(sn.u))  # far from converged, so any step moves it
    start = sn.u.clone()
    x = torch.rand(2, 1, 28, 28)
    model.eval()
    model(x)
    assert torch.equal(sn.u, start)
    model.train()
    with model_mode(model):  # the one "evaluate without changing it" context (certify.common.modes)
        assert all(s.frozen for _, _, s in spectral_layers(model))
        model(x)
        model(x)
    assert torch.equal(sn.u, start)
    assert model.training and not any(s.frozen for _, _, s in spectral_layers(model))
    model(x)
    assert not torch.equal(sn.u, start)
    # Two training forwards before one backward (as in TRADES) must not break the graph.
    (model(x).sum() + model(x).sum()).backward()


def test_gradient_flows_to_the_raw_weight_through_sigma(clipped):
    model, _, _, _ = clipped
    model.double().eval()  # eval: u is fixed, so the loss is a smooth function of the raw weight
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    raw = model[0].parametrizations.weight.original

    def loss() -> torch.Tensor:
        return model(x).square().sum()

    loss().backward()
    grad = raw.grad.clone()
    assert grad.abs().max() > 0
    # Finite differences along a random direction.
    direction, h, base = torch.randn_like(raw), 1e-6, raw.detach().clone()
    with torch.no_grad():
        raw.copy_(base + h * direction)
        up = loss()
        raw.copy_(base - h * direction)
        down = loss()
        raw.copy_(base)
    assert float((up - down) / (2 * h)) == pytest.approx(float((grad * direction).sum()), rel=1e-5)
    # A clipped layer computes beta * W / sigma(W), which does not change when W is scaled: the
    # gradient is orthogonal to W. It would not be if sigma were treated as a constant.
    assert abs(float((grad * base).sum())) < 1e-8 * float(grad.norm() * base.norm())


def test_state_dict_round_trip_restores_the_effective_weights():
    source = small_cnn(seed=0)
    apply_spectral_norm(source, BETA, input_shape=(1, 28, 28))
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    source.train()
    for _ in range(3):  # moves both the weights and u
        optimizer.zero_grad()
        nn.functional.cross_entropy(source(x), y).backward()
        optimizer.step()
    state = source.state_dict()
    assert any(key.endswith(".u") for key in state)
    target = small_cnn(seed=1)
    apply_spectral_norm(target, BETA, input_shape=(1, 28, 28))
    target.load_state_dict(state)
    source.eval(), target.eval()
    for name in ("0", "2", "5", "7"):
        assert torch.equal(source.get_submodule(name).weight, target.get_submodule(name).weight)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_bake_after_training_meets_the_bound():
    # One power step per training step lags behind fast weight changes (Adam moves every entry by
    # about lr), so during training sigma is an estimate from below; bake converges it first.
    model = small_cnn()
    apply_spectral_norm(model, BETA, input_shape=(1, 28, 28))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    bake(model)
    assert top_singular_value(model[0], (28, 28)) <= BETA * (1 + 1e-3)
    assert top_singular_value(model[5]) == pytest.approx(BETA, rel=1e-3)


def test_conversion_errors_are_user_errors():
    with pytest.raises(UserError, match="input of shape"):
        apply_spectral_norm(small_cnn(), BETA, input_shape=(3, 32, 32))
    with pytest.raises(UserError, match="beta"):
        apply_spectral_norm(small_cnn(), 0.0, input_shape=(1, 28, 28))
    with pytest.raises(UserError, match="layer kind"):
        apply_spectral_norm(small_cnn(), BETA, input_shape=(1, 28, 28), layers=("conv3d",))
    model = small_cnn()
    apply_spectral_norm(model, BETA, input_shape=(1, 28, 28), layers=("conv",))
    assert len(spectral_layers(model)) == 2
    with pytest.raises(UserError, match="already"):
        apply_spectral_norm(model, BETA, input_shape=(1, 28, 28))
    # A conv whose sigma was measured on 28x28 refuses another size.
    convs = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    apply_spectral_norm(convs, BETA, input_shape=(1, 28, 28))
    with pytest.raises(UserError, match="measured on 28x28"):
        convs(torch.rand(1, 1, 20, 20))


def test_parametrization_alone_clips_a_linear_layer():
    torch.manual_seed(7)
    layer = nn.Linear(20, 30)
    sn = OperatorSpectralNorm(LinearOperator(20), 0.1, layer.weight.detach(), n_power_iterations=2)
    sigma, _ = sn.converge(layer.weight.detach())
    assert sigma == pytest.approx(float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2)), rel=1e-4)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", sn)
    layer.eval()
    assert float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2)) == pytest.approx(0.1, rel=1e-4)
    assert sn.input_hw is None and sn.u.shape == (20,)


def bn_model() -> nn.Sequential:
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6)), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                m.weight.uniform_(-2, 2)
                m.bias.uniform_(-1, 1)
    return model


def test_fold_batchnorm_keeps_the_eval_function():
    model = bn_model().eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model[3][0].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # Folded first, then normalized: the documented order works.
    assert len(apply_spectral_norm(model, BETA, input_shape=(1, 8, 8))) == 4


def test_fold_batchnorm_refuses_a_parametrized_layer():
    model = bn_model()
    apply_spectral_norm(model, BETA, input_shape=(1, 8, 8))
    with pytest.raises(UserError, match="before applying spectral norm"):
        fold_batchnorm(model)
