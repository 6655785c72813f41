"""Branch and bound for VNN-LIB properties, and the VNN-COMP result files.

One search tree per OR-disjunct still open after the bounds: the rows of one AND clause share the
tree (the clause is refuted on a domain as soon as ONE of its rows is), the disjuncts do not.
A property is unsat when every disjunct's tree is, sat when any tree finds a counterexample that
onnxruntime confirms on the file.

The float64 file is bounded in float32: a clause's C goes to the search only where float32 holds
it exactly, and its d rounded UP (a bound that clears the rounded-up d clears the file's d too).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from certify.bab.outcome import Query
from certify.bab.search import NOT_APPLICABLE, SearchSummary, search_all
from certify.bounds.bounder import float32_up
from certify.common.files import atomic_path
from certify.specs.vnnlib_instances import read_instance_rows

UNSAT, SAT, UNKNOWN, TIMEOUT = "unsat", "sat", "unknown", "timeout"


def instance_timeouts(targets: list[str | Path]) -> dict[tuple[Path, Path], float]:
    """The timeout column of every instances.csv among `targets`, by (onnx, vnnlib) as resolved."""
    timeouts: dict[tuple[Path, Path], float] = {}
    for target in targets:
        target = Path(target)
        if target.suffix.lower() == ".csv" and target.is_file():
            rows, _ = read_instance_rows(target, skip_missing=True)
            timeouts.update({(onnx, vnnlib): seconds for onnx, vnnlib, seconds in rows
                             if onnx is not None and seconds is not None})
    return timeouts


def property_timeout(csv_timeout: float | None, option: float | None, spent: float = 0.0) -> float | None:
    """Seconds of branch and bound for one property: --timeout, capped by what is left of the row's
    own timeout after the `spent` seconds of the stages before (a competition timeout covers the
    whole property, not only the search)."""
    left = None if csv_timeout is None else max(csv_timeout - spent, 0.0)
    given = [t for t in (left, option) if t is not None]
    return min(given) if given else None


def search_property(batch, i: int, limits) -> SearchSummary:
    """Branch and bound of property i of a vnnlib_check property batch (its bounds already in `best`)."""
    region, state = batch.region, batch.state
    per_row = batch.best[i] - region.d[i]
    per_row = torch.where(region.row_valid[i], per_row, torch.full_like(per_row, -float("inf")))
    per_disjunct = per_row.amax(1)
    lower, upper = batch.bound_box[0][i:i + 1].float(), batch.bound_box[1][i:i + 1].float()
    queries, proved = [], [float("inf")]
    for k in torch.argsort(per_disjunct).tolist():
        if not bool(region.disjunct_valid[i, k]):
            continue
        if per_disjunct[k] > 0:
            proved.append(float(per_disjunct[k]))
            continue
        rows = region.row_valid[i, k]
        c = region.c[i, k][rows]
        if not torch.equal(c.float().double(), c) or not bool(rows.any()):
            return SearchSummary(UNKNOWN, None, None, 0, NOT_APPLICABLE + " (coefficients not float32)")
        queries.append(Query(lower, upper, c.float(), float32_up(region.d[i, k][rows]),
                             lambda x, i=i: confirm(batch, i, x)))
    summary = search_all(state.bounder, state.module, queries, limits)
    if summary.result == UNSAT and summary.lower_bound is not None:
        # The property's certificate: the worst disjunct, searched or proved by the bounds already.
        summary.lower_bound = min(summary.lower_bound, *proved)
    return summary


def branch_and_bound(batch, rows: torch.Tensor) -> None:
    """The "bab" stage on the open properties `rows` of a vnnlib_check property batch."""
    for i in rows.tolist():
        seconds = property_timeout(batch.timeouts[i], batch.options.timeout, spent=float(batch.cost[i]))
        options = replace(batch.options, timeout=seconds)
        summary = search_property(batch, i, options.bab_limits())
        batch.bab[i] = summary.to_json()
        if summary.result == UNSAT:
            batch.result[i], batch.method[i] = UNSAT, summary.method
        elif summary.result == SAT:
            x = summary.x.detach().cpu()
            batch.result[i], batch.method[i] = SAT, summary.method
            batch.found[i] = (x, batch.state.file_outputs.logits(x.unsqueeze(0))[0])


def confirm(batch, i: int, x: torch.Tensor) -> bool:
    """Whether x is a counterexample of property i: inside its float64 box, and the ONNX file's
    own output in the region."""
    x64 = x.detach().cpu().double()
    if not bool(((x64 >= batch.lower64[i]) & (x64 <= batch.upper64[i])).all()):
        return False
    y = batch.state.file_outputs.logits(x.detach().cpu().float().unsqueeze(0))[0]
    return bool(torch.isfinite(y).all()) and batch.props[i].is_counterexample(y)


def competition_verdict(result: str, bab: dict | None) -> str:
    """unsat / sat / timeout / unknown, as VNN-COMP's scripts read a result file."""
    if result in (UNSAT, SAT):
        return result
    return TIMEOUT if bab is not None and bab.get("reason") == TIMEOUT else UNKNOWN


def result_name(onnx: str | Path, vnnlib: str | Path) -> str:
    return f"{Path(onnx).stem}__{Path(vnnlib).stem}.result"


def write_results(run, folder: str | Path) -> int:
    """One VNN-COMP result file per property in `folder`: `unsat`, `timeout`, `unknown`, or `sat`
    followed by the counterexample assignment ((X_0 v) ... (Y_0 v) ...). Returns how many."""
    from certify.specs.vnnlib import write_counterexample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for p in run.properties:
        path = folder / result_name(p.onnx, p.vnnlib)
        if p.result == SAT and p.x is not None:
            write_counterexample(path, p.x, p.y)
            continue
        with atomic_path(path) as tmp:
            tmp.write_text(competition_verdict(p.result if p.result != SAT else UNKNOWN, p.bab) + "\n",
                           encoding="utf-8")
    return len(run.properties)
