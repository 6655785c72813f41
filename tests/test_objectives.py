"""The certified-training objectives and the pieces of Shi et al.'s recipe, checked one by one on
small real models: MTL-IBP is the stated mix of its two losses, SABR's small box lies in the ball
and its bound is sound, Dropout and BatchNorm are bounded as the network that is certified, the
step plan and the IBP initialization do what they say."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from certify.bounds.bounder import MarginBounder, empirical_margins
from harden.training.bound_graph import BoundGraph, bound_loss
from harden.training.expressive import SABR, make_training_objective, small_box
from harden.training.objectives import IBPLoss, Step, _GivenStartPGD
from harden.training.recipe import ibp_initialize, warmup_regularizer
from harden.training.schedule import StepPlan, step_decay_lr

SHAPE = (1, 28, 28)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(mnist_test):
    return mnist_test.x[:24], mnist_test.y[:24]


def tiny_cnn(*, batch_norm: bool = False, dropout: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 4, stride=2, padding=1)]
    layers += [nn.BatchNorm2d(8)] if batch_norm else []
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 32)]
    layers += [nn.BatchNorm1d(32)] if batch_norm else []
    layers += [nn.ReLU()] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(32, 10)]
    return nn.Sequential(*layers)


def test_mtl_ibp_mixes_the_adversarial_and_the_ibp_loss(batch):
    x, y = batch
    model = tiny_cnn().train()
    step = Step(eps=0.1, ramp=1.0, start_noise=None)
    attack = _GivenStartPGD(model, 0.1, start_noise=None, steps=2, lower=0.0, upper=1.0)
    adversarial = F.cross_entropy(model(attack(x, y)), y, reduction="none")
    lower, _ = BoundGraph(model, SHAPE, CPU).lower_margins(x, y, 0.1, "inf", 0.0, 1.0, "IBP")
    ibp = bound_loss(lower)
    for name, expected in (("mtl-ibp", 0.7 * adversarial + 0.3 * ibp),
                           ("exp-mtl-ibp", adversarial ** 0.7 * ibp ** 0.3)):
        objective = make_training_objective(name, input_shape=SHAPE, steps=2, ibp_weight=0.3)
        result = objective(model, x, y, step)
        assert torch.allclose(result.losses, expected, rtol=1e-4), name
        assert torch.equal(result.robust_correct, (lower > 0).all(1))
    # The two ends: adversarial training alone, IBP training alone.
    assert torch.allclose(make_training_objective("mtl-ibp", input_shape=SHAPE, steps=2, ibp_weight=0.0)(model, x, y, step).losses,
                          adversarial, rtol=1e-4)
    assert torch.allclose(make_training_objective("mtl-ibp", input_shape=SHAPE, steps=2, ibp_weight=1.0)(model, x, y, step).losses,
                          ibp, rtol=1e-4)


def test_small_box_lies_in_the_ball_and_the_range_and_near_the_attack():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(200, 1, 6, 6, generator=generator)
    x[:20] = 0.0  # at the range's edge, where the ball's box is cut
    eps, radius = 0.3, 0.12
    x_adv = (x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps).clamp(0, 1)
    low, high = small_box(x, x_adv, eps, radius, 0.0, 1.0)
    ball_low, ball_high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    assert (low >= ball_low).all() and (high <= ball_high).all() and (low <= high).all()
    assert torch.allclose(high - low, torch.full_like(x, 2 * radius), atol=1e-6)  # never cut: the ball is wider
    inside = (x_adv >= low + radius - 1e-6) & (x_adv <= high - radius + 1e-6)
    centred = torch.isclose((low + high) / 2, x_adv, atol=1e-6)
    assert (centred | ~inside).all() and centred.float().mean() > 0.2
    # The box moved as little as it had to: its centre is the point of the allowed range nearest x_adv.
    allowed = ((ball_low + radius), (ball_high - radius))
    assert torch.allclose((low + high) / 2, torch.minimum(torch.maximum(x_adv, allowed[0]), allowed[1]), atol=1e-6)


def test_sabr_bounds_are_sound_on_the_small_box_and_equal_ibp_with_the_whole_ball(batch):
    x, y = batch
    model = tiny_cnn().train()
    step = Step(eps=0.1, ramp=1.0, start_noise=None)
    whole = SABR(input_shape=SHAPE, steps=2, shrink=1.0)
    ibp = IBPLoss(input_shape=SHAPE)
    graph = whole.graph(model, CPU)
    with torch.no_grad():
        assert torch.allclose(whole.bounds(graph, x, y, step), ibp.bounds(graph, x, y, step), atol=1e-5)
    sabr = SABR(input_shape=SHAPE, steps=2, shrink=0.3)
    with torch.no_grad():
        small = sabr.bounds(graph, x, y, step)
        low, high = small_box(x, sabr._adversarial_points, 0.1, 0.03, 0.0, 1.0)
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            point = low + (high - low) * torch.rand(x.shape, generator=generator)
            assert (empirical_margins(model(point), y) >= small - 1e-5).all()
    assert (small >= ibp.bounds(graph, x, y, step).detach() - 1e-5).all()  # a sub-box: never looser
    result = sabr(model, x, y, step)
    assert result.losses.shape == (len(y),) and result.losses.requires_grad


def test_sabr_refuses_l2():
    from certify.common.errors import UserError

    with pytest.raises(UserError, match="linf"):
        make_training_objective("sabr", norm="2", input_shape=SHAPE)


def test_dropout_is_the_identity_in_the_bounds_and_stays_on_in_the_forward_pass(batch):
    x, y = batch
    model = tiny_cnn(dropout=True).train()
    graph = BoundGraph(model, SHAPE, CPU)
    without = copy.deepcopy(model)
    without[-2] = nn.Identity()
    with torch.no_grad():
        lower, _ = graph.lower_margins(x, y, 0.05, "inf", 0.0, 1.0, "IBP")
        expected = MarginBounder(without.eval(), SHAPE).lower_margins((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1), y, "ibp")
        assert torch.allclose(lower, expected, atol=1e-5)
        assert not torch.equal(model(x), model(x))  # the training forward pass still drops units
        point = (x + 0.05 * (torch.rand(x.shape) * 2 - 1)).clamp(0, 1)
        assert (empirical_margins(model.eval()(point), y) >= lower - 1e-5).all()


def test_batchnorm_bounds_use_the_batch_statistics_in_training_and_the_running_ones_after(batch):
    x, y = batch
    model = tiny_cnn(batch_norm=True).train()
    graph = BoundGraph(model, SHAPE, CPU)
    with torch.no_grad():
        for shift in (0.0, 0.3):  # another batch each time: the bound follows each batch's statistics
            lower, _ = graph.lower_margins(x * (1 - shift), y, 0.0, "inf", 0.0, 1.0, "IBP")
            assert torch.allclose(lower, empirical_margins(model(x * (1 - shift)), y), atol=1e-4)
        model.eval()
        frozen = BoundGraph(copy.deepcopy(model), SHAPE, CPU)
        lower, _ = frozen.lower_margins(x, y, 0.05, "inf", 0.0, 1.0, "IBP")
        point = (x + 0.05 * (torch.rand(x.shape) * 2 - 1)).clamp(0, 1)
        assert (empirical_margins(model(point), y) >= lower - 1e-5).all()
        exact, _ = frozen.lower_margins(x, y, 0.0, "inf", 0.0, 1.0, "IBP")
        assert torch.allclose(exact, empirical_margins(model(x), y), atol=1e-4)


def test_ibp_initialization_redraws_all_but_the_last_layer():
    model = tiny_cnn()
    last = model[-1].weight.clone()
    assert ibp_initialize(model) == 2
    conv, dense = model[0], model[3]
    for layer in (conv, dense):
        fan_in = layer.weight[0].numel()
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.1)
        assert (layer.bias == 0).all()
    assert torch.equal(model[-1].weight, last)


def test_warmup_regularizer_is_zero_for_tight_balanced_bounds_and_falls_when_minimized(batch):
    x, y = batch
    box = (torch.zeros(4, 10), torch.ones(4, 10))
    centre = torch.tensor([[1.0, -1.0] * 5] * 4)
    balanced = warmup_regularizer(box, [(centre - 0.1, centre + 0.1)])
    assert balanced.item() == 0.0
    assert warmup_regularizer(box, [(centre - 20.0, centre + 20.0)]).item() > 0.5  # loose bounds
    lopsided = torch.tensor([[1.0] * 9 + [-0.5]] * 4)
    assert warmup_regularizer(box, [(lopsided - 0.1, lopsided + 0.1)]).item() > 0.5  # mostly active
    model = tiny_cnn().train()
    graph = BoundGraph(model, SHAPE, CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    values = []
    for _ in range(6):
        graph.lower_margins(x, y, 0.1, "inf", 0.0, 1.0, "IBP")
        loss = warmup_regularizer(*graph.input_and_relu_bounds())
        values.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert values[-1] < values[0], values


def test_step_plan_counts_the_warmup_and_the_ramp_in_steps():
    plan = StepPlan.of_run(40)
    assert (plan.warmup_steps, plan.ramp_steps) == (2, 36)  # a short run ramps over most of its steps
    eps = [plan.eps(s, 0.3, "linear") for s in range(40)]
    assert eps[:2] == [0.0, 0.0] and eps[2] > 0 and eps[37] == pytest.approx(0.3) and eps[36] < 0.3
    assert all(b >= a for a, b in zip(eps, eps[1:])) and plan.ramp(39) == 1.0
    long = StepPlan.of_run(20000)
    assert (long.warmup_steps, long.ramp_steps) == (1000, 9000)
    assert StepPlan.of_run(3000).ramp_steps == 2000 and StepPlan.of_run(1).ramp_steps == 1
    assert [step_decay_lr(1.0, s, 100) for s in (0, 69, 70, 84, 85, 99)] == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])
