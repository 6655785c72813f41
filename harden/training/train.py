"""Plain (clean) training of a classifier: `harden train`, the starting point of the pipeline."""

from __future__ import annotations

import time

import torch
from torch import nn

from certify.data.datasets import Dataset
from certify.common.distributed import resolve_device
from certify.common.errors import UserError, is_finite_number
from harden.io.bundle import Bundle


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return the generator that orders the data, so a run repeats exactly."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_common_options(*, epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                         seed: int | None = None, steps: int | None = None, eval_limit: int | None = None) -> None:
    """The options every training command shares, checked the same way everywhere (None: not given)."""
    if epochs is not None and not (_whole(epochs) and epochs >= 1):
        raise UserError(f"--epochs {epochs} is below 1", "give at least one epoch")
    if lr is not None and not (is_finite_number(lr) and lr > 0):
        raise UserError(f"--lr {lr} is not a positive number", "give a learning rate such as 1e-3")
    if batch_size is not None and not (_whole(batch_size) and batch_size >= 1):
        raise UserError(f"--batch-size {batch_size} is below 1", "give a batch size such as 128")
    if seed is not None and not (_whole(seed) and 0 <= seed < 2 ** 63):
        raise UserError(f"--seed {seed} is outside 0..2^63-1", "give a seed such as 0")
    if steps is not None and not (_whole(steps) and steps >= 1):
        raise UserError(f"--steps {steps} is below 1", "give the number of attack steps, e.g. 10")
    if eval_limit is not None and not (_whole(eval_limit) and eval_limit >= 1):
        raise UserError(f"--eval-limit {eval_limit} is below 1",
                        "give a positive number of test samples, or leave it out for the whole test set")


def check_limit(limit: int | None) -> None:
    """--limit N: the first N training samples; N must be at least 1."""
    if limit is not None and not (_whole(limit) and limit >= 1):
        raise UserError(f"--limit {limit} is below 1", "give a positive number of training samples")


@torch.no_grad()
def accuracy(module: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int = 1000) -> float:
    module.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        x = dataset.x[start:start + batch_size].to(device)
        y = dataset.y[start:start + batch_size].to(device)
        correct += (module(x).argmax(1) == y).sum().item()
    return correct / max(len(dataset), 1)


def train_clean(bundle: Bundle, train: Dataset, test: Dataset, *, epochs: int = 3, lr: float = 1e-3,
                batch_size: int = 128, seed: int = 0, device: str | None = None, quiet: bool = False) -> dict:
    """Train `bundle.module` with cross-entropy and Adam (the one training loop, harden.training.loop,
    with the clean objective); returns the history record it appends."""
    from harden.training.loop import Loop, TrainStep, training_module
    from harden.training.objectives import Clean

    check_common_options(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    if len(train) == 0:
        raise UserError("the training data is empty", "give a dataset with samples")
    dev = resolve_device(device)
    # One generator for the whole run: each epoch's order continues the previous one's stream.
    order = seed_everything(seed)
    bundle.module.to(dev)
    module = training_module(bundle).to(dev)  # behind the recorded --mean/--std, if any
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    started = time.perf_counter()
    loop = Loop("train", TrainStep(module, Clean(), lambda: None, touch_all=False), module, optimizer,
                train.x, train.y, epochs, batch_size, seed, dev, quiet=quiet,
                order=lambda epoch: torch.randperm(len(train), generator=order),
                status=lambda epoch, totals: f"epoch {epoch + 1}/{epochs} loss {totals[0].item() / max(totals[3].item(), 1):.3f}")
    loop.run()
    test_accuracy = accuracy(module, test, device=dev)
    bundle.module.to("cpu").eval()
    record = {"run": "train", "loss": "clean", "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "seed": seed, "dataset": train.name, "test_accuracy": test_accuracy,
              "seconds": round(time.perf_counter() - started, 1)}
    bundle.history.append(record)
    return record
