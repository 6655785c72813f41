"""Sharding a certification run across the ranks of `torchrun`, and merging the shards on rank 0.

Under `torchrun --nproc-per-node N -m certify ...` every rank runs the same command line. Each rank
certifies whole batches (batch b goes to rank b mod N), so every batch is the same set of samples
as in a one-process run, and with the batch-derived attack seed the verdicts are the same too.
Rank 0 gathers the per-sample records (small: no bounds, no images) and writes the one report;
the other ranks write nothing. gloo on CPU, NCCL when the run is on CUDA.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from certify.common.errors import UserError


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns_batch(self, batch_number: int) -> bool:
        return batch_number % self.world_size == self.rank


SINGLE = Shard()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def start(device: torch.device) -> Shard:
    """Join the process group that torchrun set up (environment variables); one process: no-op."""
    if not launched_by_torchrun():
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


_DEVICE = re.compile(r"^(?P<kind>cpu|cuda)(?::(?P<index>\d+))?$")
DEVICE_HINT = "use cpu, cuda, cuda:N or auto"


def device_kind(device: str | None) -> str:
    """'cpu' or 'cuda' for --device (auto: cuda where present); a UserError for anything else.

    The one check of --device for both command lines: only cpu, cuda, cuda:N (N an existing GPU)
    and auto are accepted; names torch does not know (gpu, tpu, ''), other backends (mps, xpu) and
    malformed indices (cuda:x) are refused before any work starts."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = _DEVICE.match(device) if isinstance(device, str) else None
    if match is None:
        try:
            other = torch.device(device).type if isinstance(device, str) and device else None
        except (RuntimeError, ValueError):
            other = None
        if other is not None:
            raise UserError(f"--device {device} is not supported", DEVICE_HINT)
        raise UserError(f"unknown --device {device!r}", DEVICE_HINT)
    kind = match["kind"]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available here", "use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if match["index"] is not None and int(match["index"]) >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0"
                            f"{f'..cuda:{count - 1}' if count > 1 else ''})",
                            "give an existing GPU index, cuda (the first one) or auto")
    elif match["index"] not in (None, "0"):
        raise UserError(f"unknown --device {device!r}", DEVICE_HINT)
    return kind


def resolve_device(device: str | None) -> torch.device:
    """The torch.device of --device after `device_kind`'s check (auto: cuda where present)."""
    kind = device_kind(device)
    return torch.device(kind if device in (None, "auto") else device)


def device_for(shard: Shard, requested: str | None) -> torch.device:
    """The device of this rank: with several ranks on one machine, CUDA rank r takes GPU r."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and shard.world_size > 1:
        device = torch.device("cuda", shard.local_rank % max(torch.cuda.device_count(), 1))
    return device


def gather(shard: Shard, value: Any) -> list[Any] | None:
    """Every rank's `value` on rank 0 (in rank order); None on the other ranks."""
    if shard.world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * shard.world_size if shard.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def finish(shard: Shard) -> None:
    if shard.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
