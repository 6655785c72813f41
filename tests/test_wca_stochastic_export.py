"""The stochastic ONNX export of a WCA model has the accuracy distribution of the torch model: run in
onnxruntime on real MNIST images, its mean accuracy over noise draws matches torch's within sampling
error, and the comparison is sharp enough to reject a model whose noise is 30% larger.
(benchmarks/wca.py runs the same comparison on 10k images of a trained model.)"""

from __future__ import annotations

import torch

from benchmarks.wca import compare_accuracy_distributions, correct_counts_onnx, correct_counts_torch
from harden.io.bundle import Bundle
from harden.io.export import export_onnx
from harden.io.zoo import small_cnn
from harden.layers.wca import add_wca, noise_disabled, wca_heads

SHAPE = (1, 28, 28)
IMAGES, DRAWS = 500, 20
# Noise std at which the untrained CNN's noisy prediction agrees with its mean prediction on about
# 60% of draws: far from 0% and 100%, where a wrong noise scale would not show.
NOISE_STD = 0.05


def noisy_cnn(noise_scale: float = 1.0) -> Bundle:
    torch.manual_seed(0)
    module = small_cnn().eval()
    add_wca(module, SHAPE, init_std=NOISE_STD * noise_scale)
    return Bundle(module, SHAPE, 10, {"kind": "zoo", "name": "small-cnn"}, data={"input_range": [0.0, 1.0]})


def test_onnxruntime_accuracy_over_draws_matches_torch(mnist_test, tmp_path):
    bundle = noisy_cnn()
    x = mnist_test.x[:IMAGES]
    # Labels: the mean network's predictions, so accuracy measures how often the noise flips them.
    with torch.no_grad(), noise_disabled(bundle.module):
        labels = bundle.module(x).argmax(1)
    torch.manual_seed(1)
    torch_counts = correct_counts_torch(bundle.module, x, labels, DRAWS)

    path = tmp_path / "stochastic.onnx"
    export_onnx(bundle, path, deterministic=False)
    same = compare_accuracy_distributions(torch_counts, correct_counts_onnx(path, x, labels, DRAWS, seed=2), DRAWS)
    assert 0.3 < same["torch_accuracy"] < 0.9  # the noise does flip predictions, and not all of them
    assert abs(same["z"]) < 4, same
    assert abs(same["difference"]) < 0.03, same

    # Power: the same export with the noise std 1.3x larger (same weights) is told apart.
    louder = noisy_cnn(noise_scale=1.3)
    assert torch.equal(wca_heads(louder.module)[0][1].classifier.weight, wca_heads(bundle.module)[0][1].classifier.weight)
    loud_path = tmp_path / "louder.onnx"
    export_onnx(louder, loud_path, deterministic=False)
    other = compare_accuracy_distributions(torch_counts, correct_counts_onnx(loud_path, x, labels, DRAWS, seed=2), DRAWS)
    assert other["z"] > 4, other
