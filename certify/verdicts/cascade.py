"""The per-sample verdict cascade: cheapest decisive answer first.

For each sample and box: misclassified (the clean input is its own counterexample) -> PGD attack
(falsified, confirmed by a plain forward and, given the file's outputs, by onnxruntime) -> IBP ->
CROWN -> alpha-CROWN (verified when the lower bound of every margin is > 0) -> unknown. The
attack's first restart runs before the bounds and its other restarts after CROWN; the stages and
their one runner are in certify.verdicts.stages. A verdict of "verified" is a proof; "falsified"
carries a concrete adversarial input; the two can never both hold for one sample (tests check this).

The cascade only looks at the boxes it is given: reusing verdicts across eps (falsified at e =>
falsified above e, verified at e => verified below e) is the engine's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from certify.attacks.gradient import find_adversarial, margin
from certify.bab.outcome import SAT, UNSAT, Limits, Query
from certify.bab.search import SearchSummary, search_all
from certify.bounds.bounder import (METHODS, MarginBounder, empirical_margins,
                                    lower_bounds, margin_matrix)
from certify.common.errors import UserError
from certify.common.seeds import generator, stream_seed
from certify.verdicts import stages as stage_table
from certify.verdicts.file_outputs import FileOutputs

VERIFIED, FALSIFIED, UNKNOWN = "verified", "falsified", "unknown"
# The bound methods, then branch and bound: what --method accepts.
CASCADE_METHODS = METHODS + ("bab",)
BRANCHING = ("babsr", "fsb")


def check_bab_options(timeout: float | None, max_domains: int, branching: str) -> None:
    """A UserError on the first bad branch-and-bound option."""
    if timeout is not None and not (0 < timeout < float("inf")):
        raise UserError(f"--timeout {timeout} is not a positive number of seconds", "give e.g. --timeout 30")
    if max_domains <= 0:
        raise UserError(f"--max-domains {max_domains} is not positive", "give e.g. --max-domains 200000")
    if branching not in BRANCHING:
        raise UserError(f"unknown --branching {branching!r}", f"use one of {', '.join(BRANCHING)}")


@dataclass
class Verdict:
    index: int
    label: int
    prediction: int
    verdict: str
    method: str | None              # what decided: clean, pgd, ibp, crown, alpha-crown (None: unknown)
    margin_lower_bound: float | None  # best sound lower bound of min_j margin found (None: not bounded)
    seconds: float
    reused_from: float | None = None  # the eps whose verdict implied this one (None: decided here)
    bab: dict | None = None  # what branch and bound did (certify.bab.search.SearchSummary), if it ran

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def reused_at(self, eps: float) -> "Verdict":
        """This verdict, decided at `eps`, carried over to another eps (no work done there).

        Only two carries are sound: verified to a smaller eps and falsified to a larger one. A
        verified verdict keeps its margin bound: the smaller box lies inside the one it was proved
        on, so a lower bound over the larger box bounds every margin in the smaller one too. A
        falsified verdict reaches a LARGER box, where the bound from the smaller box bounds nothing:
        it is dropped (null).
        """
        bound = self.margin_lower_bound if self.verdict == VERIFIED else None
        return Verdict(self.index, self.label, self.prediction, self.verdict, self.method,
                       bound, 0.0, self.reused_from if self.reused_from is not None else eps, self.bab)


@dataclass
class CascadeOptions:
    methods: tuple[str, ...] = METHODS   # bound methods, tried in this order
    attack: bool = True
    attack_steps: int = 50
    attack_restarts: int = 3
    seed: int = 0
    # Branch and bound (the "bab" method): seconds per sample or property (None: no limit, only the
    # domain limit), domains bounded per sample or property, domains split per step, branching rule.
    timeout: float | None = None
    max_domains: int = 200_000
    bab_batch: int = 64
    branching: str = "babsr"

    def bab_limits(self) -> Limits:
        """Fresh limits for one sample or property, its clock started now."""
        deadline = float("inf") if self.timeout is None else time.perf_counter() + self.timeout
        return Limits(deadline=deadline, max_domains=self.max_domains, batch=self.bab_batch, branching=self.branching)


def cascade_stages(options: CascadeOptions) -> list[stage_table.Stage]:
    """The stages of `options` in the order they run (certify.verdicts.stages.cascade_stages)."""
    return stage_table.cascade_stages(options.methods, attack=options.attack, restarts=options.attack_restarts)


def attack_seeds(seed: int, attempt: int) -> tuple[int, int]:
    """(seed of the random start drawn for attack stage `attempt`, seed of its further restarts):
    distinct streams, so no restart repeats the start drawn before it."""
    return stream_seed(seed, attempt, 0), stream_seed(seed, attempt, 1)


@dataclass
class _SampleBatch:
    """One batch of samples with their boxes, as the stage runner sees it."""

    module: nn.Module
    bounder: MarginBounder
    x: torch.Tensor
    labels: torch.Tensor
    box: tuple[torch.Tensor, torch.Tensor]
    options: CascadeOptions
    seed: int
    file_outputs: FileOutputs | None = None
    l2_radii: torch.Tensor | None = None  # per sample: the region is the l2 ball around x within the box
    verdict: list[str] = field(init=False)
    method: list[str | None] = field(init=False)

    def __post_init__(self):
        n = self.x.shape[0]
        with torch.no_grad():
            self.predictions = self.module(self.x.to(self.bounder.device)).argmax(1).cpu()
        self.open_ = self.predictions == self.labels
        if self.file_outputs is not None:
            # The clean image is a counterexample only where the file itself misclassifies it.
            wrong = torch.nonzero(~self.open_).flatten()
            self.open_[wrong] = ~self.file_outputs.misclassified(self.x[wrong], self.labels[wrong])
        self.verdict = [UNKNOWN if self.open_[i] else FALSIFIED for i in range(n)]
        self.method = [None if self.open_[i] else "clean" for i in range(n)]
        self.best = torch.full((n, self.bounder.num_classes - 1), -float("inf"))
        self.cost = torch.zeros(n)
        self.bab: list[dict | None] = [None] * n

    def open_rows(self) -> torch.Tensor:
        return torch.nonzero(self.open_).flatten()

    def clean_margins(self, rows: torch.Tensor) -> torch.Tensor:
        """The margins (rows, classes - 1) at the clean inputs themselves: no bound over the box can exceed them."""
        with torch.no_grad():
            logits = self.module(self.x[rows].to(self.bounder.device)).cpu()
        return empirical_margins(logits, self.labels[rows].cpu())

    def attack(self, rows: torch.Tensor, restarts: int, attempt: int) -> None:
        device = self.bounder.device
        lo, hi = self.box[0][rows], self.box[1][rows]
        start_seed, restart_seed = attack_seeds(self.seed, attempt)
        # find_adversarial starts at the point it is given: the clean image first, a random
        # point of the box later (the clean start was tried already).
        start = self.x[rows] if attempt == 0 else lo + torch.rand(lo.shape, generator=generator(start_seed)) * (hi - lo)
        found, x_adv = find_adversarial(self.module, start.to(device), self.labels[rows].to(device), lo.to(device),
                                        hi.to(device), steps=self.options.attack_steps, restarts=restarts,
                                        seed=restart_seed, l2_ball=self.l2_ball(rows), random_start=attempt > 0)
        found = found.cpu()
        if self.file_outputs is not None:
            # Reported falsified only where the file's own output is misclassified too.
            hits = torch.nonzero(found).flatten()
            found[hits] = self.file_outputs.misclassified(x_adv[hits].cpu(), self.labels[rows][hits])
        for row in rows[found].tolist():
            self.decide(row, FALSIFIED, "pgd")

    def bound(self, rows: torch.Tensor, method: str) -> None:
        c = margin_matrix(self.labels[rows].to(self.bounder.device), self.bounder.num_classes)
        lower = lower_bounds(self.bounder, self.box[0][rows], self.box[1][rows], c, method,
                             l2_ball=self.l2_ball(rows)).cpu()
        # Every method's bound is sound, so the elementwise best of them is too.
        self.best[rows] = torch.maximum(self.best[rows], lower)
        for row in rows[self.best[rows].min(1).values > 0].tolist():
            self.decide(row, VERIFIED, method)

    def branch_and_bound(self, rows: torch.Tensor) -> None:
        for row in rows.tolist():
            summary = self._search(row)
            self.bab[row] = summary.to_json()
            if summary.result == UNSAT:
                self.decide(row, VERIFIED, summary.method)
            elif summary.result == SAT:
                self.decide(row, FALSIFIED, summary.method)

    def _search(self, row: int) -> SearchSummary:
        """One tree per competing class whose margin is still open, lowest bound first."""
        label, k = int(self.labels[row]), self.bounder.num_classes
        others = [j for j in range(k) if j != label]
        lower, upper = self.box[0][row:row + 1].float(), self.box[1][row:row + 1].float()
        ball = None if self.l2_radii is None else (self.x[row:row + 1].float(), float(self.l2_radii[row]))
        columns = [col for col in torch.argsort(self.best[row]).tolist() if self.best[row, col] <= 0]
        queries = []
        for col in columns:
            c = torch.zeros(1, k)
            c[0, label], c[0, others[col]] = 1.0, -1.0
            queries.append(Query(lower, upper, c, torch.zeros(1), lambda x, r=row: self._confirm(r, x), ball))
        summary = search_all(self.bounder, self.module, queries, self.options.bab_limits())
        for col, bound in zip(columns, summary.tree_bounds):
            self.best[row, col] = max(float(self.best[row, col]), bound)
        return summary

    def _confirm(self, row: int, x: torch.Tensor) -> bool:
        """Whether x is a counterexample for this sample: in its box (and l2 ball), and misclassified
        by the ONNX file where the batch has it (else by the module)."""
        if not bool(((x >= self.box[0][row]) & (x <= self.box[1][row])).all()):
            return False
        if self.l2_radii is not None and float((x.double() - self.x[row].double()).norm()) > float(self.l2_radii[row]):
            return False
        label = self.labels[row:row + 1]
        if self.file_outputs is not None:
            return bool(self.file_outputs.misclassified(x.unsqueeze(0).cpu(), label)[0])
        with torch.no_grad():
            logits = self.module(x.unsqueeze(0).to(self.bounder.device)).cpu()
        return bool(margin(logits, label)[0] > 0)

    def l2_ball(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.l2_radii is None:
            return None
        return self.x[rows].to(self.bounder.device), self.l2_radii[rows]

    def decide(self, row: int, verdict: str, method: str) -> None:
        self.verdict[row], self.method[row] = verdict, method
        self.open_[row] = False


def certify_batch(module: nn.Module, bounder: MarginBounder, x: torch.Tensor, labels: torch.Tensor,
                  box: tuple[torch.Tensor, torch.Tensor], indices: list[int], options: CascadeOptions,
                  *, seed: int | None = None, file_outputs: FileOutputs | None = None,
                  l2_radii: torch.Tensor | None = None) -> list[Verdict]:
    """Run the cascade on one batch of samples, each with its own box [x_lower, x_upper].

    With `l2_radii` (float64, one per sample) each sample's region is its l2 ball of that radius
    around x intersected with its box (give the box the ball's bounding box clipped to the input
    range): the attack is PGD-l2 there, the bounds hold on the whole ball.

    `seed` seeds the attack's random restarts (default `options.seed`); the engine derives it from
    the batch's position so that a run repeats exactly however its batches are spread over ranks.
    With `file_outputs` every counterexample (the clean image included) is confirmed on the ONNX
    file by onnxruntime before the sample is reported falsified.
    """
    started = time.perf_counter()
    n = x.shape[0]
    if n == 0:
        return []
    batch = _SampleBatch(module, bounder, x, labels, box, options, options.seed if seed is None else seed,
                         file_outputs, l2_radii)
    stage_table.run_stages(cascade_stages(options), batch)
    overhead = (time.perf_counter() - started - batch.cost.sum().item()) / n
    out = []
    for i in range(n):
        bound = batch.best[i].min().item()
        out.append(Verdict(indices[i], int(labels[i]), int(batch.predictions[i]), batch.verdict[i], batch.method[i],
                           bound if bound > -float("inf") else None, round(batch.cost[i].item() + overhead, 6),
                           bab=batch.bab[i]))
    return out
