"""Plain (clean) training of a classifier: `harden train`, the starting point of the pipeline."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from certify.data import Dataset
from certify.progress import progress_bar
from harden.bundle import Bundle


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return the generator that orders the data, so a run repeats exactly."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    """Train `bundle.module` with cross-entropy and Adam; returns the history record it appends."""
    generator = seed_everything(seed)
    dev = pick_device(device)
    module = bundle.module.to(dev)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    started = time.perf_counter()
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("train", total=epochs * steps_per_epoch, status="")
        for epoch in range(epochs):
            module.train()
            order = torch.randperm(len(train), generator=generator)
            for step in range(steps_per_epoch):
                index = order[step * batch_size:(step + 1) * batch_size]
                x, y = train.x[index].to(dev), train.y[index].to(dev)
                loss = F.cross_entropy(module(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    test_accuracy = accuracy(module, test, device=dev)
    module.to("cpu").eval()
    record = {"run": "train", "loss": "clean", "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "seed": seed, "dataset": train.name, "test_accuracy": test_accuracy,
              "seconds": round(time.perf_counter() - started, 1)}
    bundle.history.append(record)
    return record
