"""`harden finetune` and `harden prune` under torchrun: two gloo processes on the CPU end where one
process does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune_inputs import write_finetune_inputs  # tests/finetune_inputs.py
from harden.io.bundle import Bundle
from harden.io.bundle_file import load_bundle
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
    return write_finetune_inputs(bundle, mnist_train, folder, 300)


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
    # PGD steps by the sign of the input gradient: a last-bit difference between the sharded and the
    # whole-batch convolutions can flip the sign of a near-zero entry, which moves that pixel of the
    # attack by a whole step, and Adam turns a flipped weight-gradient sign into a step of about lr.
    # So the attacked runs agree as a whole (to a small part of how far training moved the weights)
    # and in almost every entry, not to rounding in each; a wrong shard of the data or of the attack
    # starts moves all the weights apart.
    moved = sum(float((a[name] - start[name]).pow(2).sum()) for name in a) ** 0.5
    apart = sum(float((a[name] - b[name]).pow(2).sum()) for name in a) ** 0.5
    assert apart <= (0.05 if "pgd" in args else 1e-3) * moved, (apart, moved)
    close = sum(int(torch.isclose(a[name], b[name], rtol=1e-4, atol=1e-5).sum()) for name in a)
    assert close >= (0.9 if "pgd" in args else 1.0) * sum(a[name].numel() for name in a)
    for name in a:
        assert not torch.equal(a[name], start[name])  # both really trained
    record = load_bundle(double).history[-1]
    assert record["world_size"] == 2 and load_bundle(single).history[-1]["world_size"] == 1
    assert record["train_samples"] == 300 and record["test_samples"] == 40
    # Only rank 0 wrote: the output, its checkpoint, and no stray temporary files.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["one.safetensors", "two.safetensors", default_checkpoint(single).name, default_checkpoint(double).name])


PRUNE_SCRIPT = """
import sys, torch
from certify.data.base import Dataset
from harden.io.bundle_file import load_bundle
from harden.pruning.prune import PruneConfig, prune
from harden.training.loop import main_process
model, data, out = sys.argv[1:4]
x, y = torch.load(data)
bundle = load_bundle(model)
config = PruneConfig(sparsity=0.5, prune_steps=2, prune_fraction=1.0, epochs=1, batch_size=63, seed=5,
                     kappa_max=50.0, tsc_weight=1e-5)
record = prune(bundle, Dataset("small", x, y, [str(k) for k in range(10)], "test"), None, config, quiet=True)
if main_process():
    torch.save({"state": bundle.module.state_dict(), "world": record["world_size"], "events": record["events"]}, out)
"""


@pytest.mark.slow
def test_pruning_under_two_gloo_processes_matches_one_process(files, mnist_train, tmp_path):
    data = mnist_train.subset(300)
    torch.save((data.x, data.y), tmp_path / "data.pt")
    (tmp_path / "prune_job.py").write_text(PRUNE_SCRIPT)
    args = [str(files / "model.safetensors"), str(tmp_path / "data.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(tmp_path / "prune_job.py"), *args, str(tmp_path / "one.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                          str(tmp_path / "prune_job.py"), *args, str(tmp_path / "two.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (a["world"], b["world"]) == (1, 2)
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        if name.endswith(".mask"):  # the same weights were pruned, on both
            assert torch.equal(a["state"][name], b["state"][name]), name
        else:
            assert torch.allclose(a["state"][name], b["state"][name], rtol=1e-4, atol=1e-5), name
    assert [e["sparsity"] for e in a["events"]] == [e["sparsity"] for e in b["events"]]
