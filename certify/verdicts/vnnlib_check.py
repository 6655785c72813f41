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

from certify.common import distributed
from certify.bounds.bounder import METHODS, MarginBounder
from certify.onnx_import.channel_affine import affine_ops_as_convs
from certify.common.errors import UserError
from certify.common.files import sha256_file
from certify.onnx_import.certifiable import CertifiableModel, load_certifiable
from certify.common.progress import progress_bar, say
from certify.specs.input_spec import InputSpec, check_normalization, with_normalization
from certify.verdicts.cascade import CascadeOptions, cascade_stages, lower_bounds
from certify.specs.vnnlib import VnnlibProperty, find_properties, parse_vnnlib, read_instances, write_counterexample

SAT, UNSAT, UNKNOWN = "sat", "unsat", "unknown"
_VERDICT_OF = {UNSAT: "verified", SAT: "falsified", UNKNOWN: "unknown"}
# Stands for +-infinity inside the attack objective (a true inf would give NaN gradients).
_BIG = 1e30
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
    x: torch.Tensor | None = field(default=None, repr=False)  # the counterexample, kept until written
    y: torch.Tensor | None = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        return _VERDICT_OF[self.result]

    def to_json(self) -> dict:
        return {"onnx": self.onnx, "vnnlib": self.vnnlib, "result": self.result, "verdict": self.verdict,
                "method": self.method, "bound": self.bound, "seconds": self.seconds,
                "counterexample": self.counterexample}


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
    session: object
    outputs: int
    normalizer: nn.Module | None  # the --mean/--std map put in front of the file's graph, if any


def check_properties(model: str | Path | None, targets: list[str | Path], *, methods: tuple[str, ...] = METHODS,
                     attack: bool = True, attack_steps: int = 50, attack_restarts: int = 5, seed: int = 0,
                     batch_size: int = 16, device: str | None = None, mean: list[float] | None = None,
                     std: list[float] | None = None, quiet: bool = False,
                     check_outputs: Callable[[list[tuple[Path, Path]]], None] | None = None) -> VnnlibRun | None:
    """Check every property named by `targets` (see resolve_instances) and return the results in order
    (None on the ranks other than 0 under torchrun).

    Every file is read and every model loaded before any work, so a bad input fails at once.
    `check_outputs`, if given, sees the (onnx, vnnlib) pairs before any of them is parsed (the
    command line refuses there an output path that is one of these inputs).
    """
    started = time.perf_counter()
    check_vnnlib_options(methods=methods, batch_size=batch_size, attack_steps=attack_steps,
                         attack_restarts=attack_restarts, seed=seed, mean=mean, std=std, device=device)
    pairs, skipped = resolve_instances(model, targets)
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
    options = CascadeOptions(methods=tuple(methods), attack=attack, attack_steps=attack_steps,
                             attack_restarts=attack_restarts, seed=seed)

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
            for k, result in zip(chunk, _check_chunk(loaded[onnx], onnx, props, options, chunk_seed)):
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
    from certify.verdicts.dataset import check_attack_options

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --method {', '.join(unknown) or '(none)'}", f"use one of {', '.join(METHODS)}")
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} is not positive", "give e.g. --batch-size 16")
    check_attack_options(attack_steps, attack_restarts, seed)
    check_normalization(mean, std)
    distributed.device_kind(device)


def _load(onnx: Path, model: CertifiableModel, spec: InputSpec, device: torch.device) -> _Loaded:
    from certify.onnx_import.parity import onnxruntime_session

    normalized = with_normalization(model.module, spec, tuple(model.input_shape))
    module = affine_ops_as_convs(normalized, tuple(model.input_shape)).to(device)
    bounder = MarginBounder(module, tuple(model.input_shape), device=device)
    session = onnxruntime_session(onnx)
    normalizer = normalized[0] if normalized is not model.module else None
    return _Loaded(model, module, bounder, session, bounder.num_classes, normalizer)


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


def _check_chunk(state: _Loaded, onnx: Path, props: list[VnnlibProperty], options: CascadeOptions,
                 seed: int) -> list[PropertyResult]:
    n = len(props)
    shape = tuple(state.model.input_shape)
    dev = state.bounder.device
    lower64 = torch.stack([p.lower for p in props]).view(n, *shape)
    upper64 = torch.stack([p.upper for p in props]).view(n, *shape)
    region = _Region.stack(props, state.outputs)
    cost = torch.zeros(n, dtype=torch.float64)
    result = [UNKNOWN] * n
    method: list[str | None] = [None] * n
    found_x: list[torch.Tensor | None] = [None] * n
    found_y: list[torch.Tensor | None] = [None] * n
    best = torch.full((n, region.disjuncts, region.rows), -float("inf"), dtype=torch.float64)
    attack_lo, attack_hi = _float32_inward(lower64, upper64)
    bound_lo, bound_hi = _float32_outward(lower64, upper64)
    attacks_done = 0

    for stage, restarts in cascade_stages(options):
        rows = torch.tensor([i for i in range(n) if result[i] == UNKNOWN], dtype=torch.long)
        if rows.numel() == 0:
            break
        t0 = time.perf_counter()
        if stage == "attack":
            # The first attack starts from the centre; later ones only from random points.
            hits, x_adv = find_in_region(state.module, attack_lo[rows].to(dev), attack_hi[rows].to(dev),
                                         region.subset(rows).to(dev), steps=options.attack_steps,
                                         restarts=restarts, seed=seed + attacks_done, from_centre=attacks_done == 0)
            attacks_done += 1
            for k in torch.nonzero(hits.cpu()).flatten().tolist():
                i = int(rows[k])
                x = x_adv[k].detach().cpu()
                inside = bool(((x.double() >= lower64[i]) & (x.double() <= upper64[i])).all())
                y = _onnxruntime_outputs(state, x.unsqueeze(0))[0]
                # Only the ONNX file's own output decides: the imported module could differ in the last bits.
                if inside and bool(torch.isfinite(y).all()) and props[i].is_counterexample(y):
                    result[i], method[i], found_x[i], found_y[i] = SAT, "pgd", x, y
        else:
            c = region.c[rows].reshape(len(rows), -1, state.outputs).to(dev, torch.float32)
            lower = lower_bounds(state.bounder, bound_lo[rows], bound_hi[rows], c, stage).cpu().double()
            best[rows] = torch.maximum(best[rows], lower.view(len(rows), region.disjuncts, region.rows))
            certificate = region.certificate(best[rows], rows)
            for k, i in enumerate(rows.tolist()):
                if certificate[k] > 0:
                    result[i], method[i] = UNSAT, stage
        cost[rows] += (time.perf_counter() - t0) / len(rows)
    certificates = region.certificate(best, torch.arange(n))
    out = []
    for i, prop in enumerate(props):
        value = certificates[i].item()
        bounded = result[i] != SAT and value > -float("inf")
        out.append(PropertyResult(str(onnx), str(prop.path), result[i], method[i], value if bounded else None,
                                  round(float(cost[i]), 6), x=found_x[i], y=found_y[i], vnnlib_sha256=prop.sha256))
    return out


@dataclass
class _Region:
    """The counterexample regions of a batch of properties, padded to common sizes:
    c (n, K, R, m), d (n, K, R); padded rows are all-zero and invalid, padded disjuncts invalid."""

    c: torch.Tensor
    d: torch.Tensor
    row_valid: torch.Tensor
    disjunct_valid: torch.Tensor

    @property
    def disjuncts(self) -> int:
        return self.c.shape[1]

    @property
    def rows(self) -> int:
        return self.c.shape[2]

    @staticmethod
    def stack(props: list[VnnlibProperty], outputs: int) -> "_Region":
        k = max(max(len(p.unsafe) for p in props), 1)
        r = max(max((item.C.shape[0] for p in props for item in p.unsafe), default=1), 1)
        n = len(props)
        c = torch.zeros(n, k, r, outputs, dtype=torch.float64)
        d = torch.zeros(n, k, r, dtype=torch.float64)
        row_valid = torch.zeros(n, k, r, dtype=torch.bool)
        disjunct_valid = torch.zeros(n, k, dtype=torch.bool)
        for i, prop in enumerate(props):
            for j, (C, dd) in enumerate(prop.unsafe):
                rows = C.shape[0]
                c[i, j, :rows], d[i, j, :rows] = C, dd
                row_valid[i, j, :rows] = True
                disjunct_valid[i, j] = True
        return _Region(c, d, row_valid, disjunct_valid)

    def subset(self, rows: torch.Tensor) -> "_Region":
        return _Region(self.c[rows], self.d[rows], self.row_valid[rows], self.disjunct_valid[rows])

    def to(self, device) -> "_Region":
        return _Region(self.c.to(device, torch.float32), self.d.to(device, torch.float32),
                       self.row_valid.to(device), self.disjunct_valid.to(device))

    def objective(self, y: torch.Tensor) -> torch.Tensor:
        """f(y) = min_k max_r (C_kr y - d_kr) per sample: <= 0 exactly in the counterexample region.
        A disjunct without rows holds for any output (-BIG); a padded one never (+BIG)."""
        value = torch.einsum("nkrm,nm->nkr", self.c, y) - self.d
        value = torch.where(self.row_valid, value, torch.full_like(value, -_BIG))
        per_disjunct = value.amax(dim=2)
        per_disjunct = torch.where(self.disjunct_valid, per_disjunct, torch.full_like(per_disjunct, _BIG))
        return per_disjunct.amin(dim=1)

    def certificate(self, lower: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """min_k max_r (lower_kr - d_kr) for the given properties; > 0 proves the region empty.
        An empty region (no disjunct) is +inf: nothing to refute."""
        value = lower - self.d[rows]
        value = torch.where(self.row_valid[rows], value, torch.full_like(value, -float("inf")))
        per_disjunct = value.amax(dim=2)
        per_disjunct = torch.where(self.disjunct_valid[rows], per_disjunct,
                                   torch.full_like(per_disjunct, float("inf")))
        return per_disjunct.amin(dim=1)


def find_in_region(module: nn.Module, lower: torch.Tensor, upper: torch.Tensor, region: _Region, *,
                   steps: int = 50, restarts: int = 5, seed: int = 0,
                   from_centre: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD inside per-sample boxes toward the counterexample region: minimizes region.objective.

    Returns (found, x): found[i] when the module's output at x[i] lies in the region (confirm it
    elsewhere before trusting it). The first restart starts at the box centre (unless not
    `from_centre`), the others at uniform random points (seeded); steps are per coordinate,
    2.5 * half-width / steps.
    """
    generator = torch.Generator().manual_seed(seed)
    n = lower.shape[0]
    step = (upper - lower) * (1.25 / steps)
    found = torch.zeros(n, dtype=torch.bool, device=lower.device)
    best = (lower + upper) / 2
    module.eval()
    for restart in range(restarts):
        todo = torch.nonzero(~found).flatten()
        if todo.numel() == 0:
            break
        lo, hi = lower[todo], upper[todo]
        if restart == 0 and from_centre:
            x = (lo + hi) / 2
        else:
            x = lo + torch.rand(lo.shape, generator=generator).to(lo.device) * (hi - lo)
        sub = region.subset(todo)
        for iteration in range(steps + 1):
            x = x.detach().requires_grad_(True)
            value = sub.objective(module(x))
            hit = value.detach() <= 0
            if hit.any():
                newly = todo[hit]
                fresh = ~found[newly]
                best[newly[fresh]] = x.detach()[hit][fresh]
                found[newly] = True
            if iteration == steps or hit.all():
                break
            (grad,) = torch.autograd.grad(value.sum(), [x])
            moved = x.detach() - step[todo] * grad.sign()
            x = torch.minimum(torch.maximum(moved, lo), hi)
        if restart == 0:
            misses = todo[~found[todo]]
            best[misses] = x.detach()[~found[todo]]
    return found, best


def _float32_outward(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest float32 box containing the float64 box."""
    lo, hi = lower.float(), upper.float()
    lo = torch.where(lo.double() > lower, torch.nextafter(lo, torch.tensor(-float("inf"))), lo)
    hi = torch.where(hi.double() < upper, torch.nextafter(hi, torch.tensor(float("inf"))), hi)
    return lo, hi


def _float32_inward(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest float32 box inside the float64 box (empty axes collapse to the lower end)."""
    lo, hi = lower.float(), upper.float()
    lo = torch.where(lo.double() < lower, torch.nextafter(lo, torch.tensor(float("inf"))), lo)
    hi = torch.where(hi.double() > upper, torch.nextafter(hi, torch.tensor(-float("inf"))), hi)
    return lo, torch.maximum(hi, lo)


def _onnxruntime_outputs(state: _Loaded, x: torch.Tensor) -> torch.Tensor:
    """The ONNX file's outputs (float64, (n, outputs)) on inputs (n, *input_shape), run by onnxruntime.
    With --mean/--std the file expects normalized inputs: normalize as the certified module does."""
    normalize = state.normalizer
    declared = state.session.get_inputs()[0]
    outputs = []
    for sample in x:
        value = sample.unsqueeze(0)
        if normalize is not None:
            with torch.no_grad():
                value = normalize(value.to(normalize.mean.device)).cpu()
        value = value.float().numpy()
        if len(declared.shape) == value.ndim - 1:
            out = state.session.run(None, {declared.name: value[0]})[0]
        else:
            batch = declared.shape[0] if isinstance(declared.shape[0], int) and declared.shape[0] > 1 else 1
            # A fixed batch > 1 takes full batches: repeat the sample and keep the first output.
            out = np.asarray(state.session.run(None, {declared.name: np.repeat(value, batch, axis=0)})[0])
            out = out[:1] if batch > 1 else out
        outputs.append(np.asarray(out, dtype=np.float64).reshape(-1))
    return torch.from_numpy(np.stack(outputs))


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
