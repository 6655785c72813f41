"""`harden inspect`'s sound Lipschitz bounds (harden.inspect.sound): next to the power-iteration
estimate, at least it and at least every slope found by gradient ascent, labelled with the norm
method of each layer; "not a bound" for a residual given as an architecture factory."""

from __future__ import annotations

import pytest
import test_inspect
import torch
from torch import nn

from certify.bounds.operator_norms import EXACT_SVD, GRAM_FFT
from harden.inspect import inspect_model, inspection_table
from harden.io.zoo import small_cnn
from harden.layers.spectral import apply_spectral_norm


def _largest_slope(model: nn.Module, shape: tuple[int, ...], *, steps: int = 60) -> float:
    """The largest ||f(x + d) - f(x)|| / ||d|| that Adam finds from random pairs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(16, *shape, generator=generator).requires_grad_(True)
    d = (torch.randn(16, *shape, generator=generator) * 0.05).requires_grad_(True)
    optimizer = torch.optim.Adam([x, d], lr=0.01)
    for _ in range(steps):
        ratio = (model(x + d) - model(x)).norm(dim=1) / d.flatten(1).norm(dim=1)
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    with torch.no_grad():
        return float(((model(x + d) - model(x)).norm(dim=1) / d.flatten(1).norm(dim=1)).max())


@pytest.mark.parametrize("beta", [None, 2.0])
def test_sound_bound_is_above_the_estimate_and_every_slope(beta):
    torch.manual_seed(1)
    model = small_cnn((1, 12, 12), 5)
    if beta is not None:
        apply_spectral_norm(model, beta, input_shape=(1, 12, 12))
    document = inspect_model(model, (1, 12, 12))
    bounds = document["lipschitz"]
    assert bounds["sound_why_not"] is None
    assert bounds["l2_sound_upper_bound"] >= bounds["l2_upper_bound"] * (1 - 1e-5)
    assert bounds["linf_sound_upper_bound"] >= bounds["linf_upper_bound"] * (1 - 1e-9)
    model.eval()
    assert _largest_slope(model, (1, 12, 12)) <= bounds["l2_sound_upper_bound"]
    assert set(bounds["sound_methods"]) == {"0", "2", "5", "7"}
    assert set(bounds["sound_methods"].values()) <= {EXACT_SVD, GRAM_FFT}
    _, lines = inspection_table(document)
    assert any("sound upper bound" in line for line in lines) and any("estimate" in line for line in lines)


def test_large_layers_are_labelled_gram_iteration():
    torch.manual_seed(2)
    document = inspect_model(small_cnn((1, 28, 28), 10), (1, 28, 28))
    assert document["lipschitz"]["sound_methods"]["0"] == GRAM_FFT
    assert document["lipschitz"]["sound_methods"]["7"] == EXACT_SVD


def test_a_residual_factory_has_no_sound_bound(tmp_path, monkeypatch):
    """The factory's forward is Python: traced, its residual x + f(x) is found, and no bound is given."""
    (tmp_path / "residual_arch.py").write_text(test_inspect.RESIDUAL_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    from harden.io.architecture import build_plain_module, resolve_arch

    torch.manual_seed(0)
    residual, chain = (inspect_model(build_plain_module(resolve_arch(f"residual_arch:{name}"), (1, 4, 4), 3),
                                     (1, 4, 4))["lipschitz"] for name in ("residual", "chain"))
    assert residual["l2_sound_upper_bound"] is None and residual["sound_why_not"].startswith("not a bound")
    assert chain["sound_why_not"] is None and chain["l2_sound_upper_bound"] >= chain["l2_upper_bound"] * (1 - 1e-5)
    _, lines = inspection_table({"input_shape": [1, 4, 4], "layers": [], "lipschitz": residual})
    assert any(line.startswith("sound Lipschitz bound: not a bound") for line in lines)
