"""Norm decay in a real fine-tuning run: from the same initialization, on the same real MNIST batches,
training with linf (l1) norm decay ends with a smaller exact linf (l1) operator norm in every layer of
the small CNN than the same training without it, and leaves the other norm's decay alone."""

from __future__ import annotations

import copy

import pytest
import torch

from harden.io.bundle import Bundle
from harden.io.zoo import small_cnn
from harden.layers.norms import l1_norm, linf_norm
from harden.training.finetune import FinetuneConfig, finetune

INPUT_HW = {"0": (28, 28), "2": (14, 14), "5": None, "7": None}  # small CNN layer -> its input size


def trained_norms(initial, train, **decay) -> dict[str, dict[str, float]]:
    bundle = Bundle(copy.deepcopy(initial), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"input_range": [0.0, 1.0]})
    record = finetune(bundle, train, None, FinetuneConfig(train="clean", epochs=2, seed=0, **decay), quiet=True)
    assert record["norm_decay"] == decay.get("norm_decay")
    layers = dict(bundle.module.named_children())
    return {name: {"inf": linf_norm(layers[name], hw), "1": l1_norm(layers[name], hw)} for name, hw in INPUT_HW.items()}


@pytest.fixture(scope="module")
def runs(mnist_train):
    train = mnist_train.subset(1024)
    torch.manual_seed(0)
    initial = small_cnn()
    return {p: trained_norms(initial, train, norm_decay=0.01, norm_decay_p=p) for p in ("inf", "1")} | {
        "plain": trained_norms(initial, train)}


@pytest.mark.parametrize("p", ["inf", "1"])
def test_norm_decay_lowers_its_norm_in_every_layer(runs, p):
    for layer in INPUT_HW:
        assert runs[p][layer][p] < 0.99 * runs["plain"][layer][p], (layer, runs[p][layer], runs["plain"][layer])


def test_linf_decay_moves_the_linf_norm_more_than_l1_decay_does(runs):
    # Each decay pushes on its own norm's arg-max row (column): the linf norm of the last layer, one
    # row of ten, falls clearly under linf decay and hardly under l1 decay.
    last = list(INPUT_HW)[-1]
    assert runs["inf"][last]["inf"] < runs["1"][last]["inf"] - 0.1
    assert runs["1"][last]["1"] < runs["inf"][last]["1"]
