"""The certified-training benchmark's run length: the longest step plan that fits the budget at
the two measured step costs (on the eps ramp, at the full eps), in whole epochs or one partial one."""

from __future__ import annotations

import pytest
import torch

from benchmarks.certified_training import budgeted, planned_seconds
from certify.data.base import Dataset
from harden.training.finetune import FinetuneConfig
from harden.training.schedule import StepPlan


def images(n: int) -> Dataset:
    return Dataset("mnist", torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long), [str(c) for c in range(10)],
                   "zeros")


def test_planned_seconds_charges_the_plans_warmup_and_ramp_at_the_ramp_cost():
    plan = StepPlan.of_run(3000)
    assert (plan.warmup_steps, plan.ramp_steps) == (150, 2000)  # the 2,000-step floor on the ramp
    assert planned_seconds(3000, 0.2, 0.1) == pytest.approx(2150 * 0.2 + 850 * 0.1)


@pytest.mark.parametrize("timing", [(0.2, 0.1), (0.1, 0.2), (0.05, 0.05)])
def test_a_partial_epoch_run_is_the_longest_that_fits(timing):
    config = FinetuneConfig(train="mtl-ibp", eps=0.15, batch_size=128)
    budget = 400.0
    config, part = budgeted(config, timing, budget, images(128 * 10_000))
    steps = len(part) // 128
    assert config.epochs == 1 and len(part) == steps * 128
    assert planned_seconds(steps, *timing) <= budget < planned_seconds(steps + 1, *timing)


def test_whole_epochs_fill_the_budget_and_a_ramp_only_timing_would_stop_short():
    config = FinetuneConfig(train="mtl-ibp", eps=0.15, batch_size=128)
    train = images(128 * 100)  # 100 steps per epoch
    timing, budget = (0.2, 0.1), 1800.0
    config, part = budgeted(config, timing, budget, train)
    assert part is train
    assert planned_seconds(config.epochs * 100, *timing) <= budget < planned_seconds((config.epochs + 1) * 100, *timing)
    # Costing every step at the ramp's price (the earlier calibration) plans fewer epochs.
    assert config.epochs > int(budget / timing[0]) // 100
