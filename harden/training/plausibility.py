"""A warning when a model does far worse on its data than any trained classifier should.

The usual cause is the input normalization: a model trained on (x - mean) / std that is fed raw
pixels (no --mean/--std given to the first harden step), or the reverse. Fine-tuning such a model
does not fail; it quietly retrains it for the wrong inputs. So before training starts the model's
clean accuracy is measured on a few samples with the normalization harden will apply and with the
other choice (the recorded normalization left out, or the data's own mean and std put in); a
warning names the other choice when the first is near chance or clearly below it.
"""

from __future__ import annotations

from typing import Callable

import torch

from certify.data.base import Dataset
from certify.specs.input_spec import InputSpec, with_normalization
from harden.io.bundle import Bundle
from harden.io.normalization import describe, recorded_normalization
from harden.training.loop import main_process, training_module
from harden.training.train import accuracy

SAMPLES = 500
# Within this many points of chance (30% on 10 classes) a model has learnt almost nothing about
# the inputs it is given.
ABOVE_CHANCE = 0.2
# The other normalization doing this much better on the same samples (25 of 500) is no accident.
# Near chance alone would miss the usual mistake: a CNN trained on normalized MNIST stays far above
# chance on raw pixels (tests/test_normalization.py trains one), yet it is the wrong input.
BETTER_BY = 0.05


def warn_if_implausible(bundle: Bundle, train: Dataset, test: Dataset | None, log: Callable[[str], None], *,
                        when: str) -> float | None:
    """Measure clean accuracy on the first SAMPLES test samples (training samples without a test set)
    as training will see them, and with the other choice of normalization; warn through `log` (on
    the process that writes, rank 0) when the first is near chance or clearly below the second.
    Returns the accuracy (None where nothing was measured)."""
    data = test if test is not None and len(test) else train
    sample = data.subset(SAMPLES)
    if len(sample) == 0 or not main_process():
        return None
    cpu = torch.device("cpu")
    found = accuracy(training_module(bundle).to(cpu), sample, device=cpu)
    chance = 1.0 / bundle.num_classes
    measured = (f"clean accuracy {when} is {100 * found:.1f}% on {len(sample)} samples of {data.name} "
                f"(chance {100 * chance:.0f}%)")
    if _trained_on_raw_pixels(bundle):
        # harden itself trained it on raw pixels: the normalization is known, and a --mean/--std would be
        # refused. A shrunken model (spectral norm at a small beta) can do better on inputs scaled up by
        # 1/std without that saying anything about its inputs, so only the near-chance test applies.
        if found < chance + ABOVE_CHANCE:
            log(f"warning: {measured}: the model has learnt almost nothing about these inputs")
        return found
    other, other_way, advice = _other_normalization(bundle, sample, train)
    if other >= found + BETTER_BY:
        log(f"warning: {measured} but {100 * other:.1f}% {other_way}, so the input normalization is probably wrong "
            f"-- {advice}")
    elif found < chance + ABOVE_CHANCE:
        log(f"warning: {measured}, and {100 * other:.1f}% {other_way}: the model has learnt almost nothing about "
            "these inputs -- check that the data and the input normalization are the ones it was trained on")
    return found


def _trained_on_raw_pixels(bundle: Bundle) -> bool:
    mean, std = recorded_normalization(bundle)
    return mean is None and std is None and any(record.get("run") for record in bundle.history)


def _other_normalization(bundle: Bundle, sample: Dataset, statistics_of: Dataset) -> tuple[float, str, str]:
    """Accuracy with the other choice (the recorded normalization left out, or the data's own
    statistics, from `statistics_of`, put in), how to say it, and what to do if it is the right one."""
    cpu = torch.device("cpu")
    mean, std = recorded_normalization(bundle)
    if mean is not None or std is not None:
        other = accuracy(bundle.module, sample, device=cpu)
        return (other, f"without the recorded {describe(mean, std)}",
                "if the model expects raw pixels, convert the original model again without --mean/--std")
    data_mean, data_std = channel_statistics(statistics_of)
    normalized = with_normalization(bundle.module, InputSpec(mean=data_mean, std=data_std), tuple(bundle.input_shape))
    other = accuracy(normalized, sample, device=cpu)
    return (other, f"with {describe(data_mean, data_std)} (this data's own statistics)",
            "if the model was trained on normalized inputs, give its --mean/--std to harden convert (the first step)")


def channel_statistics(data: Dataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the samples, rounded to 4 digits as a user would type them."""
    x = data.x.float()
    axes = [0] + list(range(2, x.dim())) if x.dim() >= 4 else list(range(x.dim()))
    mean = x.mean(dim=axes).flatten().tolist()
    std = x.std(dim=axes).clamp_min(1e-6).flatten().tolist()
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]
