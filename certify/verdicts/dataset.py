"""Certify a model file on a dataset: load, build the spec, run the cascade per eps, make the run record.

The data is streamed batch by batch; per sample only small verdict records are kept (no bounds,
no adversarial images), so memory stays flat on large test sets. Within a batch the eps values
are visited in bisection order (middle first, then the middles of each half, ...) so that both
reuse rules cut work: falsified at e => falsified at every larger eps (the adversarial point lies
in the larger box too), verified at e => verified at every smaller eps (the smaller box lies in
the larger one, so its bound holds there). Under torchrun the batches are spread over the ranks
(certify.common.distributed) and rank 0 merges the records.

Input normalization: every box is stated in PIXEL space and clipped to the model's input range.
A normalization the model expects from outside (--mean/--std, or recorded by `harden export`) is
put in front of the imported module; a normalization inside the ONNX graph (Sub/Div by constants
at its start) is already part of the imported module, so the pixel box is right as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from certify.bounds.bounder import METHODS
from certify.common import distributed
from certify.common.errors import UserError
from certify.common.files import sha256_file
from certify.common.progress import progress_bar, say
from certify.common.seeds import stream_seed
from certify.data.datasets import load_dataset
from certify.onnx_import.certifiable import load_certifiable
from certify.specs.input_spec import InputSpec, check_norm, spec_from_metadata
from certify.verdicts.cascade import (FALSIFIED, UNKNOWN, VERIFIED,
                                      CascadeOptions, Verdict, certify_batch,
                                      check_bab_options)
from certify.verdicts.file_outputs import (FileOutputs, certified_module,
                                          warn_if_lipschitz_refused)
from certify.verdicts.radius import RadiusRecord, bisect_radius, radius_summary
from certify.verdicts.run_checks import (check_against_model, check_data_fits,
                                         check_run_options)

_NORMALIZING_OPS = ("Sub", "Div", "Mul", "Add")


@dataclass
class EpsResult:
    eps: float
    samples: list[Verdict] = field(default_factory=list)
    seconds: float = 0.0  # time spent certifying at this eps (summed over ranks)

    def summary(self) -> dict:
        n = max(len(self.samples), 1)
        clean = sum(1 for s in self.samples if s.method != "clean")
        falsified = sum(1 for s in self.samples if s.verdict == FALSIFIED)
        verified = sum(1 for s in self.samples if s.verdict == VERIFIED)
        by_method: dict[str, int] = {}
        for s in self.samples:
            if s.verdict == VERIFIED:
                by_method[s.method] = by_method.get(s.method, 0) + 1
        return {"eps": self.eps, "samples": len(self.samples), "clean_accuracy": clean / n,
                "attacked_accuracy": (len(self.samples) - falsified) / n, "certified_accuracy": verified / n,
                "verified": verified, "falsified": falsified,
                "unknown": len(self.samples) - verified - falsified, "verified_by": by_method,
                "reused": sum(1 for s in self.samples if s.reused_from is not None),
                "seconds": round(self.seconds, 3)}


@dataclass
class RadiusResult:
    tolerance: float
    maximum: float
    samples: list[RadiusRecord] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {**radius_summary(self.samples, self.tolerance), "max_eps_searched": self.maximum,
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
    radius: RadiusResult | None = None
    graph_normalization: list[str] = field(default_factory=list)
    world_size: int = 1
    batch_size: int = 50
    device: str = "cpu"
    seconds: float = 0.0  # wall time of the whole run
    # The Lipschitz stage's per-layer constants and how each was bounded (exact SVD or Gram iteration),
    # or why the model was refused; None when the stage was not asked for.
    lipschitz: dict | None = None


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


def graph_normalization(path: str | Path) -> list[str]:
    """The element-wise ops by constants that the ONNX graph applies to its input first, in order
    (e.g. ["Sub", "Div"] for a graph that normalizes its pixels itself); [] when there are none."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        return []
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ops, current = [], inputs[0]
    while len(consumers.get(current, [])) == 1:
        node = consumers[current][0]
        others = [name for name in node.input if name != current]
        if node.op_type not in _NORMALIZING_OPS or len(others) != 1 or others[0] not in constants:
            break
        ops.append(node.op_type)
        current = node.output[0]
    return ops


def bisection_order(values: list[float]) -> list[int]:
    """Indices of sorted `values` middle first, then the middles of the halves, level by level."""
    order, queue = [], [(0, len(values) - 1)]
    while queue:
        low, high = queue.pop(0)
        if low > high:
            continue
        mid = (low + high) // 2
        order.append(mid)
        queue += [(low, mid - 1), (mid + 1, high)]
    return order


def batch_seed(seed: int, batch_number: int, step: int) -> int:
    # A function of the batch's position, not of the rank that runs it: sharded runs repeat exactly.
    return stream_seed(seed, batch_number, step)


def certify_model(model_path: str | Path, eps_values: list[float], *, data: str | None = None,
                  split: str = "test", limit: int | None = None, methods: tuple[str, ...] = METHODS,
                  attack: bool = True, batch_size: int = 50, device: str | None = None,
                  mean: list[float] | None = None, std: list[float] | None = None, seed: int = 0,
                  quiet: bool = False, radius: bool = False, radius_tol: float = 1e-3,
                  radius_max: float | None = None, attack_steps: int = 50,
                  attack_restarts: int = 3, norm: str = "inf",
                  radius_budget: float | None = None, timeout: float | None = None,
                  max_domains: int = 200_000, branching: str = "babsr") -> CertifyRun | None:
    """Certify the model at every eps (and, with `radius`, bisect each sample's certified radius).

    Under torchrun every rank calls this; rank 0 returns the merged run, the others None.
    Every input is checked (options, model, spec, data) before the first sample is certified.
    `radius_budget` caps the seconds of radius bisection per sample (None: no cap). With "bab" among
    the methods, `timeout` caps its seconds per sample and eps, `max_domains` its domains.
    """
    started = time.perf_counter()
    eps_values = sorted(set(float(e) for e in eps_values))
    check_run_options(eps_values, methods=methods, limit=limit, batch_size=batch_size, split=split, radius=radius,
                      radius_tol=radius_tol, radius_max=radius_max, attack_steps=attack_steps,
                      attack_restarts=attack_restarts, mean=mean, std=std, device=device, seed=seed, norm=norm)
    check_bab_options(timeout, max_domains, branching)
    if radius_budget is not None and not (radius_budget > 0 and radius_budget != float("inf")):
        raise UserError(f"--radius-budget {radius_budget} is out of range", "give seconds per sample, e.g. 5")
    model_path = Path(model_path)
    model = load_certifiable(model_path)
    model_sha256 = sha256_file(model_path)
    spec, dataset_name = resolve_spec(model.metadata, data=data, mean=mean, std=std)
    spec.norm = check_norm(norm)
    check_against_model(eps_values, spec, model, radius, radius_tol, radius_max,
                         "--mean/--std" if mean is not None or std is not None else "the metadata 'harden.data'")
    in_graph = graph_normalization(model_path)
    dataset = load_dataset(dataset_name, split=split, log=None if quiet else say).subset(limit)
    check_data_fits(dataset, model, dataset_name)
    shard = distributed.start(torch.device(distributed.device_kind(device)))
    dev = distributed.device_for(shard, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    quiet = quiet or not shard.is_main
    if in_graph and (spec.mean is not None or spec.std is not None):
        say(f"warning: the graph already starts with {'/'.join(in_graph)} by constants (a normalization?); "
            "--mean/--std are applied in front of it as well", quiet=quiet)
    torch.manual_seed(seed)
    module, bounder, file_outputs = certified_module(model_path, model, spec, dev)
    warn_if_lipschitz_refused(bounder, methods, "this model", quiet=quiet)
    options = CascadeOptions(methods=tuple(methods), attack=attack, attack_steps=attack_steps,
                             attack_restarts=attack_restarts, seed=seed, timeout=timeout, max_domains=max_domains,
                             branching=branching)
    radius_high = radius_max if radius_max is not None else spec.largest_eps(tuple(model.input_shape))

    results = [EpsResult(eps) for eps in eps_values]
    radius_result = RadiusResult(radius_tol, radius_high) if radius else None
    order = bisection_order(eps_values)
    batches = [b for b in range(-(-len(dataset) // batch_size)) if shard.owns_batch(b)]
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("certify", total=sum(min(batch_size, len(dataset) - b * batch_size) for b in batches),
                            status="")
        for batch_number in batches:
            start = batch_number * batch_size
            stop = min(start + batch_size, len(dataset))
            x = dataset.x[start:stop].reshape(-1, *model.input_shape)
            y = dataset.y[start:stop]
            indices = list(range(start, stop))
            # The certificate names the file's sha256: every batch it covers is checked on the file.
            file_outputs.check(module, x)
            verdicts = _certify_eps_batch(module, bounder, spec, x, y, indices, eps_values, order, options,
                                          results, batch_number, file_outputs)
            if radius_result is not None:
                t0 = time.perf_counter()
                radius_result.samples += _radius_batch(module, bounder, spec, x, y, indices, eps_values,
                                                       verdicts, options, radius_tol, radius_high, batch_number,
                                                       file_outputs, budget=radius_budget,
                                                       progress=lambda line: bar.update(task, status=line))
                radius_result.seconds += time.perf_counter() - t0
            bar.update(task, advance=stop - start, status=_progress_status(results, radius_result))

    merged = _merge(shard, results, radius_result)
    if shard.world_size > 1:
        distributed.finish(shard)
    if merged is None:
        return None
    results, radius_result = merged
    return CertifyRun(str(model_path), model_sha256, tuple(model.input_shape), spec, dataset.name,
                      split, options, results, radius_result, in_graph, shard.world_size, batch_size, str(dev),
                      time.perf_counter() - started,
                      bounder.lipschitz.to_json() if "lipschitz" in options.methods else None)


def _certify_eps_batch(module, bounder, spec: InputSpec, x, y, indices, eps_values, order, options,
                       results: list[EpsResult], batch_number: int,
                       file_outputs: FileOutputs | None = None) -> list[list[Verdict]]:
    """All eps for one batch, with reuse; returns the verdicts per eps (ascending), per sample."""
    n = len(indices)
    per_eps: list[list[Verdict | None]] = [[None] * n for _ in eps_values]
    for step, k in enumerate(order):
        eps = eps_values[k]
        open_rows = []
        for i in range(n):
            known = _implied(per_eps, eps_values, k, i)
            if known is not None:
                per_eps[k][i] = known
            else:
                open_rows.append(i)
        if open_rows:
            rows = torch.tensor(open_rows)
            xs = x[rows]
            t0 = time.perf_counter()
            l2_radii = torch.full((len(open_rows),), eps, dtype=torch.float64) if spec.norm == "2" else None
            verdicts = certify_batch(module, bounder, xs, y[rows], spec.box(xs, eps),
                                     [indices[i] for i in open_rows], options,
                                     seed=batch_seed(options.seed, batch_number, step), file_outputs=file_outputs,
                                     l2_radii=l2_radii)
            results[k].seconds += time.perf_counter() - t0
            for i, verdict in zip(open_rows, verdicts):
                per_eps[k][i] = verdict
    # A bound need not shrink monotonically with the box, so a sample can stay unknown at e after a
    # later visit verified it at a larger eps: carry every verdict to where it is implied.
    for k in range(len(eps_values)):
        for i in range(n):
            if per_eps[k][i].verdict == UNKNOWN:
                known = _implied(per_eps, eps_values, k, i)
                if known is not None:
                    per_eps[k][i] = known
    for k, result in enumerate(results):
        result.samples.extend(per_eps[k])
    return per_eps


def _implied(per_eps, eps_values, k: int, i: int) -> Verdict | None:
    """The verdict at eps_values[k] implied by a decided one at another eps, if any."""
    for j in range(k):  # falsified at a smaller eps
        v = per_eps[j][i]
        if v is not None and v.verdict == FALSIFIED:
            return v.reused_at(eps_values[j])
    for j in range(len(eps_values) - 1, k, -1):  # verified at a larger eps
        v = per_eps[j][i]
        if v is not None and v.verdict == VERIFIED:
            return v.reused_at(eps_values[j])
    return None


def _radius_batch(module, bounder, spec, x, y, indices, eps_values, per_eps, options, tolerance, high,
                  batch_number, file_outputs: FileOutputs | None = None, *, budget: float | None = None,
                  progress=None) -> list[RadiusRecord]:
    """Bisect this batch's radii, starting from what the --eps verdicts already say."""
    n = len(indices)
    lower = torch.zeros(n, dtype=torch.float64)
    upper = torch.full((n,), float(high), dtype=torch.float64)
    attack_upper = torch.full((n,), float("inf"), dtype=torch.float64)
    method: list[str | None] = [None] * n
    for k, eps in enumerate(eps_values):
        for i in range(n):
            v = per_eps[k][i]
            if v.verdict == VERIFIED and eps > lower[i]:
                lower[i], method[i] = eps, v.method
    for k, eps in enumerate(eps_values):
        for i in range(n):
            v = per_eps[k][i]
            if v.verdict != VERIFIED and lower[i] < eps < upper[i]:
                upper[i] = eps
            if v.verdict == FALSIFIED and eps < attack_upper[i]:
                attack_upper[i] = eps
    upper = torch.maximum(upper, lower)
    return bisect_radius(module, bounder, spec, x, y, indices, options, tolerance=tolerance, lower=lower,
                         upper=upper, attack_upper=attack_upper,
                         seed=batch_seed(options.seed, batch_number, len(eps_values)), verified_method=method,
                         file_outputs=file_outputs, budget=budget, progress=progress)


def _progress_status(results: list[EpsResult], radius: RadiusResult | None) -> str:
    parts = [f"eps {r.eps:g}: {sum(s.verdict == VERIFIED for s in r.samples)}/{len(r.samples)}" for r in results[:4]]
    if radius is not None and radius.samples:
        parts.append(f"mean radius {radius_summary(radius.samples, radius.tolerance)['mean']:.4f}")
    return "verified " + ", ".join(parts) if parts else ""


def _merge(shard: distributed.Shard, results: list[EpsResult], radius: RadiusResult | None):
    """Rank 0: every rank's records in sample order; other ranks: None."""
    if shard.world_size == 1:
        return results, radius
    payload = ([(r.samples, r.seconds) for r in results],
               None if radius is None else (radius.samples, radius.seconds))
    gathered = distributed.gather(shard, payload)
    if gathered is None:
        return None
    merged = []
    for k, result in enumerate(results):
        samples = [s for part in gathered for s in part[0][k][0]]
        merged.append(EpsResult(result.eps, sorted(samples, key=lambda s: s.index),
                                sum(part[0][k][1] for part in gathered)))
    merged_radius = None
    if radius is not None:
        records = [r for part in gathered for r in part[1][0]]
        merged_radius = RadiusResult(radius.tolerance, radius.maximum, sorted(records, key=lambda r: r.index),
                                     sum(part[1][1] for part in gathered))
    return merged, merged_radius
