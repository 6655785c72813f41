"""auto_LiRPA through our compat layer: it imports, and IBP / CROWN bounds are sound on conv and
residual nets (checked against many sampled points in the box)."""

from __future__ import annotations

import torch
from torch import nn

from certify.bounds.bounder import MarginBounder, empirical_margins, margin_matrix
from certify.bounds.compat import applied_patches, auto_lirpa_version, lirpa
from harden.io.zoo import small_cnn


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 12 * 12, 10))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.branch(h))  # an Add of two branches: the case behind the _named_members patch
        return self.head(h)


def test_patches_only_for_the_old_release():
    lirpa()
    if auto_lirpa_version().major == 0 and auto_lirpa_version().minor < 4:
        assert "BoundedModule._named_members(remove_duplicate)" in applied_patches()
    else:
        assert applied_patches() == []


def test_parameters_of_a_bounded_residual_net():
    auto_lirpa = lirpa()
    bounded = auto_lirpa.BoundedModule(ResidualCNN().eval(), torch.zeros(1, 1, 12, 12))
    assert len(list(bounded.parameters())) == len(list(ResidualCNN().parameters()))


def _check_sound(module, input_shape, eps, samples=2000):
    torch.manual_seed(1)
    module = module.eval()
    x = torch.rand(4, *input_shape)
    with torch.no_grad():
        labels = module(x).argmax(1)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    bounder = MarginBounder(module, input_shape)
    bounds = {m: bounder.lower_margins(lower, upper, labels, m) for m in ("ibp", "crown")}
    for i in range(x.shape[0]):
        points = lower[i] + (upper[i] - lower[i]) * torch.rand(samples, *input_shape)
        points[: samples // 4] = torch.where(torch.rand(samples // 4, *input_shape) < 0.5, lower[i], upper[i])  # corners
        with torch.no_grad():
            margins = empirical_margins(module(points), labels[i].repeat(samples))
        spread = margins.max(0).values - margins.min(0).values
        assert spread.max() > 1e-4  # the box really moves the outputs, so the check has teeth
        for method, bound in bounds.items():
            assert (margins >= bound[i] - 1e-5).all(), f"{method} bound above a sampled margin"
    # CROWN is a different, usually tighter, relaxation; both must be finite
    assert torch.isfinite(bounds["crown"]).all() and torch.isfinite(bounds["ibp"]).all()
    return bounds


def test_ibp_and_crown_sound_on_conv_net():
    bounds = _check_sound(small_cnn(), (1, 28, 28), eps=0.02)
    assert (bounds["crown"] >= bounds["ibp"] - 1e-5).float().mean() > 0.9  # on an untrained net CROWN is tighter


def test_ibp_and_crown_sound_on_residual_net():
    _check_sound(ResidualCNN(), (1, 12, 12), eps=0.05)


def test_margin_matrix_layout():
    c = margin_matrix(torch.tensor([2, 0]), 4)
    assert c.shape == (2, 3, 4)
    assert c[0].tolist() == [[-1, 0, 1, 0], [0, -1, 1, 0], [0, 0, 1, -1]]
    assert c[1].tolist() == [[1, -1, 0, 0], [1, 0, -1, 0], [1, 0, 0, -1]]
