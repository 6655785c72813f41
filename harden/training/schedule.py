"""The step plan of a certified run: clean warm-up, eps ramp and learning-rate decay, counted in
optimizer steps rather than epochs.

A ramp given in epochs squeezes into the first few steps of a short run (one epoch of a few
thousand samples), from a random network: eps jumps to its full value before the network has
learned anything and training collapses to a constant prediction. Counted as fractions of the
run's steps, every run gets a clean warm-up and a ramp of proportionate length.
"""

from __future__ import annotations

from dataclasses import dataclass

from harden.training.objectives import eps_at, ramp_fraction

# Fractions of the run's steps (Shi et al. use one warm-up epoch and a ramp over a sixth of the
# epochs on runs of a hundred epochs; a short CPU run needs relatively longer ones).
WARMUP_FRACTION = 0.05
RAMP_FRACTION = 0.45
# ...but the ramp is never shorter than this many steps where the run allows (up to
# LONGEST_RAMP_FRACTION of it): the papers' ramps are thousands of steps (Gowal et al. 10k on MNIST,
# Shi et al. ten epochs), and a ramp of a few dozen steps collapses a plain CNN to one class.
MIN_RAMP_STEPS = 2000
LONGEST_RAMP_FRACTION = 0.9
# Step decay: lr x DECAY_FACTOR at each of these fractions of the run (the IBP papers' milestones).
DECAY_AT = (0.7, 0.85)
DECAY_FACTOR = 0.2


@dataclass(frozen=True)
class StepPlan:
    """Where each optimizer step stands: clean warm-up steps, then eps ramp steps, then full eps."""

    total_steps: int
    warmup_steps: int
    ramp_steps: int

    @classmethod
    def of_run(cls, total_steps: int, *, warmup_share: float | None = None,
               ramp_share: float | None = None) -> "StepPlan":
        warmup_share = WARMUP_FRACTION if warmup_share is None else warmup_share
        ramp_share = RAMP_FRACTION if ramp_share is None else ramp_share
        warmup = min(int(round(warmup_share * total_steps)), total_steps)
        if ramp_share <= 0:
            return cls(total_steps, warmup, 0)
        ramp = max(int(round(ramp_share * total_steps)),
                   min(MIN_RAMP_STEPS, int(round(LONGEST_RAMP_FRACTION * total_steps))))
        return cls(total_steps, warmup, max(1, min(ramp, total_steps - warmup)))

    def ramp(self, step: int) -> float:
        """Fraction of the ramp done after 0-based `step` (0 during the warm-up)."""
        if step < self.warmup_steps:
            return 0.0
        return ramp_fraction(step - self.warmup_steps, self.ramp_steps)

    def eps(self, step: int, eps: float, schedule: str) -> float:
        if step < self.warmup_steps:
            return 0.0
        return eps_at(self.ramp(step), eps, schedule)

    def describe(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "ramp_steps": self.ramp_steps}


def step_decay_lr(lr: float, step: int, total: int) -> float:
    """lr times DECAY_FACTOR for each milestone (a fraction of the run's steps) already passed."""
    passed = sum(step >= round(at * total) for at in DECAY_AT)
    return lr * DECAY_FACTOR ** passed
