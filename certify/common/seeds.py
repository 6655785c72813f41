"""One way to derive reproducible random streams from the user's --seed.

A stream is named by its position (epoch, batch number, step, purpose), never by the process that
runs it, so a run sharded across ranks repeats a one-process run exactly.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, *position: int) -> int:
    """A 62-bit seed for the stream at `position` under `seed`; distinct positions give unrelated
    streams (a hash, so (1, 0) and (0, 1) never collide the way sums of multiples can)."""
    text = ",".join(str(int(part)) for part in (seed, *position))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def generator(seed: int, *position: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded for the stream at `position`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *position))
