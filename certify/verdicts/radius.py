"""The largest certified eps per sample, by bisection with the verdict cascade.

Per sample we keep an interval [lower, upper]: the cascade verified the box of radius `lower`
(0 to start: a correctly classified point is its own certificate) and did not verify radius
`upper`. Each round certifies every open sample at its midpoint, in one batch, and halves the
intervals, until upper - lower <= tol. The reported radius is `lower`: an eps that WAS verified,
so it is sound whatever the bound methods do in between (they need not be monotone in eps).
`attack_upper` is the smallest radius where the attack found an adversarial example: the true
robust radius lies below it. With a per-sample time `budget` a sample whose rounds have cost that
much stops bisecting where it is: its radius is still one that was verified, only less tight.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from certify.bounds.bounder import MarginBounder
from certify.common.seeds import stream_seed
from certify.specs.input_spec import InputSpec
from certify.verdicts.cascade import (FALSIFIED, VERIFIED, CascadeOptions,
                                      certify_batch)
from certify.verdicts.file_outputs import FileOutputs


@dataclass
class RadiusRecord:
    index: int
    label: int
    prediction: int
    radius: float                # largest eps verified (0.0: none, or misclassified)
    upper: float                 # smallest eps tried and not verified: radius <= result < upper + tol
    attack_upper: float | None   # smallest eps where an adversarial example was found (None: never)
    method: str | None           # the method that verified `radius` (clean: misclassified)
    seconds: float
    out_of_time: bool = False    # the time budget stopped the bisection before `tolerance`

    def to_json(self) -> dict:
        return dict(self.__dict__)


def radius_summary(records: list[RadiusRecord], tolerance: float) -> dict:
    radii = [r.radius for r in records]
    return {"samples": len(records), "tolerance": tolerance,
            "mean": statistics.fmean(radii) if radii else 0.0,
            "median": statistics.median(radii) if radii else 0.0,
            "min": min(radii, default=0.0), "max": max(radii, default=0.0),
            "certified_nonzero": sum(1 for r in radii if r > 0),
            "falsified_by_attack": sum(1 for r in records if r.attack_upper is not None),
            "out_of_time": sum(1 for r in records if r.out_of_time)}


def bisect_radius(module: nn.Module, bounder: MarginBounder, spec: InputSpec, x: torch.Tensor,
                  labels: torch.Tensor, indices: list[int], options: CascadeOptions, *, tolerance: float,
                  lower: torch.Tensor, upper: torch.Tensor, attack_upper: torch.Tensor, seed: int,
                  verified_method: list[str | None] | None = None,
                  file_outputs: FileOutputs | None = None, budget: float | None = None,
                  progress: Callable[[str], None] | None = None) -> list[RadiusRecord]:
    """Bisect every sample of one batch; `lower`/`upper`/`attack_upper` (float64, (n,)) start the
    intervals (e.g. from the --eps verdicts already known), `attack_upper` inf where none.
    `budget`: seconds per sample (None: no limit); `progress` is told after each round."""
    n = x.shape[0]
    lower, upper, attack_upper = lower.clone(), upper.clone(), attack_upper.clone()
    method: list[str | None] = list(verified_method) if verified_method is not None else [None] * n
    cost = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        predictions = module(x.to(bounder.device)).argmax(1).cpu()
    wrong = predictions != labels
    lower[wrong], upper[wrong], attack_upper[wrong] = 0.0, 0.0, 0.0
    for i in torch.nonzero(wrong).flatten().tolist():
        method[i] = "clean"
    round_ = 0
    while True:
        unfinished = upper - lower > tolerance
        in_time = cost < budget if budget is not None else torch.ones(n, dtype=torch.bool)
        open_ = torch.nonzero(unfinished & in_time).flatten()
        if open_.numel() == 0:
            break
        mid = (lower[open_] + upper[open_]) / 2
        # One box per sample, each at its own float64 mid: the radius recorded is the eps proved.
        boxes = [spec.box(x[i:i + 1], float(m)) for i, m in zip(open_.tolist(), mid)]
        box = (torch.cat([b[0] for b in boxes]), torch.cat([b[1] for b in boxes]))
        t0 = time.perf_counter()
        verdicts = certify_batch(module, bounder, x[open_], labels[open_], box,
                                 [indices[i] for i in open_.tolist()], options, seed=stream_seed(seed, round_),
                                 file_outputs=file_outputs, l2_radii=mid if spec.norm == "2" else None)
        cost[open_] += (time.perf_counter() - t0) / open_.numel()
        for k, (row, verdict) in enumerate(zip(open_.tolist(), verdicts)):
            if verdict.verdict == VERIFIED:
                lower[row], method[row] = mid[k], verdict.method
            else:
                upper[row] = mid[k]
                if verdict.verdict == FALSIFIED:
                    attack_upper[row] = min(attack_upper[row].item(), mid[k].item())
        round_ += 1
        if progress is not None:
            progress(f"radius round {round_}: {open_.numel()}/{n} of the batch bisected")
    return [RadiusRecord(indices[i], int(labels[i]), int(predictions[i]), float(lower[i]), float(upper[i]),
                         None if attack_upper[i] == float("inf") else float(attack_upper[i]),
                         method[i] if lower[i] > 0 or wrong[i] else None, round(float(cost[i]), 6),
                         bool(upper[i] - lower[i] > tolerance))
            for i in range(n)]
