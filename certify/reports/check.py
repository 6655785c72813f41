"""Re-check a certificate against a model file: does the report still hold for this file?

A deployment pipeline receives a model file and the report `certify --json` wrote for it, and
should not have to trust either. The check, cheapest first, stops at the first part that fails:
1. the file's sha256 is the one the report certifies;
2. the report agrees with itself: its counts are those of its per-sample records, the records of
   one sample agree across eps (verified at e implies verified below e, falsified at e falsified
   above it), a verified sample has a positive margin bound and a correct prediction;
3. the spec is re-read: the model's input shape and in-graph normalization are the recorded ones,
   the data holds every recorded sample with the recorded label, and onnxruntime on the file
   predicts what the report says for every sample (so every "misclassified" verdict is re-checked);
4. a random sample of the verified verdicts (all of them with `every`) is recomputed by the same
   cascade, up to the recorded bound method, on the recorded box; and a sample of the
   counterexamples is searched for again with the recorded attack and confirmed by onnxruntime.
A recomputed verdict that does not come out as recorded means the certificate does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from certify.common.errors import UserError
from certify.common.files import sha256_file
from certify.common.progress import say
from certify.data.datasets import load_dataset
from certify.onnx_import.certifiable import load_certifiable
from certify.reports.certificate import Certificate, Claim, read_certificate
from certify.specs.input_spec import InputSpec, check_norm, check_normalization
from certify.verdicts.cascade import (FALSIFIED, UNKNOWN, VERIFIED,
                                      CascadeOptions, certify_batch)
from certify.verdicts.dataset import graph_normalization
from certify.verdicts.file_outputs import certified_module

# A counterexample is searched for again with the recorded attack and this many restarts more:
# the search is random, and the report's own run may have drawn luckier starts.
EXTRA_RESTARTS = 2
CLEAN = "clean"  # the method of a sample misclassified as it is


@dataclass
class CheckResult:
    model_path: Path
    checked: list[str] = field(default_factory=list)  # what was checked and held, for people
    failures: list[str] = field(default_factory=list)  # what does not hold

    @property
    def holds(self) -> bool:
        return not self.failures


def check_certificate(report: str | Path, *, model: str | Path | None = None, sample: int = 20,
                      every: bool = False, seed: int = 0, batch_size: int = 50, quiet: bool = False) -> CheckResult:
    """Whether the certificate `report` holds for the model file (default: the one it names)."""
    if not every and sample < 0:
        raise UserError(f"--sample {sample} is negative", "give the number of verdicts to recompute, e.g. --sample 20")
    if batch_size <= 0:
        raise UserError(f"batch size {batch_size} is not positive", "give e.g. 50")
    certificate = read_certificate(report)
    result = CheckResult(_model_path(certificate, model))
    digest = sha256_file(result.model_path)
    if digest != certificate.sha256:
        result.failures.append(f"{result.model_path} has sha256 {digest}, the certificate is for {certificate.sha256}")
        return result
    result.checked.append(f"sha256 {digest} is the certified file's")
    _check_consistency(certificate, result)
    if not result.holds:
        return result
    torch.manual_seed(seed)
    recheck = _Recheck(certificate, result, batch_size, seed)
    if result.holds:
        recheck.verdicts(_pick(_proofs(certificate), sample, every, seed), attack=False, what="verified verdicts")
    if result.holds:
        recheck.verdicts(_pick(_counterexamples(certificate), sample, every, seed + 1), attack=True,
                         what="counterexamples")
    if result.holds and certificate.radius:
        result.checked.append("the per-sample radii (--radius) were not re-checked")
    say("\n".join(result.checked), quiet=quiet)
    return result


def _model_path(certificate: Certificate, model: str | Path | None) -> Path:
    """--model, or the file the report names: as given (relative to here), else next to the report."""
    if model is not None:
        candidates = [Path(model)]
    else:
        named = Path(certificate.model_path)
        candidates = [named] if named.is_absolute() else [named, certificate.path.parent / named]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"model file {candidates[0]} does not exist", "give the certified file with --model model.onnx")


def _check_consistency(certificate: Certificate, result: CheckResult) -> None:
    first = certificate.claims[0]
    indices = [claim.index for claim in first]
    if len(set(indices)) != len(indices):
        result.failures.append("the report lists a sample twice")
        return
    if not indices:
        result.failures.append("the report certifies no samples")
        return
    by_sample = {claim.index: [] for claim in first}
    eps_values = certificate.eps
    if len(set(eps_values)) != len(eps_values):
        result.failures.append("the report lists an eps twice")
        return
    for eps, summary, claims in zip(eps_values, certificate.summaries, certificate.claims):
        _check_counts(eps, summary, claims, result)
        if [c.index for c in claims] != indices:
            result.failures.append(f"at eps {eps:g} the report lists other samples than at eps {eps_values[0]:g}")
            return
        for claim in claims:
            by_sample[claim.index].append(claim)
    for index, claims in by_sample.items():
        problem = _sample_problem(sorted(claims, key=lambda c: c.eps), set(eps_values))
        if problem:
            result.failures.append(f"sample {index}: {problem}")
    if result.holds:
        result.checked.append(f"the report agrees with itself ({len(indices)} samples at {len(eps_values)} eps)")


def _check_counts(eps: float, summary: dict, claims: list[Claim], result: CheckResult) -> None:
    """The summary of one eps is what its per-sample records add up to."""
    n = len(claims)
    counts = {verdict: sum(c.verdict == verdict for c in claims) for verdict in (VERIFIED, FALSIFIED, UNKNOWN)}
    verified_by: dict[str, int] = {}
    for claim in claims:
        if claim.verdict == VERIFIED:
            verified_by[claim.method] = verified_by.get(claim.method, 0) + 1
    expected = {"samples": n, **counts, "verified_by": verified_by}
    fractions = {"certified_accuracy": counts[VERIFIED] / n, "attacked_accuracy": (n - counts[FALSIFIED]) / n,
                 "clean_accuracy": sum(c.method != CLEAN for c in claims) / n}
    wrong = [key for key, value in expected.items() if summary.get(key) != value]
    wrong += [key for key, value in fractions.items()
              if not (isinstance(summary.get(key), (int, float)) and math.isclose(summary[key], value))]
    if wrong:
        key = wrong[0]
        stated = {**expected, **fractions}[key]
        result.failures.append(f"at eps {eps:g} the report states {key} {summary.get(key)!r}, its per-sample records "
                               f"add up to {stated!r}")


def _sample_problem(claims: list[Claim], eps_values: set[float]) -> str | None:
    """What is contradictory in one sample's records (ascending eps), or None."""
    first = claims[0]
    for claim in claims:
        if (claim.label, claim.prediction) != (first.label, first.prediction):
            return "its label or prediction differs between eps"
        if claim.verdict == VERIFIED and (claim.prediction != claim.label or claim.margin_lower_bound is None
                                          or claim.margin_lower_bound <= 0):
            return f"verified at eps {claim.eps:g} without a correct prediction and a positive margin bound"
        if claim.method == CLEAN and (claim.verdict != FALSIFIED or claim.prediction == claim.label):
            return f"at eps {claim.eps:g} it is called misclassified, but its prediction is its label"
        if claim.reused_from is not None:
            source = next((c for c in claims if c.eps == claim.reused_from), None)
            wrong_way = claim.reused_from <= claim.eps if claim.verdict == VERIFIED else claim.reused_from >= claim.eps
            if source is None or source.verdict != claim.verdict or wrong_way or claim.reused_from not in eps_values:
                return f"its verdict at eps {claim.eps:g} is reused from eps {claim.reused_from:g}, which does not imply it"
    for low in claims:
        for high in claims:
            if low.eps < high.eps and low.verdict == FALSIFIED and high.verdict == VERIFIED:
                return f"falsified at eps {low.eps:g} but verified at the larger eps {high.eps:g}"
    return None


def _proofs(certificate: Certificate) -> list[Claim]:
    """The verified verdicts, each proof once (a reused verdict was proved at the eps it names)."""
    return _decided(certificate, lambda claim: claim.verdict == VERIFIED)


def _counterexamples(certificate: Certificate) -> list[Claim]:
    """The falsified verdicts found by a search (misclassified samples are checked with the predictions)."""
    return _decided(certificate, lambda claim: claim.verdict == FALSIFIED and claim.method != CLEAN)


def _decided(certificate: Certificate, wanted) -> list[Claim]:
    seen, out = set(), []
    for claims in certificate.claims:
        for claim in claims:
            key = (claim.index, claim.decided_at)
            if wanted(claim) and key not in seen:
                seen.add(key)
                out.append(claim)
    return out


def _pick(claims: list[Claim], sample: int, every: bool, seed: int) -> list[Claim]:
    if every or len(claims) <= sample:
        return claims
    order = torch.randperm(len(claims), generator=torch.Generator().manual_seed(seed))[:sample]
    return [claims[i] for i in sorted(order.tolist())]


class _Recheck:
    """The model, spec and data the report names, loaded once and checked against it (step 3);
    `verdicts` then recomputes chosen claims (step 4)."""

    def __init__(self, certificate: Certificate, result: CheckResult, batch_size: int, seed: int):
        self.certificate, self.result, self.batch_size, self.seed = certificate, result, batch_size, seed
        spec = certificate.spec
        self.model = load_certifiable(result.model_path)
        self.spec = InputSpec(input_range=spec["input_range"], mean=spec["mean"], std=spec["std"],
                              norm=check_norm(spec["norm"]), classes=list(spec["classes"]), dataset=spec["dataset"])
        check_normalization(self.spec.mean, self.spec.std, tuple(self.model.input_shape), source="the report's spec")
        self._check_model()
        self.data = load_dataset(spec["dataset"], split=spec["split"])
        if result.holds:
            self._check_samples()
        self.module, self.bounder, self.file_outputs = certified_module(result.model_path, self.model, self.spec,
                                                                        torch.device("cpu"))
        if result.holds:
            self._check_predictions()

    def _check_model(self) -> None:
        recorded, shape = self.certificate.input_shape, tuple(self.model.input_shape)
        if recorded != shape:
            self.result.failures.append(f"the model takes inputs of shape {list(shape)}, the report {list(recorded)}")
        in_graph = graph_normalization(self.result.model_path)
        if in_graph != list(self.certificate.graph_normalization):
            self.result.failures.append(f"the graph starts with {in_graph}, the report says "
                                        f"{self.certificate.graph_normalization}")

    def _check_samples(self) -> None:
        claims = self.certificate.claims[0]
        top = max(claim.index for claim in claims)
        if top >= len(self.data):
            self.result.failures.append(f"the report has sample {top}, {self.certificate.spec['dataset']} "
                                        f"({self.certificate.spec['split']}) has {len(self.data)}")
            return
        labels = self.data.y[[claim.index for claim in claims]].tolist()
        wrong = [(claim, label) for claim, label in zip(claims, labels) if claim.label != label]
        if wrong:
            claim, label = wrong[0]
            self.result.failures.append(f"sample {claim.index} has label {label} in the data, {claim.label} in the report"
                                        f" ({len(wrong)} such samples)")
        elif self.data.x[0].numel() != math.prod(self.model.input_shape):
            self.result.failures.append(f"the data's samples have shape {tuple(self.data.x.shape[1:])}, the model's "
                                        f"{tuple(self.model.input_shape)}")
        else:
            self.result.checked.append(f"the spec was re-read: {len(claims)} samples of {self.certificate.spec['dataset']}"
                                       f" ({self.certificate.spec['split']}) with the recorded labels")

    def _inputs(self, indices: list[int]) -> torch.Tensor:
        return self.data.x[indices].reshape(-1, *self.model.input_shape)

    def _check_predictions(self) -> None:
        claims = self.certificate.claims[0]
        predictions = []
        for start in range(0, len(claims), 1000):
            chunk = [claim.index for claim in claims[start:start + 1000]]
            predictions += self.file_outputs.logits(self._inputs(chunk)).argmax(1).tolist()
        wrong = [(c, p) for c, p in zip(claims, predictions) if c.prediction != p]
        if wrong:
            claim, predicted = wrong[0]
            self.result.failures.append(f"sample {claim.index}: onnxruntime predicts {predicted} on the file, the report "
                                        f"{claim.prediction} ({len(wrong)} such samples)")
        else:
            misclassified = sum(c.prediction != c.label for c in claims)
            self.result.checked.append(f"onnxruntime predicts on the file what the report says for all {len(claims)} "
                                       f"samples ({misclassified} misclassified)")

    def verdicts(self, claims: list[Claim], *, attack: bool, what: str) -> None:
        """Recompute `claims` by the cascade: bounds up to the recorded method, or the attack."""
        attack_spec = self.certificate.spec["attack"]
        if attack and claims and not attack_spec["enabled"] and any(c.method == "pgd" for c in claims):
            self.result.failures.append("the report has counterexamples found by the attack, but says the attack was off")
            return
        groups: dict[tuple[float, str | None], list[Claim]] = {}
        for claim in claims:
            groups.setdefault((claim.decided_at, claim.method), []).append(claim)
        for (eps, method), group in groups.items():
            options = CascadeOptions(methods=self._methods_up_to(method), attack=attack,
                                     attack_steps=attack_spec["steps"],
                                     attack_restarts=attack_spec["restarts"] + EXTRA_RESTARTS, seed=self.seed)
            for start in range(0, len(group), self.batch_size):
                self._recompute(group[start:start + self.batch_size], eps, options, VERIFIED if not attack else FALSIFIED)
                if not self.result.holds:
                    return
        total = len(self._all(attack))
        self.result.checked.append(f"{len(claims)} of {total} {what} recomputed: all as recorded")

    def _all(self, attack: bool) -> list[Claim]:
        return _counterexamples(self.certificate) if attack else _proofs(self.certificate)

    def _methods_up_to(self, method: str | None) -> tuple[str, ...]:
        """The recorded cascade's bound methods up to `method` (none for the attack; all for an unknown name)."""
        methods = self.certificate.spec["methods"]
        if method == "pgd":
            return ()
        return methods[:methods.index(method) + 1] if method in methods else methods

    def _recompute(self, claims: list[Claim], eps: float, options: CascadeOptions, expected: str) -> None:
        indices = [claim.index for claim in claims]
        x = self._inputs(indices)
        y = torch.tensor([claim.label for claim in claims])
        l2_radii = torch.full((len(claims),), eps, dtype=torch.float64) if self.spec.norm == "2" else None
        verdicts = certify_batch(self.module, self.bounder, x, y, self.spec.box(x, eps), indices, options,
                                 file_outputs=self.file_outputs, l2_radii=l2_radii)
        for claim, verdict in zip(claims, verdicts):
            if verdict.verdict != expected:
                found = "no counterexample was found again" if expected == FALSIFIED else \
                    f"the recomputed margin bound is {verdict.margin_lower_bound}"
                self.result.failures.append(f"sample {claim.index} at eps {eps:g}: the report says {claim.verdict} by "
                                            f"{claim.method}, but {found} ({verdict.verdict} by {verdict.method})")
