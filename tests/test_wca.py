"""WCA noise layer: its parametrization, its loss term, where it goes, and that the noise sampled
through onnxruntime has the covariance L L^T."""

from __future__ import annotations

import copy
import math
import statistics

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from certify.common.errors import UserError
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle, save_bundle
from harden.cli import app
from harden.convert import convert
from harden.io.export import export_onnx
from harden.io.loading import load_model
from harden.layers.wca import (DIAGONAL_FLOOR, WCAHead, WCANoise, add_wca, find_logit_layer, noise_disabled,
                        wca_heads)
from harden.io.zoo import small_cnn

SHAPE = (1, 28, 28)


def chi2_quantile(df: int, upper_tail: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (accurate to ~1% for df >= 20)."""
    z = statistics.NormalDist().inv_cdf(1.0 - upper_tail)
    return df * (1.0 - 2.0 / (9 * df) + z * math.sqrt(2.0 / (9 * df))) ** 3


def covariance_statistic(samples: np.ndarray, sigma: np.ndarray) -> tuple[float, int]:
    """Likelihood-ratio test of Cov(samples) = sigma (mean unknown): with n samples in dimension d,
    T = (n-1) [tr(sigma^-1 S) - log det(sigma^-1 S) - d] is asymptotically chi-square with
    d(d+1)/2 degrees of freedom. Returns (T, df)."""
    samples = samples.astype(np.float64)
    n, d = samples.shape
    centered = samples - samples.mean(0)
    s = centered.T @ centered / (n - 1)
    m = np.linalg.solve(sigma.astype(np.float64), s)
    sign, logdet = np.linalg.slogdet(m)
    assert sign > 0
    return (n - 1) * (np.trace(m) - logdet - d), d * (d + 1) // 2


def random_factor(noise: WCANoise, seed: int) -> None:
    """Give L off-diagonal entries and unequal diagonal entries, so a transposed or diagonal-only
    covariance cannot pass for it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        noise.free.copy_(torch.randn(noise.dim, noise.dim, generator=generator) * 0.6)


def bundle_of(module: nn.Module, shape=SHAPE, classes=10) -> Bundle:
    return Bundle(module, shape, classes, {"kind": "zoo", "name": "small-cnn"},
                  data={"input_range": [0.0, 1.0]})


def test_factor_stays_lower_triangular_with_positive_diagonal():
    noise = WCANoise(5)
    random_factor(noise, 0)
    optimizer = torch.optim.SGD(noise.parameters(), lr=0.5)
    for _ in range(30):  # push the diagonal down hard: it must stay above the floor
        optimizer.zero_grad()
        factor = noise.cholesky_factor()
        (factor.diagonal().sum() + factor.sum()).backward()
        assert torch.all(noise.free.grad.triu(1) == 0)  # the upper triangle is not a parameter of L
        optimizer.step()
    factor = noise.cholesky_factor().detach()
    assert torch.all(factor.triu(1) == 0)
    assert torch.all(factor.diagonal() >= DIAGONAL_FLOOR)
    assert factor.diagonal().max() < 0.05  # the push did work (softplus of ~N(0, 0.36) starts near 0.7)
    assert torch.allclose(noise.covariance(), factor @ factor.T)


def test_noise_on_in_eval_off_when_disabled_and_covariance_in_torch():
    torch.manual_seed(0)
    noise = WCANoise(6).eval()
    random_factor(noise, 1)
    h = torch.zeros(20000, 6)
    with torch.no_grad():
        samples = noise(h).numpy()
        with noise_disabled(noise):
            assert torch.equal(noise(h), h)
    statistic, df = covariance_statistic(samples, noise.covariance().detach().numpy())
    assert statistic < chi2_quantile(df, 1e-6)
    assert noise.noise_enabled  # restored


def test_regularizer_is_minus_log_trace_and_trains_L_and_W():
    head = WCAHead(20, 4, 8)
    random_factor(head.noise, 2)
    w = head.classifier.weight.detach().double()
    sigma = head.covariance().detach().double()
    expected = -math.log(float(torch.trace(w @ sigma @ w.T)))
    value = head.regularizer()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert head.noise.free.grad.abs().sum() > 0 and head.classifier.weight.grad.abs().sum() > 0
    # A gradient step on it grows the noise along W (tr(W Sigma W^T) goes up).
    with torch.no_grad():
        head.noise.free -= 0.1 * head.noise.free.grad
    assert head.regularizer().item() < value.item()


def test_add_wca_keeps_the_function_with_noise_off():
    torch.manual_seed(0)
    model = small_cnn().eval()
    reference = copy.deepcopy(model)
    record = add_wca(model, SHAPE)  # penultimate width 100 != 32: a projection is added
    assert record == {"layer": "7", "noise_dim": 32, "projection": True, "function_preserved": True,
                      "init_std": 0.1}
    head = model[7]
    assert isinstance(head, WCAHead) and head.classifier.in_features == 32
    x = torch.rand(16, *SHAPE)
    with torch.no_grad(), noise_disabled(model):
        assert (model(x) - reference(x)).abs().max() < 1e-5
    with torch.no_grad():
        assert (model(x) - model(x)).abs().max() > 1e-3  # noise on in eval: predictions are random

    same_width = small_cnn().eval()
    final = same_width[7]
    add_wca(same_width, SHAPE, noise_dim=100)
    assert same_width[7].projection is None
    assert torch.equal(same_width[7].classifier.weight, final.weight)
    assert torch.equal(same_width[7].classifier.bias, final.bias)


def test_add_wca_on_an_imported_onnx_graph(tmp_path):
    torch.manual_seed(0)
    plain = small_cnn().eval()
    path = tmp_path / "plain.onnx"
    export_onnx(bundle_of(plain), path)
    bundle = load_model(path)
    assert find_logit_layer(bundle.module, SHAPE) == "linear_1"
    convert(bundle, spectral_norm=None, noise="wca", noise_dim=16)
    assert [name for name, _ in wca_heads(bundle.module)] == ["linear_1"]
    x = torch.rand(8, *SHAPE)
    with torch.no_grad(), noise_disabled(bundle.module):
        assert (bundle.module(x) - plain(x)).abs().max() < 1e-5
    save_bundle(bundle, tmp_path / "imported.safetensors")  # the fx graph with the head reloads
    again = load_bundle(tmp_path / "imported.safetensors")
    with torch.no_grad(), noise_disabled(again.module):
        assert (again.module(x) - plain(x)).abs().max() < 1e-5


def test_find_logit_layer_refuses_models_that_do_not_end_in_a_linear():
    with pytest.raises(UserError, match="does not produce its logits"):
        find_logit_layer(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.ReLU()), SHAPE)
    with pytest.raises(UserError, match="no Linear layer"):
        find_logit_layer(nn.Sequential(nn.Conv2d(1, 10, 28), nn.Flatten()), SHAPE)
    model = small_cnn()
    add_wca(model, SHAPE)
    with pytest.raises(UserError, match="already has a WCA noise layer"):
        add_wca(model, SHAPE)


def test_wca_with_spectral_norm_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    shape = (1, 12, 12)  # small: every load converges each spectral-norm power iteration again
    bundle = bundle_of(small_cnn(shape), shape=shape)
    records = convert(bundle, spectral_norm=1.0, noise="wca", noise_dim=32)
    assert {"7.projection", "7.classifier"} <= {r["name"] for r in records}
    random_factor(wca_heads(bundle.module)[0][1].noise, 3)
    path = save_bundle(bundle, tmp_path / "wca.safetensors")
    loaded = load_bundle(path)
    assert [s["step"] for s in loaded.recipe] == ["wca", "spectral-norm"]
    head, head_again = wca_heads(bundle.module)[0][1], wca_heads(loaded.module)[0][1]
    assert torch.equal(head.covariance(), head_again.covariance())
    assert head_again.regularizer().item() == pytest.approx(head.regularizer().item(), rel=1e-6)
    # In training mode the loss term reads the normalized classifier weight without moving its
    # power iteration (the forward pass does that once per step).
    loaded.module.train()
    state = head_again.classifier.parametrizations.weight[0].u.clone()
    head_again.regularizer().backward()
    assert torch.equal(state, head_again.classifier.parametrizations.weight[0].u)
    assert head_again.classifier.parametrizations.weight.original.grad.abs().sum() > 0
    loaded.module.eval()
    x = torch.rand(8, *shape)
    bundle.module.eval()
    with torch.no_grad(), noise_disabled(bundle.module), noise_disabled(loaded.module):
        assert (loaded.module(x) - bundle.module(x)).abs().max() < 1e-6


def _stochastic_samples(path, x: np.ndarray, copies: int) -> np.ndarray:
    ort.set_seed(1234)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.repeat(x, copies, axis=0)})[0]


def test_onnxruntime_noise_covariance_is_LLt(tmp_path):
    """A model whose classifier is the identity, so the logits are h + eps: their covariance over
    repeated draws on one input must be L L^T, within sampling error (chi-square test at 1e-6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    bundle = bundle_of(model, shape=(1, 2, 2), classes=8)
    convert(bundle, spectral_norm=None, noise="wca", noise_dim=8)
    head = wca_heads(bundle.module)[0][1]
    assert head.projection is None
    with torch.no_grad():
        head.classifier.weight.copy_(torch.eye(8))
        head.classifier.bias.zero_()
    random_factor(head.noise, 4)
    sigma = head.covariance().detach().numpy()

    path = tmp_path / "stochastic.onnx"
    export_onnx(bundle, path, deterministic=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "RandomNormalLike" in ops and "MatMul" in ops
    x = np.random.default_rng(0).random((1, 1, 2, 2), dtype=np.float32)
    n = 20000
    samples = _stochastic_samples(path, x, n)
    with torch.no_grad(), noise_disabled(bundle.module):
        mean = bundle.module(torch.from_numpy(x)).numpy()[0]
    # The mean is the noise-off network: |mean error| per coordinate within 5 standard errors.
    assert np.all(np.abs(samples.mean(0) - mean) < 5 * np.sqrt(np.diag(sigma) / n))
    statistic, df = covariance_statistic(samples, sigma)
    limit = chi2_quantile(df, 1e-6)
    assert statistic < limit
    # The test has power: the transposed factor (L^T L) and a 5% larger covariance are rejected.
    factor = head.noise.cholesky_factor().detach().numpy()
    assert covariance_statistic(samples, factor.T @ factor)[0] > 10 * limit
    assert covariance_statistic(samples, 1.05 * sigma)[0] > limit
    # And the relative Frobenius error is at the size sampling predicts: E||S~ - I||_F^2 = d(d+1)/n
    # for the whitened sample covariance S~; 3x that rms is a generous, still informative limit.
    whitening = np.linalg.inv(np.linalg.cholesky(sigma))
    centered = samples - samples.mean(0)
    whitened = whitening @ (centered.T @ centered / (n - 1)) @ whitening.T
    assert np.linalg.norm(whitened - np.eye(8)) < 3 * math.sqrt(8 * 9 / n)


def test_onnxruntime_logit_covariance_is_W_sigma_Wt_on_a_cnn(tmp_path):
    torch.manual_seed(0)
    bundle = bundle_of(small_cnn())
    convert(bundle, spectral_norm=None, noise="wca", noise_dim=32)
    head = wca_heads(bundle.module)[0][1]
    random_factor(head.noise, 5)
    bundle.module.eval()
    w = head.classifier.weight.detach().double()
    expected = (w @ head.covariance().detach().double() @ w.T).numpy()

    path = tmp_path / "cnn.onnx"
    export_onnx(bundle, path, deterministic=False)
    x = np.random.default_rng(1).random((1, *SHAPE), dtype=np.float32)
    samples = _stochastic_samples(path, x, 8000)
    statistic, df = covariance_statistic(samples, expected)
    assert statistic < chi2_quantile(df, 1e-6)
    assert covariance_statistic(samples, 1.1 * expected)[0] > chi2_quantile(df, 1e-6)

    deterministic = tmp_path / "mean.onnx"
    parity = export_onnx(bundle, deterministic)  # parity-checked against the noise-off module
    assert parity["max_abs_diff"] < 1e-4
    model = onnx.load(str(deterministic))
    assert "RandomNormalLike" not in [node.op_type for node in model.graph.node]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert "mean network" in metadata["harden.noise"]


def test_cli_convert_with_wca_and_stochastic_export(tmp_path):
    torch.manual_seed(0)
    source = save_bundle(bundle_of(small_cnn()), tmp_path / "model.safetensors")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(source), "--noise", "wca", "--noise-dim", "16",
                                 "--no-spectral-norm", "-o", str(tmp_path / "wca.safetensors")])
    assert result.exit_code == 0, result.output
    assert "wca" in result.output and "dim 16" in result.output
    loaded = load_bundle(tmp_path / "wca.safetensors")
    assert [s["step"] for s in loaded.recipe] == ["wca"]
    result = runner.invoke(app, ["export", str(tmp_path / "wca.safetensors"), "--stochastic",
                                 "-o", str(tmp_path / "wca.onnx")])
    assert result.exit_code == 0, result.output
    ort.set_seed(0)
    session = ort.InferenceSession(str(tmp_path / "wca.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((4, *SHAPE), np.float32)
    first, second = (session.run(None, {"input": x})[0] for _ in range(2))
    assert np.all(np.isfinite(first)) and np.abs(first - second).max() > 1e-3

    result = runner.invoke(app, ["convert", str(source), "--noise", "gauss"])
    assert result.exit_code == 2 and "unknown --noise" in result.output
    assert not (tmp_path / "model.hard.safetensors").exists()

