"""`harden prune` runs in the one training loop (harden.training.loop): it writes a checkpoint
after every epoch, with its pruning state, and a resumed run ends on exactly the weights, masks and
event log of the run that was never interrupted."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from certify.common.errors import UserError
from harden.io.bundle import Bundle
from harden.io.zoo import mlp
from harden.pruning.prune import PruneConfig, prune
from harden.training.checkpoint import epoch_checkpoint
from harden.training.finetune import FinetuneConfig, finetune


def _config(**changes) -> PruneConfig:
    # Events over all the steps (prune_fraction 1), so one of them falls in the resumed epoch; the
    # attack, both loss terms and the condition constraint all take part.
    settings = dict(sparsity=0.6, prune_steps=3, prune_fraction=1.0, train="pgd", eps=0.1, steps=2, epochs=2,
                    batch_size=64, kappa_max=50.0, tsc_weight=1e-5, seed=5)
    return PruneConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Bundle(mlp(), (1, 28, 28), 10, {"kind": "zoo", "name": "mlp"},
                  data={"dataset": "mnist", "input_range": [0.0, 1.0]})


def test_resumed_pruning_ends_on_exactly_the_same_weights_and_events(model, mnist_train, tmp_path):
    train = mnist_train.subset(256)
    straight = copy.deepcopy(model)
    expected = prune(straight, train, None, _config(), checkpoint_dir=tmp_path, quiet=True)
    assert [e["step"] for e in expected["events"]] == [0, 2, 4]  # 4 steps an epoch: the last is in epoch 2
    first = epoch_checkpoint(tmp_path, 1)
    with safe_open(str(first), framework="pt") as handle:
        meta = json.loads(handle.metadata()["harden.checkpoint"])
        keys = set(handle.keys())
    assert meta["epoch"] == 1 and meta["next_event"] == 2 and len(meta["prune_events"]) == 2
    assert any(k.endswith(".mask") for k in keys)
    resumed = copy.deepcopy(model)
    record = prune(resumed, train, None, _config(), resume=first, quiet=True)
    a, b = straight.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert record["events"] == expected["events"] and record["final"] == expected["final"]
    assert [e["epoch"] for e in record["epochs_log"]] == [1, 2] and record["resumed_from"] == str(first)
    # The checkpoint of epoch 1 is another model (so the comparison above can fail).
    with safe_open(str(first), framework="pt") as handle:
        assert not all(torch.equal(handle.get_tensor(f"model.{k}"), a[k]) for k in a)


def test_resume_refuses_other_settings_and_finetune_checkpoints(model, mnist_train, tmp_path):
    train = mnist_train.subset(128)
    checkpoint = tmp_path / "p.ckpt.safetensors"
    prune(copy.deepcopy(model), train, None, _config(train="clean", eps=0.0, epochs=1), checkpoint=checkpoint,
          quiet=True)
    with pytest.raises(UserError, match="other settings"):
        prune(copy.deepcopy(model), train, None, _config(train="clean", eps=0.0, epochs=1, sparsity=0.5),
              resume=checkpoint, quiet=True)
    tuned = tmp_path / "f.ckpt.safetensors"
    finetune(copy.deepcopy(model), train, None, FinetuneConfig(train="clean", batch_size=64), checkpoint=tuned,
             quiet=True)
    with pytest.raises(UserError):
        prune(copy.deepcopy(model), train, None, _config(train="clean", eps=0.0, epochs=1), resume=tuned, quiet=True)


def test_the_prune_command_resumes_from_a_checkpoint(model, mnist_train, tmp_path):
    # The command line: --checkpoint-dir keeps each epoch, --resume continues from epoch 1 and ends
    # on the same weights as the run that was never interrupted.
    import numpy as np
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from harden.cli import app
    from harden.io.bundle_file import save_bundle

    train = mnist_train.subset(256)
    np.savez(tmp_path / "small.npz", x=train.x.numpy(), y=train.y.numpy())
    save_bundle(copy.deepcopy(model), tmp_path / "m.safetensors")
    common = [str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "small.npz"), "--sparsity", "0.5",
              "--epochs", "2", "--batch-size", "64", "--eval-limit", "64", "--quiet"]
    runner = CliRunner()
    straight = runner.invoke(app, ["prune", *common, "-o", str(tmp_path / "a.safetensors"),
                                   "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert straight.exit_code == 0, straight.output
    resumed = runner.invoke(app, ["prune", *common, "-o", str(tmp_path / "b.safetensors"),
                                  "--checkpoint-dir", str(tmp_path / "ckpt2"),
                                  "--resume", str(epoch_checkpoint(tmp_path / "ckpt", 1))])
    assert resumed.exit_code == 0, resumed.output
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
