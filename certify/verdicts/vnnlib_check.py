"""Check VNN-LIB properties on ONNX models: unsat (verified) / sat (with a counterexample) / unknown.

A property is an input box and a counterexample region over the outputs: an OR of disjuncts, each
an AND of rows `C y <= d` (certify.specs.vnnlib). Per property, cheapest first:

- sat: a PGD search inside the box (first from its centre, then from random points) minimizes
  f(x) = min over disjuncts of max over rows of (C y(x) - d), which is <= 0 exactly on a
  counterexample; a hit is re-run with onnxruntime on the ONNX file itself and counts only if the
  onnxruntime output lies in the region and the point in the box.
- unsat: the region is empty over the box when EVERY disjunct has SOME row with C y - d > 0 for
  all x in the box; we bound all rows at once by handing auto_LiRPA the stacked rows as its
  specification matrix C (IBP -> CROWN -> alpha-CROWN, keeping the best bound of each row). The
  certificate is min_k max_r (lower(C_kr y) - d_kr) > 0, for robustness properties exactly the
  usual margin lower bound.
- unknown otherwise.

The box is the file's, in the model's own input space and order (X_i row-major over the ONNX
input, reshaped to its shape); it is not clipped to any range, since it IS the specification
(VNN-COMP boxes come already clipped). The float64 box is rounded outward to float32 for the
bounds (the certificate covers the whole box) and inward for the attack (every point tried is
in the box). Properties of one model are checked in batches.

Under torchrun the batches are dealt out to the ranks (batch b of the run to rank b mod N, as in
certify.common.distributed); rank 0 gathers the results, writes the report, and the others return None.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from certify.bounds.bounder import METHODS, MarginBounder
from certify.common import distributed
from certify.common.errors import UserError
from certify.common.files import sha256_file
from certify.common.progress import progress_bar, say
from certify.common.seeds import stream_seed
from certify.onnx_import.certifiable import CertifiableModel, load_certifiable
from certify.specs.input_spec import InputSpec, check_normalization
from certify.specs.rounding import inward_box, outward_box
from certify.specs.vnnlib import (VnnlibProperty, find_properties,
                                  parse_vnnlib, read_instances,
                                  write_counterexample)
from certify.verdicts.cascade import (CASCADE_METHODS, CascadeOptions,
                                      cascade_stages, check_bab_options,
                                      lower_bounds)
from certify.verdicts.file_outputs import (FileOutputs, certified_module,
                                          warn_if_lipschitz_refused)
from certify.verdicts.regions import Region, find_in_region
from certify.verdicts.stages import run_stages
from certify.verdicts.vnnlib_bab import branch_and_bound, instance_timeouts

SAT, UNSAT, UNKNOWN = "sat", "unsat", "unknown"
_VERDICT_OF = {UNSAT: "verified", SAT: "falsified", UNKNOWN: "unknown"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class PropertyResult:
    onnx: str
    vnnlib: str
    result: str                 # unsat / sat / unknown
    method: str | None          # pgd (sat), ibp / crown / alpha-crown (unsat), None (unknown)
    bound: float | None         # min_k max_r lower(C_kr y) - d_kr over the box; > 0 proves unsat
    seconds: float
    counterexample: str | None = None  # where the counterexample was written (sat only)
    vnnlib_sha256: str | None = None  # of the property file as it was parsed
    bab: dict | None = None     # what branch and bound did (certify.bab.search.SearchSummary), if it ran
    x: torch.Tensor | None = field(default=None, repr=False)  # the counterexample, kept until written
    y: torch.Tensor | None = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        return _VERDICT_OF[self.result]

    def to_json(self) -> dict:
        return {"onnx": self.onnx, "vnnlib": self.vnnlib, "result": self.result, "verdict": self.verdict,
                "method": self.method, "bound": self.bound, "seconds": self.seconds,
                "counterexample": self.counterexample, "bab": self.bab}


@dataclass
class VnnlibRun:
    models: dict[str, dict]       # onnx path -> {"sha256", "input_shape", "outputs"}
    properties: list[PropertyResult]
    skipped: list[dict]           # skipped instances.csv rows: instances, onnx, vnnlib, reason
    options: CascadeOptions
    spec: InputSpec
    batch_size: int = 16
    device: str = "cpu"
    seconds: float = 0.0
    world_size: int = 1

    def summary(self) -> dict:
        counts = {r: sum(1 for p in self.properties if p.result == r) for r in (UNSAT, SAT, UNKNOWN)}
        per_model: dict[str, dict] = {}
        for p in self.properties:
            entry = per_model.setdefault(p.onnx, {"properties": 0, UNSAT: 0, SAT: 0, UNKNOWN: 0, "seconds": 0.0})
            entry["properties"] += 1
            entry[p.result] += 1
            entry["seconds"] = round(entry["seconds"] + p.seconds, 6)
        n = max(len(self.properties), 1)
        return {"properties": len(self.properties), **counts, "verified_fraction": counts[UNSAT] / n,
                "skipped": len(self.skipped), "seconds": round(self.seconds, 3), "per_model": per_model}


# ------------------------------------------------------------------------------ choosing the instances


def resolve_instances(model: str | Path | None, targets: list[str | Path]) -> tuple[list[tuple[Path, Path]], list[dict]]:
    """(onnx, vnnlib) pairs to check, and a record per skipped instances.csv row.

    Each target is a .vnnlib file, a folder of them or an instances.csv. Properties without a model
    of their own (files, folders) go to `model`. Rows of a csv name their model: with `model`
    given only the rows for that same file run; rows whose files are missing are skipped.
    """
    if not targets:
        raise UserError("no --vnnlib given", "give a .vnnlib file, a folder of them or an instances.csv")
    model = Path(model) if model is not None else None
    if model is not None and not model.is_file():
        raise UserError(f"model file {model} does not exist", "check the path")
    pairs: list[tuple[Path, Path]] = []
    skipped: list[dict] = []
    for target in targets:
        target = Path(target)
        if target.suffix.lower() == ".csv" and target.is_file():
            found, missing = read_instances(target, skip_missing=True)
            skipped += [{"instances": str(target), "onnx": Path(o).name, "vnnlib": Path(v).name,
                         "reason": "file missing"} for _, o, v in missing]
        else:
            found = find_properties(target, skip_missing=True)
        for onnx, vnnlib in found:
            if onnx is None:
                if model is None:
                    raise UserError(f"{vnnlib} names no model", "give the ONNX model: certify MODEL --vnnlib ...")
                pairs.append((model, vnnlib))
            elif model is None or _same_file(onnx, model):
                pairs.append((onnx, vnnlib))
            else:
                skipped.append({"instances": str(target), "onnx": onnx.name, "vnnlib": vnnlib.name,
                                "reason": "another model"})
    if not pairs:
        raise UserError(f"no property to check for {model or 'the instances'}",
                        "give properties of this model (rows of an instances.csv name their model)")
    return pairs, skipped


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def skipped_lines(skipped: list[dict]) -> list[str]:
    """One warning line per (instances file, model, reason) instead of one per row."""
    groups: dict[tuple[str, str, str], int] = {}
    for row in skipped:
        key = (row["instances"], row["onnx"], row["reason"])
        groups[key] = groups.get(key, 0) + 1
    return [f"{'warning' if reason == 'file missing' else 'note'}: skipped {count} row(s) of {csv_path} for {onnx} ({reason})"
            for (csv_path, onnx, reason), count in groups.items()]


# ------------------------------------------------------------------------------ the check


@dataclass
class _Loaded:
    model: CertifiableModel
    module: nn.Module
    bounder: MarginBounder
    file_outputs: FileOutputs  # the ONNX file's own outputs, by onnxruntime
    outputs: int


def check_properties(model: str | Path | None, targets: list[str | Path], *, methods: tuple[str, ...] = METHODS,
                     attack: bool = True, attack_steps: int = 50, attack_restarts: int = 5, seed: int = 0,
                     batch_size: int = 16, device: str | None = None, mean: list[float] | None = None,
                     std: list[float] | None = None, quiet: bool = False,
                     check_outputs: Callable[[list[tuple[Path, Path]]], None] | None = None,
                     timeout: float | None = None, max_domains: int = 200_000,
                     branching: str = "babsr") -> VnnlibRun | None:
    """Check every property named by `targets` (see resolve_instances) and return the results in order
    (None on the ranks other than 0 under torchrun).

    With "bab" among the methods, each property still open gets branch and bound for at most
    `timeout` seconds, or its instances.csv row's timeout where that is smaller.

    Every file is read and every model loaded before any work, so a bad input fails at once.
    `check_outputs`, if given, sees the (onnx, vnnlib) pairs before any of them is parsed (the
    command line refuses there an output path that is one of these inputs).
    """
    started = time.perf_counter()
    check_vnnlib_options(methods=methods, batch_size=batch_size, attack_steps=attack_steps,
                         attack_restarts=attack_restarts, seed=seed, mean=mean, std=std, device=device)
    check_bab_options(timeout, max_domains, branching)
    pairs, skipped = resolve_instances(model, targets)
    csv_timeouts = instance_timeouts(targets)
    if check_outputs is not None:
        check_outputs(pairs)
    properties = {vnnlib: parse_vnnlib(vnnlib) for _, vnnlib in pairs}
    spec = InputSpec(mean=mean, std=std)
    models: dict[Path, CertifiableModel] = {}
    for onnx, vnnlib in pairs:
        if onnx not in models:
            models[onnx] = load_certifiable(onnx)
            check_normalization(mean, std, tuple(models[onnx].input_shape))
        _check_fits(properties[vnnlib], models[onnx])
    shard = distributed.start(torch.device(distributed.device_kind(device)))
    dev = distributed.device_for(shard, device)
    quiet = quiet or not shard.is_main
    for line in skipped_lines(skipped):
        say(line, quiet=not shard.is_main)  # shown even with --quiet: the run covers less than the file lists
    loaded = {onnx: _load(onnx, model, spec, dev) for onnx, model in models.items()}
    for onnx, state in loaded.items():
        warn_if_lipschitz_refused(state.bounder, methods, Path(onnx).name, quiet=quiet)
    options = CascadeOptions(methods=tuple(methods), attack=attack, attack_steps=attack_steps,
                             attack_restarts=attack_restarts, seed=seed, timeout=timeout, max_domains=max_domains,
                             branching=branching)

    # The batches of the whole run, model by model; the attack seed is a function of the batch alone.
    batches = []
    for onnx in loaded:
        rows = [k for k, (o, _) in enumerate(pairs) if o == onnx]
        batches += [(onnx, rows[start:start + batch_size], seed + start) for start in range(0, len(rows), batch_size)]
    mine = [batch for number, batch in enumerate(batches) if shard.owns_batch(number)]
    results: list[PropertyResult | None] = [None] * len(pairs)
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("vnnlib", total=sum(len(chunk) for _, chunk, _ in mine), status="")
        for onnx, chunk, chunk_seed in mine:
            props = [properties[pairs[k][1]] for k in chunk]
            timeouts = [csv_timeouts.get(pairs[k]) for k in chunk]
            for k, result in zip(chunk, _check_chunk(loaded[onnx], onnx, props, options, chunk_seed, timeouts)):
                results[k] = result
            done = [r for r in results if r is not None]
            bar.update(task, advance=len(chunk),
                       status=f"unsat {sum(r.result == UNSAT for r in done)}, sat {sum(r.result == SAT for r in done)}")
    gathered = distributed.gather(shard, results)
    distributed.finish(shard)
    if gathered is None:
        return None
    results = [next((part[k] for part in gathered if part[k] is not None), None) for k in range(len(pairs))]
    models = {str(onnx): {"sha256": sha256_file(onnx), "input_shape": list(state.model.input_shape),
                          "outputs": state.outputs} for onnx, state in loaded.items()}
    return VnnlibRun(models, results, skipped, options, spec, batch_size, str(dev), time.perf_counter() - started,
                     shard.world_size)


def check_vnnlib_options(*, methods=METHODS, batch_size: int = 16, attack_steps: int = 50, attack_restarts: int = 5,
                         seed: int = 0, mean: list[float] | None = None, std: list[float] | None = None,
                         device: str | None = None) -> None:
    """The checks of a VNN-LIB run that need no file: a UserError on the first bad option."""
    from certify.verdicts.run_checks import check_attack_options

    unknown = [m for m in methods if m not in CASCADE_METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --method {', '.join(unknown) or '(none)'}", f"use one of {', '.join(CASCADE_METHODS)}")
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} is not positive", "give e.g. --batch-size 16")
    check_attack_options(attack_steps, attack_restarts, seed)
    check_normalization(mean, std)
    distributed.device_kind(device)


def _load(onnx: Path, model: CertifiableModel, spec: InputSpec, device: torch.device) -> _Loaded:
    module, bounder, file_outputs = certified_module(onnx, model, spec, device)
    return _Loaded(model, module, bounder, file_outputs, bounder.num_classes)


def _check_fits(prop: VnnlibProperty, model: CertifiableModel) -> None:
    inputs = int(np.prod(model.input_shape))
    if prop.n_inputs != inputs:
        raise UserError(f"{prop.path} declares {prop.n_inputs} inputs X_i, but {model.path.name} takes "
                        f"{inputs} (shape {list(model.input_shape)})", "give the properties of this model")
    if prop.n_outputs != model.outputs:
        raise UserError(f"{prop.path} declares {prop.n_outputs} outputs Y_j, but {model.path.name} has "
                        f"{model.outputs}", "give the properties of this model")
    # The model computes in float32: a box beyond its range cannot be bounded or attacked.
    largest = float(torch.maximum(prop.lower.abs(), prop.upper.abs()).max()) if prop.n_inputs else 0.0
    if largest > _FLOAT32_MAX:
        raise UserError(f"{prop.path}: an input bound of {largest:g} does not fit in float32, the model's input type",
                        "give bounds within +-3.4e38")


class _PropertyBatch:
    """One chunk of properties of one model, as the stage runner (certify.verdicts.stages) sees it."""

    def __init__(self, state: _Loaded, props: list[VnnlibProperty], attack_steps: int, seed: int,
                 options: CascadeOptions | None = None, timeouts: list[float | None] | None = None):
        n = len(props)
        self.options, self.timeouts = options or CascadeOptions(), timeouts or [None] * n
        self.bab: list[dict | None] = [None] * n
        shape = tuple(state.model.input_shape)
        self.state, self.props, self.attack_steps, self.seed = state, props, attack_steps, seed
        self.lower64 = torch.stack([p.lower for p in props]).view(n, *shape)
        self.upper64 = torch.stack([p.upper for p in props]).view(n, *shape)
        self.region = Region.stack(props, state.outputs)
        self.cost = torch.zeros(n, dtype=torch.float64)
        self.result = [UNKNOWN] * n
        self.method: list[str | None] = [None] * n
        self.found: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self.best = torch.full((n, self.region.disjuncts, self.region.rows), -float("inf"), dtype=torch.float64)
        # Attack points must lie inside the float64 box, bounds must cover all of it.
        self.attack_box = inward_box(self.lower64, self.upper64)
        self.bound_box = outward_box(self.lower64, self.upper64)

    def open_rows(self) -> torch.Tensor:
        return torch.tensor([i for i, r in enumerate(self.result) if r == UNKNOWN], dtype=torch.long)

    def attack(self, rows: torch.Tensor, restarts: int, attempt: int) -> None:
        dev = self.state.bounder.device
        # The first attack starts from the centre; later ones only from random points.
        hits, x_adv = find_in_region(self.state.module, self.attack_box[0][rows].to(dev),
                                     self.attack_box[1][rows].to(dev), self.region.subset(rows).to(dev),
                                     steps=self.attack_steps, restarts=restarts,
                                     seed=stream_seed(self.seed, attempt), from_centre=attempt == 0)
        for k in torch.nonzero(hits.cpu()).flatten().tolist():
            i = int(rows[k])
            x = x_adv[k].detach().cpu()
            inside = bool(((x.double() >= self.lower64[i]) & (x.double() <= self.upper64[i])).all())
            y = self.state.file_outputs.logits(x.unsqueeze(0))[0]
            # Only the ONNX file's own output decides: the imported module could differ in the last bits.
            if inside and bool(torch.isfinite(y).all()) and self.props[i].is_counterexample(y):
                self.result[i], self.method[i], self.found[i] = SAT, "pgd", (x, y)

    def bound(self, rows: torch.Tensor, method: str) -> None:
        region = self.region
        c = region.c[rows].reshape(len(rows), -1, self.state.outputs)
        lower = self._lower_spec_bounds(rows, c, method).view(len(rows), region.disjuncts, region.rows)
        self.best[rows] = torch.maximum(self.best[rows], lower)
        certificate = region.certificate(self.best[rows], rows)
        for k, i in enumerate(rows.tolist()):
            if certificate[k] > 0:
                self.result[i], self.method[i] = UNSAT, method


    def branch_and_bound(self, rows: torch.Tensor) -> None:
        branch_and_bound(self, rows)

    def _lower_spec_bounds(self, rows: torch.Tensor, c: torch.Tensor, method: str) -> torch.Tensor:
        """float64 lower bounds of C y over the box, for the float64 C of the file. The bounder works
        in float32: a C that float32 holds exactly goes to it as is (the tightest bound); otherwise
        each logit is bounded on its own and the file's C is applied to those bounds by interval
        arithmetic in float64, so the bound is about the property as written, not a rounded one."""
        dev, lower_box, upper_box = self.state.bounder.device, self.bound_box[0][rows], self.bound_box[1][rows]
        if torch.equal(c.float().double(), c):
            return lower_bounds(self.state.bounder, lower_box, upper_box, c.to(dev, torch.float32), method).cpu().double()
        m = self.state.outputs
        eye = torch.eye(m, dtype=torch.float32).expand(len(rows), m, m)
        both = lower_bounds(self.state.bounder, lower_box, upper_box, torch.cat([eye, -eye], 1).to(dev), method)
        y_low, y_high = both[:, :m].cpu().double(), -both[:, m:].cpu().double()
        return (c.clamp(min=0) @ y_low.unsqueeze(-1) + c.clamp(max=0) @ y_high.unsqueeze(-1)).squeeze(-1)


def _check_chunk(state: _Loaded, onnx: Path, props: list[VnnlibProperty], options: CascadeOptions,
                 seed: int, timeouts: list[float | None] | None = None) -> list[PropertyResult]:
    batch = _PropertyBatch(state, props, options.attack_steps, seed, options, timeouts)
    run_stages(cascade_stages(options), batch)
    certificates = batch.region.certificate(batch.best, torch.arange(len(props)))
    out = []
    for i, prop in enumerate(props):
        value = certificates[i].item()
        if batch.method[i] in ("bab", "bab-input") and batch.result[i] == UNSAT:
            value = batch.bab[i]["lower_bound"]
        bounded = batch.result[i] != SAT and value > -float("inf")
        x, y = batch.found[i] or (None, None)
        out.append(PropertyResult(str(onnx), str(prop.path), batch.result[i], batch.method[i],
                                  value if bounded else None, round(float(batch.cost[i]), 6), x=x, y=y,
                                  vnnlib_sha256=prop.sha256, bab=batch.bab[i]))
    return out


def counterexample_name(onnx: str | Path, vnnlib: str | Path) -> str:
    return f"{Path(onnx).stem}__{Path(vnnlib).stem}.counterexample"


def write_counterexamples(run: VnnlibRun, folder: str | Path) -> int:
    """Write every sat property's counterexample as `<model>__<property>.counterexample`; returns how many."""
    folder = Path(folder)
    written = 0
    for p in run.properties:
        if p.result == SAT and p.x is not None:
            path = folder / counterexample_name(p.onnx, p.vnnlib)
            write_counterexample(path, p.x, p.y)
            p.counterexample = str(path)
            written += 1
    return written
