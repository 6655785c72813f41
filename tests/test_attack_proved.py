"""The soundness benchmark's attack (benchmarks/attack_proved.py) finds the true smallest margin
of a linear classifier over a box, which is known in closed form, and never goes below it."""

import torch

from benchmarks.attack_proved import smallest_margins, true_margin


def test_smallest_margins_reaches_a_linear_models_exact_minimum():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    x = torch.rand(3, 1, 3, 4) * 0.6 + 0.2
    eps = 0.1
    lower, upper = x - eps, x + eps
    labels = true_margin(model(x).detach(), torch.zeros(3, dtype=torch.long)).lt(0).long()
    # Two classes: the margin is linear in x, so its minimum over the box is the centre's margin
    # minus eps times the l1 norm of the weight difference.
    weight = model[1].weight.detach()
    difference = (weight[labels] - weight[1 - labels]).abs().sum(dim=1)
    exact = true_margin(model(x).detach(), labels) - eps * difference

    found, where = smallest_margins(model, x, labels, lower, upper, restarts=4, steps=50, seed=0)

    assert torch.all((where >= lower) & (where <= upper))
    assert torch.all(found >= exact - 1e-5)
    assert torch.allclose(found, exact, atol=1e-4)
    assert torch.allclose(true_margin(model(where).detach(), labels), found, atol=1e-6)
