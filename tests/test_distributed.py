"""`harden finetune` under torchrun: two gloo processes on the CPU end where one process does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from harden.io.bundle import Bundle

from harden.io.bundle_file import load_bundle, save_bundle
from harden.cli import app
from harden.training.finetune import default_checkpoint
from harden.io.zoo import small_cnn

# 300 samples in global batches of 63: shards of 32 and 31, and a last batch of 48, so the loss
# scaling of uneven shards is exercised too.
COMMON = ["--epochs", "1", "--batch-size", "63", "--eval-limit", "40", "--seed", "5", "--quiet"]


@pytest.fixture(scope="module")
def files(mnist_train, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    bundle = Bundle(small_cnn(), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"dataset": "mnist", "classes": mnist_train.classes, "input_range": [0.0, 1.0]})
    save_bundle(bundle, folder / "model.safetensors")
    data = mnist_train.subset(300)
    np.savez(folder / "small.npz", x=(data.x.numpy()[:, 0] * 255).round().astype(np.uint8), y=data.y.numpy())
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(files, out, args):
    result = CliRunner().invoke(app, ["finetune", str(files / "model.safetensors"), "--data", str(files / "small.npz"),
                                      *args, *COMMON, "-o", str(out)])
    assert result.exit_code == 0, result.output


def two_processes(files, out, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "harden", "finetune", str(files / "model.safetensors"), "--data", str(files / "small.npz"),
               *args, *COMMON, "-o", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--train", "clean"], ["--train", "pgd", "--eps", "0.1", "--steps", "3"]],
                         ids=["clean", "pgd"])
def test_two_gloo_processes_match_one_process(files, tmp_path, args):
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    one_process(files, single, args)
    two_processes(files, double, args)
    a, b = load_file(str(single)), load_file(str(double))
    assert a.keys() == b.keys()
    start = load_file(str(files / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (name, (a[name] - b[name]).abs().max())
        assert not torch.equal(a[name], start[name])  # both really trained
    record = load_bundle(double).history[-1]
    assert record["world_size"] == 2 and load_bundle(single).history[-1]["world_size"] == 1
    assert record["train_samples"] == 300 and record["test_samples"] == 40
    # Only rank 0 wrote: the output, its checkpoint, and no stray temporary files.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["one.safetensors", "two.safetensors", default_checkpoint(single).name, default_checkpoint(double).name])
