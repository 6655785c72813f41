"""Shared fixtures: real MNIST and a small CNN really trained on it, made once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread for the whole suite: the tests bound, attack and train small models on small
# batches, where thread hand-offs cost more than they save (PGD on 8 images: 4.6 s with 1 thread,
# 59 s with 2 on a busy 2-core machine; power iterations are thousands of single-sample convs).
# Subprocesses (the CLI tests, torchrun) get OMP_NUM_THREADS=1 the same way.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def mnist_test():
    from certify.data.datasets import load_dataset

    return load_dataset("mnist", split="test")


@pytest.fixture(scope="session")
def mnist_train():
    from certify.data.datasets import load_dataset

    return load_dataset("mnist", split="train")


@pytest.fixture(scope="session")
def trained_small_cnn(mnist_train, mnist_test):
    """The small CNN after 2 epochs of clean training (about 98.5% test accuracy). Do not modify it:
    copy.deepcopy(bundle.module) first."""
    from harden.io.bundle import Bundle
    from harden.training.train import train_clean
    from harden.io.zoo import small_cnn

    torch.manual_seed(0)
    bundle = Bundle(small_cnn(), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"dataset": "mnist", "classes": mnist_test.classes, "input_range": [0.0, 1.0]})
    train_clean(bundle, mnist_train, mnist_test, epochs=2, seed=0, quiet=True)
    return bundle
