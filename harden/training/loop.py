"""The one training loop of `harden train`, `harden finetune` and `harden prune`.

Epochs of global batches drawn in a seeded order; each step sets the learning rate, asks the run
for the step's inputs (eps, attack starts; pruning events happen there), computes the loss of one
`TrainStep`, then backward, the run's after-backward hook and Adam. Every epoch ends with the
run's log entry and checkpoint (harden.training.checkpoint), so `resume=` continues exactly.

Distributed. Under `torchrun` (WORLD_SIZE > 1) the step runs inside DistributedDataParallel
(NCCL on GPUs, gloo on CPUs). Every process draws the same global batch and takes its contiguous
share; its summed loss is scaled by world_size / global_batch, so the averaged gradient is exactly
the gradient of the global batch's mean loss, as in one process. Only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from certify.common import distributed
from certify.common.progress import progress_bar
from certify.common.seeds import generator
from harden.training.objectives import Objective, Step


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main_process() -> bool:
    """True outside torchrun and on rank 0 under it: the one process that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def start_processes(device: torch.device) -> Processes:
    """Join the process group that torchrun describes in the environment (none without it), the
    way certify's sharded runs do (certify.common.distributed.start)."""
    already = torch.distributed.is_available() and torch.distributed.is_initialized()
    shard = distributed.start(device)
    return Processes(shard.rank, shard.world_size, shard.local_rank, started_here=shard.world_size > 1 and not already)


def place_device(name: str | None) -> torch.device:
    """--device checked by the one device check; under torchrun a bare "cuda" means this process's
    GPU (certify.common.distributed.device_for), made the current one."""
    distributed.resolve_device(name)
    shard = distributed.Shard(0, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))
    device = distributed.device_for(shard, name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def training_module(bundle) -> nn.Module:
    """The bundle's module, behind its input normalization when the model expects one (attacks and
    bounds stay in pixel space). Parameters are shared: training it trains the bundle's module."""
    from certify.specs.input_spec import InputSpec, with_normalization

    spec = InputSpec(mean=bundle.data.get("mean"), std=bundle.data.get("std"))
    return with_normalization(bundle.module, spec, tuple(bundle.input_shape))


class TrainStep(nn.Module):
    """One step's loss as a module, so DistributedDataParallel can wrap it: all attack and bound
    passes happen inside one forward, and one backward all-reduces the gradients. `extra` adds the
    run's weight terms (layer regularizers, pruning's sparsity and condition terms)."""

    def __init__(self, model: nn.Module, objective: Objective, extra: Callable[[], torch.Tensor | None],
                 touch_all: bool):
        super().__init__()
        self.model = model
        self.objective = objective
        self.extra = extra
        # Under DDP every parameter must receive a gradient each step; a zero-valued term makes sure
        # (a layer that a step leaves out, or a shard with no samples).
        self.touch_all = touch_all

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: Step, scale: float):
        zero = sum(p.sum() for p in self.model.parameters()) * 0.0 if self.touch_all else 0.0
        if x.shape[0] == 0:
            none = torch.zeros((), device=x.device)
            return zero + none, none, none, none
        result = self.objective(self.model, x, y, step)
        loss = result.losses.sum() * scale + zero
        extra = self.extra()
        if extra is not None:
            loss = loss + extra
        robust = result.robust_correct.sum() if result.robust_correct is not None else torch.zeros((), device=x.device)
        return loss, result.losses.detach().sum(), result.clean_correct.sum(), robust


def wrap_step(step: TrainStep, processes: Processes, device: torch.device) -> nn.Module:
    """The step as it runs: inside DistributedDataParallel under torchrun, as it is otherwise."""
    if processes.world <= 1:
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


def stream_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of an epoch: a function of (seed, epoch) alone (stream 0; attack starts are 1)."""
    return torch.randperm(n, generator=generator(seed, epoch, 0))


def cosine_lr(lr: float, step: int, total: int) -> float:
    if total <= 1:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _no_step_input(epoch: int, global_step: int, rows: torch.Tensor) -> Step:
    return Step(0.0, 1.0, None)


@dataclass
class Loop:
    """What a run is made of; `run()` is the loop. Hooks (all optional but `step`):
    order(epoch) the epoch's permutation; step_input(epoch, global_step, rows) the Step of a global
    batch (its start noise already this process's share); after_backward() before Adam's step;
    status(epoch, totals) the progress line; log_entry(epoch) more of the epoch's log entry; save(epoch, epochs_log) the end-of-epoch checkpoint."""

    name: str
    step: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    processes: Processes = field(default_factory=Processes)
    lr_at: Callable[[int, int], float] | None = None
    order: Callable[[int], torch.Tensor] | None = None
    step_input: Callable[[int, int, torch.Tensor], Step] = _no_step_input
    after_backward: Callable[[], None] | None = None
    status: Callable[[int, torch.Tensor], str] | None = None
    save: Callable[[int, list[dict]], None] | None = None
    log_entry: Callable[[int], dict] | None = None
    quiet: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def run(self, start_epoch: int = 0, epochs_log: list[dict] | None = None) -> list[dict]:
        """Epochs start_epoch..epochs-1; returns the epochs' log (loss, clean and robust accuracy)."""
        epochs_log = list(epochs_log or [])
        with progress_bar(quiet=self.quiet) as bar:
            task = bar.add_task(self.name, total=max(0, (self.epochs - start_epoch) * self.steps_per_epoch), status="")
            for epoch in range(start_epoch, self.epochs):
                started = time.perf_counter()
                totals = self._epoch(epoch, lambda status: bar.update(task, advance=1, status=status))
                totals = self.processes.all_sum(totals)
                seen = max(totals[3].item(), 1)
                epochs_log.append({"epoch": epoch + 1, "loss": totals[0].item() / seen,
                                   "train_clean_accuracy": totals[1].item() / seen,
                                   "train_robust_accuracy": totals[2].item() / seen,
                                   "seconds": round(time.perf_counter() - started, 2)})
                if self.log_entry is not None:
                    epochs_log[-1].update(self.log_entry(epoch))
                if self.save is not None and self.processes.main:
                    self.save(epoch, epochs_log)
        return epochs_log

    def _epoch(self, epoch: int, advance: Callable[[str], None]) -> torch.Tensor:
        n, batch, world, rank = len(self.x), self.batch_size, self.processes.world, self.processes.rank
        order = self.order(epoch) if self.order is not None else stream_order(self.seed, epoch, n)
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, clean correct, robust correct, samples
        for s in range(self.steps_per_epoch):
            global_step = epoch * self.steps_per_epoch + s
            rows = order[s * batch:(s + 1) * batch]
            mine = rows.tensor_split(world)[rank]
            step = self.step_input(epoch, global_step, rows)
            if self.lr_at is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(global_step, self.epochs * self.steps_per_epoch)
            x, y = self.x[mine].to(self.device), self.y[mine].to(self.device)
            self.module.train()
            loss, loss_sum, clean, robust = self.step(x, y, step, world / len(rows))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.after_backward is not None:
                self.after_backward()
            self.optimizer.step()
            totals += torch.tensor([loss_sum.item(), clean.item(), robust.item(), len(mine)], dtype=torch.float64)
            advance(self.status(epoch, totals) if self.status is not None else "")
        return totals
