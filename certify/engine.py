"""Certify a model file on a dataset: load, build the spec, run the cascade per eps, make the report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from certify.bounds import METHODS, MarginBounder
from certify.data import load_dataset
from certify.errors import UserError
from certify.files import sha256_file
from certify.model import load_certifiable
from certify.progress import progress_bar, say
from certify.spec import InputSpec, spec_from_metadata, with_normalization
from certify.verdict import FALSIFIED, VERIFIED, CascadeOptions, Verdict, certify_batch


@dataclass
class EpsResult:
    eps: float
    samples: list[Verdict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        n = max(len(self.samples), 1)
        clean = sum(1 for s in self.samples if s.method != "clean")
        falsified = sum(1 for s in self.samples if s.verdict == FALSIFIED)
        verified = sum(1 for s in self.samples if s.verdict == VERIFIED)
        by_method = {}
        for s in self.samples:
            if s.verdict == VERIFIED:
                by_method[s.method] = by_method.get(s.method, 0) + 1
        return {"eps": self.eps, "samples": len(self.samples), "clean_accuracy": clean / n,
                "attacked_accuracy": (len(self.samples) - falsified) / n, "certified_accuracy": verified / n,
                "verified": verified, "falsified": falsified,
                "unknown": len(self.samples) - verified - falsified, "verified_by": by_method,
                "seconds": round(self.seconds, 3)}


@dataclass
class CertifyRun:
    model_path: str
    model_sha256: str
    input_shape: tuple[int, ...]
    spec: InputSpec
    dataset: str
    split: str
    options: CascadeOptions
    results: list[EpsResult]


def resolve_spec(metadata: dict[str, str], *, data: str | None, mean, std) -> tuple[InputSpec, str]:
    spec = spec_from_metadata(metadata)
    if spec is None:
        if data is None:
            raise UserError("this model has no certification metadata (it was not exported by harden)",
                            "say which data to certify on with --data mnist|fashion-mnist|file.npz|folder "
                            "(and --mean/--std if the model expects normalized inputs)")
        spec = InputSpec(dataset=data)
    if mean is not None:
        spec.mean = list(mean)
    if std is not None:
        spec.std = list(std)
    dataset = data or spec.dataset
    if dataset is None:
        raise UserError("the model's metadata names no dataset", "give --data")
    return spec, dataset


def certify_model(model_path: str | Path, eps_values: list[float], *, data: str | None = None,
                  split: str = "test", limit: int | None = None, methods: tuple[str, ...] = METHODS,
                  attack: bool = True, batch_size: int = 50, device: str | None = None,
                  mean: list[float] | None = None, std: list[float] | None = None, seed: int = 0,
                  quiet: bool = False) -> CertifyRun:
    model_path = Path(model_path)
    model = load_certifiable(model_path)
    spec, dataset_name = resolve_spec(model.metadata, data=data, mean=mean, std=std)
    if not eps_values:
        raise UserError("no --eps given", "give at least one --eps, e.g. --eps 0.1")
    for eps in eps_values:
        spec.check_eps(eps)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --method {', '.join(unknown) or '(none)'}", f"use one of {', '.join(METHODS)}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit {limit} is not positive", "give a positive number of samples")
    dataset = load_dataset(dataset_name, split=split, log=None if quiet else say).subset(limit)
    if tuple(dataset.x.shape[1:]) != tuple(model.input_shape):
        if dataset.x[0].numel() != int(torch.tensor(model.input_shape).prod()):
            raise UserError(f"the data has samples of shape {tuple(dataset.x.shape[1:])}, the model expects "
                            f"{tuple(model.input_shape)}", "certify the model on the data it was trained for")
    dev = torch.device(device) if device not in (None, "auto") else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    module = with_normalization(model.module, spec, tuple(model.input_shape)).to(dev)
    bounder = MarginBounder(module, tuple(model.input_shape), device=dev)
    options = CascadeOptions(methods=tuple(methods), attack=attack, seed=seed)

    results: list[EpsResult] = []
    falsified_before = torch.zeros(len(dataset), dtype=torch.bool)
    with progress_bar(quiet=quiet) as bar:
        for eps in sorted(eps_values):
            result = EpsResult(eps)
            task = bar.add_task(f"eps {eps:g}", total=len(dataset), status="")
            started = time.perf_counter()
            for start in range(0, len(dataset), batch_size):
                stop = min(start + batch_size, len(dataset))
                x = dataset.x[start:stop].reshape(-1, *model.input_shape)
                y = dataset.y[start:stop]
                box = spec.box(x, eps)
                verdicts = certify_batch(module, bounder, x, y, box, list(range(start, stop)), options,
                                         already_falsified=falsified_before[start:stop])
                for v in verdicts:
                    if v.verdict == FALSIFIED:
                        falsified_before[v.index] = True  # falsified at eps => falsified at every larger eps
                result.samples.extend(verdicts)
                verified = sum(v.verdict == VERIFIED for v in result.samples)
                bar.update(task, advance=stop - start, status=f"verified {verified}/{len(result.samples)}")
            result.seconds = time.perf_counter() - started
            results.append(result)
    return CertifyRun(str(model_path), sha256_file(model_path), tuple(model.input_shape), spec, dataset.name,
                      split, options, results)
