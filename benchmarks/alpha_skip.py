"""Benchmark of the two time limits of the cascade: alpha-CROWN skipped on hopeless samples, and the
per-sample budget of `certify --radius`.

1. The hopeless test (certify.verdicts.stages.hopeless). On the first --limit test images at each
   --eps, every sample that CROWN leaves open gets alpha-CROWN anyway; per sample we record CROWN's
   bound, alpha-CROWN's, the margin at the sample and alpha-CROWN's time. For each candidate
   fraction: how many samples alpha-CROWN verifies that the test would have skipped (lost), and
   the alpha-CROWN time it saves.
2. `certify --radius` on the first --radius-limit images, before (no skip, no budget) and after
   (the defaults), on the same model, in the same run.

    python -m benchmarks.alpha_skip --model runs/mnist/model.onnx --limit 100 --radius-limit 10

Writes benchmarks/results/alpha_skip.json and .md (timings on the machine it runs on: say how many cores).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from benchmarks.common import finish, markdown_table, write_markdown
from certify.bounds.bounder import empirical_margins
from certify.data.datasets import load_dataset
from certify.onnx_import.certifiable import load_certifiable
from certify.specs.input_spec import spec_from_metadata
from certify.verdicts import stages
from certify.verdicts.dataset import certify_model
from certify.verdicts.file_outputs import certified_module

FRACTIONS = (0.3, 0.5, 0.7, 0.9)


def study(model_path: Path, eps: float, limit: int, batch: int) -> list[dict]:
    """Per sample CROWN leaves open at eps: CROWN's and alpha-CROWN's worst margin bound, and the
    fraction of the gap to the sample's own margin that alpha-CROWN would have to close."""
    model = load_certifiable(model_path)
    spec = spec_from_metadata(model.metadata)
    module, bounder, _ = certified_module(model_path, model, spec, torch.device("cpu"))
    data = load_dataset(spec.dataset, split="test").subset(limit)
    rows = []
    for start in range(0, len(data), batch):
        x = data.x[start:start + batch].reshape(-1, *model.input_shape)
        y = data.y[start:start + batch]
        with torch.no_grad():
            logits = module(x)
        keep = logits.argmax(1) == y
        x, y, logits = x[keep], y[keep], logits[keep]
        lo, hi = spec.box(x, eps)
        crown = bounder.lower_margins(lo, hi, y, "crown")
        open_ = crown.min(1).values <= 0
        if not open_.any():
            continue
        x, y, lo, hi, crown, logits = x[open_], y[open_], lo[open_], hi[open_], crown[open_], logits[open_]
        started = time.perf_counter()
        alpha = torch.maximum(bounder.lower_margins(lo, hi, y, "alpha-crown"), crown)
        seconds = (time.perf_counter() - started) / len(y)
        margins = empirical_margins(logits, y)
        needed = torch.where(crown < 0, -crown / (margins - crown), torch.zeros_like(crown)).max(1).values
        for i in range(len(y)):
            rows.append({"eps": eps, "crown": crown[i].min().item(), "alpha": alpha[i].min().item(),
                         "needed_fraction": needed[i].item(), "alpha_verified": bool(alpha[i].min() > 0),
                         "alpha_seconds": seconds})
    return rows


def skip_table(rows: list[dict]) -> list[dict]:
    out = []
    for fraction in FRACTIONS:
        skipped = [r for r in rows if r["needed_fraction"] > fraction]
        out.append({"fraction": fraction, "open_after_crown": len(rows), "skipped": len(skipped),
                    "alpha_verified": sum(r["alpha_verified"] for r in rows),
                    "lost": sum(r["alpha_verified"] for r in skipped),
                    "alpha_seconds_saved": round(sum(r["alpha_seconds"] for r in skipped), 2),
                    "alpha_seconds_all": round(sum(r["alpha_seconds"] for r in rows), 2)})
    return out


def radius_run(model_path: Path, limit: int, *, skip: bool, budget: float | None) -> dict:
    saved = stages.HOPELESS_GAP_FRACTION
    stages.HOPELESS_GAP_FRACTION = saved if skip else math.inf
    try:
        started = time.perf_counter()
        run = certify_model(model_path, [0.1], limit=limit, radius=True, radius_budget=budget, quiet=True)
        seconds = time.perf_counter() - started
    finally:
        stages.HOPELESS_GAP_FRACTION = saved
    summary = run.radius.summary()
    return {"skip_hopeless": skip, "budget_s": budget, "seconds": round(seconds, 1), "samples": limit,
            "mean_radius": round(summary["mean"], 5), "median_radius": round(summary["median"], 5),
            "out_of_time": summary["out_of_time"],
            "slowest_sample_s": round(max(r.seconds for r in run.radius.samples), 2)}


def show(document: dict) -> list[str]:
    lines = [f"alpha-CROWN skip test ({document['model']}, first {document['limit']} test images, "
             f"{document['threads']} threads on {document['cores']} CPU cores)", ""]
    lines += markdown_table(
        ("eps", "fraction", "open after CROWN", "skipped", "alpha-CROWN verified", "lost by skipping",
         "alpha-CROWN s saved / total"),
        [[eps, r["fraction"], r["open_after_crown"], r["skipped"], r["alpha_verified"], r["lost"],
          f"{r['alpha_seconds_saved']} / {r['alpha_seconds_all']}"]
         for eps, table in document["skip"].items() for r in table])
    lines += ["", f"certify --eps 0.1 --radius on the first {document['radius_limit']} images:", ""]
    lines += markdown_table(
        ("run", "seconds", "mean radius", "median radius", "out of time", "slowest sample s"),
        [[_run_name(r),
          r["seconds"], r["mean_radius"], r["median_radius"], r["out_of_time"], r["slowest_sample_s"]]
         for r in document["radius"]])
    print("\n".join(lines))
    return lines


def _run_name(run: dict) -> str:
    if not run["skip_hopeless"]:
        return "before: no skip, no budget"
    return "skip, no budget" if run["budget_s"] is None else f"skip, budget {run['budget_s']:g} s"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/mnist/model.onnx"))
    parser.add_argument("--eps", type=float, action="append", default=None)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--radius-limit", type=int, default=10)
    parser.add_argument("--budget", type=float, action="append", default=None,
                        help="per-sample --radius-budget to measure (repeat for several; default 30)")
    parser.add_argument("--radius-only", action="store_true", help="skip part 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/alpha_skip.json")
    parser.add_argument("--markdown", default="benchmarks/results/alpha_skip.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    eps_values = args.eps or [0.15, 0.2]
    document = {"model": str(args.model), "limit": args.limit, "radius_limit": args.radius_limit,
                "threads": args.threads, "cores": os.cpu_count(),
                "hopeless_gap_fraction": stages.HOPELESS_GAP_FRACTION, "skip": {}, "samples": {}}
    for eps in [] if args.radius_only else eps_values:
        rows = study(args.model, eps, args.limit, 50)
        document["samples"][str(eps)], document["skip"][str(eps)] = rows, skip_table(rows)
    runs = [(False, None), (True, None)] + [(True, budget) for budget in args.budget or [30.0]]
    document["radius"] = [radius_run(args.model, args.radius_limit, skip=skip, budget=budget) for skip, budget in runs]
    lines: list[str] = []
    finish(document, args.json, lambda d: lines.extend(show(d)))
    write_markdown(args.markdown, lines)
    return document


if __name__ == "__main__":
    main()
