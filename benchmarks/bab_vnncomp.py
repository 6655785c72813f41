"""Complete verification on the VNN-COMP 2021 families in ../shared/vnncomp: our unsat / sat /
unknown next to alpha-beta-CROWN 2021's answers (expected_results.csv), and the cost of the default
cascade (no --timeout, no branch and bound) measured in the same run.

Per family: one run of the default cascade over every row, then one with branch and bound
appended. Each row's instances.csv timeout (the 2021 ones: 120 s / 300 s) covers the whole property;
`--timeout` caps the search further (20 s fits a quick run, 300 s leaves the 2021 timeouts as they
are). Properties are checked one at a time so that each row's seconds are its own.

    python -m benchmarks.bab_vnncomp --timeout 20 --json benchmarks/results/bab_vnncomp.json \
        --markdown benchmarks/results/bab_vnncomp.md
    python -m benchmarks.bab_vnncomp --timeout 300 --models mnist-net_256x4.onnx ...   # 2021 timeouts, one net
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from benchmarks.common import finish, markdown_table, table, write_markdown

FAMILIES = ("mnistfc", "verivital_mnist_conv")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"


def expected(folder: Path) -> dict[tuple[str, str], dict]:
    """expected_results.csv by (onnx name, vnnlib file name)."""
    with open(folder / "expected_results.csv", newline="") as handle:
        return {(row["onnx"], Path(row["vnnlib"]).name): row for row in csv.DictReader(handle)}


def run_family(folder: Path, methods: tuple[str, ...], timeout: float | None, limit: int | None,
               models: set[str] | None = None) -> list[dict]:
    """Every row of the family's instances.csv whose files exist (the first `limit` per model;
    only the models named in `models`, if given)."""
    from certify.specs.vnnlib_instances import read_instance_rows
    from certify.verdicts.vnnlib_check import check_properties

    rows, _ = read_instance_rows(folder / "instances.csv", skip_missing=True)
    per_model: dict[Path, list[Path]] = {}
    for onnx, vnnlib, _ in rows:
        per_model.setdefault(onnx, []).append(vnnlib)
    out = []
    for onnx, properties in per_model.items():
        if models is not None and onnx.name not in models:
            continue
        # A full run goes through the instances.csv, so that each row's own timeout applies; a smoke
        # run (--limit) names its files, and only --timeout limits it.
        targets = [folder / "instances.csv"] if limit is None else properties[:limit]
        run = check_properties(onnx, targets, methods=methods, timeout=timeout, batch_size=1, quiet=True)
        out += [{"onnx": Path(p.onnx).name, "vnnlib": Path(p.vnnlib).name, "result": p.result, "method": p.method,
                 "seconds": p.seconds, "bab": p.bab} for p in run.properties]
    return out


def summarise(rows_default: list[dict], rows_bab: list[dict], truth: dict) -> list[dict]:
    """One line per model: counts of both runs, abcrown2021's counts, wrong answers, seconds."""
    lines = []
    for model in sorted({r["onnx"] for r in rows_bab}):
        mine = [r for r in rows_bab if r["onnx"] == model]
        base = [r for r in rows_default if r["onnx"] == model]
        reference = [truth.get((model, r["vnnlib"]), {}) for r in mine]
        wrong = sum(1 for r, t in zip(mine, reference)
                    if r["result"] in ("sat", "unsat") and t.get("vnncomp2021_verdict") in ("sat", "unsat")
                    and r["result"] != t["vnncomp2021_verdict"])
        lines.append({
            "model": model, "properties": len(mine),
            **{f"default_{k}": sum(r["result"] == k for r in base) for k in ("unsat", "sat", "unknown")},
            **{f"bab_{k}": sum(r["result"] == k for r in mine) for k in ("unsat", "sat", "unknown")},
            **{f"abcrown2021_{k}": sum(t.get("abcrown2021") == k for t in reference) for k in ("unsat", "sat")},
            "disagreements_with_2021_majority": wrong,
            "default_seconds_per_instance": round(sum(r["seconds"] for r in base) / max(len(base), 1), 3),
            "bab_seconds_per_instance": round(sum(r["seconds"] for r in mine) / max(len(mine), 1), 3),
            "bab_decided_by_search": sum(1 for r in mine if r["method"] in ("bab", "bab-input")),
            "unknown_reasons": _reasons(mine),
        })
    return lines


def _reasons(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        if r["result"] == "unknown":
            reason = (r["bab"] or {}).get("reason") or "no search"
            out[reason] = out.get(reason, 0) + 1
    return out


COLUMNS = ("model", "props", "default u/s/?", "bab u/s/?", "abcrown2021 u/s", "wrong", "s/inst default",
           "s/inst bab", "unknown why")


def _cells(line: dict) -> list:
    return [line["model"], line["properties"],
            f"{line['default_unsat']}/{line['default_sat']}/{line['default_unknown']}",
            f"{line['bab_unsat']}/{line['bab_sat']}/{line['bab_unknown']}",
            f"{line['abcrown2021_unsat']}/{line['abcrown2021_sat']}", line["disagreements_with_2021_majority"],
            line["default_seconds_per_instance"], line["bab_seconds_per_instance"],
            ", ".join(f"{k} {v}" for k, v in line["unknown_reasons"].items()) or "-"]


def show(document: dict) -> None:
    from rich.console import Console

    out = table(f"branch and bound on VNN-COMP 2021 (timeout {document['timeout']} s per property, 2 CPU cores)",
                COLUMNS)
    for line in document["models"]:
        out.add_row(*[str(c) for c in _cells(line)])
    Console().print(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds of branch and bound per property")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--limit", type=int, default=None,
                        help="first N rows per model only (smoke runs; then only --timeout limits a row)")
    parser.add_argument("--models", default=None, help="comma-separated ONNX file names: only these models")
    parser.add_argument("--vnncomp", type=Path, default=SHARED)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)

    from certify.bounds.bounder import METHODS

    started = time.perf_counter()
    models, rows = [], {}
    models_wanted = None if args.models is None else set(args.models.split(","))
    for family in args.families.split(","):
        folder = args.vnncomp / family
        default = run_family(folder, METHODS, None, args.limit, models_wanted)
        with_bab = run_family(folder, METHODS + ("bab",), args.timeout, args.limit, models_wanted)
        if not with_bab:
            continue
        rows[family] = {"default": default, "bab": with_bab}
        models += summarise(default, with_bab, expected(folder))
    document = {"benchmark": "bab_vnncomp", "timeout": args.timeout, "instance_timeouts": args.limit is None,
                "cores": 2, "methods_default": list(METHODS),
                "models": models, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    limit = ("each row's instances.csv timeout for the whole property (the 2021 ones: 120 s / 300 s), and at "
             f"most {args.timeout:g} s of branch and bound" if args.limit is None else
             f"at most {args.timeout:g} s of branch and bound (smoke run of {args.limit} rows per model)")
    lines = [f"Per property {limit}; 2 CPU cores (alpha-beta-CROWN 2021 ran on a GPU). u/s/? = unsat/sat/unknown; "
             "wrong = answers that contradict the 2021 majority verdict; s/inst = mean seconds per property.", ""]
    write_markdown(args.markdown, lines + markdown_table(COLUMNS, [_cells(m) for m in models]))
    return finish(document, args.json, show)


if __name__ == "__main__":
    main()
