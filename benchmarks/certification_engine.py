"""Benchmark of the certification engine.

1. Cascade vs alpha-CROWN on every sample: the small CNN on the first --limit MNIST test images at
   --eps (default 1,000 images, eps 0.1). The cascade (misclassified -> PGD -> IBP -> CROWN ->
   alpha-CROWN) against alpha-CROWN alone on the first --alpha-limit of them (alpha-CROWN costs
   far more per image than the cascade: all of them would take hours, so measure on a subset and say so).
   Targets: same or more verified, at least 10x faster per image.
2. Our overhead against calling auto_LiRPA directly for the same method (IBP, CROWN): the same
   imported module, the same boxes and margin matrices, batch by batch. Target: at most 10%.
3. Samples per second of the cascade.
4. ../shared/vnncomp: verdict and time per property next to expected_results.csv's columns
   (VNN-COMP 2021 verdict, alpha-beta-CROWN 2021 answer and time, the auto_LiRPA 0.7.1 margins).

    python benchmarks/certification_engine.py                              # trains a small CNN (1 epoch) first
    python benchmarks/certification_engine.py --model m.onnx --limit 200 --alpha-limit 20 --threads 1
    python benchmarks/certification_engine.py --skip-vnncomp --limit 100

Writes --json (default benchmarks/results/certification_engine.json) and prints readable tables (markdown).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from certify.bounds.bounder import LIRPA_METHODS, margin_matrix
from certify.bounds.compat import lirpa
from certify.data.datasets import load_dataset
from certify.verdicts.dataset import certify_model
from certify.common.files import atomic_path
from certify.onnx_import.reader import import_onnx
from certify.common.progress import say
from certify.verdicts.cascade import VERIFIED
from certify.verdicts.vnnlib_check import check_properties

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"


def trained_model(cache: Path, epochs: int, seed: int) -> Path:
    """The clean-trained small CNN as ONNX (cached)."""
    from harden.io.bundle import Bundle
    from harden.io.export import export_onnx
    from harden.training.train import train_clean
    from harden.io.zoo import small_cnn

    path = cache / f"certify-small-cnn-e{epochs}-s{seed}.onnx"
    if path.exists():
        return path
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    torch.manual_seed(seed)
    bundle = Bundle(small_cnn(), (1, 28, 28), 10, {"kind": "zoo", "name": "small-cnn"},
                    data={"dataset": "mnist", "classes": test.classes, "input_range": [0.0, 1.0]})
    train_clean(bundle, train, test, epochs=epochs, seed=seed, quiet=False)
    cache.mkdir(parents=True, exist_ok=True)
    export_onnx(bundle, path)
    return path


def run_summary(run, limit: int | None = None) -> dict:
    samples = run.results[0].samples[:limit]
    seconds = sum(s.seconds for s in samples)
    by: dict[str, int] = {}
    for s in samples:
        key = f"{s.verdict}:{s.method}"
        by[key] = by.get(key, 0) + 1
    return {"samples": len(samples), "verified": sum(s.verdict == VERIFIED for s in samples),
            "falsified": sum(s.verdict == "falsified" for s in samples),
            "unknown": sum(s.verdict == "unknown" for s in samples), "by": by,
            "seconds": round(seconds, 3), "seconds_per_sample": seconds / max(len(samples), 1)}


def cascade_vs_alpha(model: Path, eps: float, limit: int, alpha_limit: int, batch_size: int, seed: int) -> dict:
    started = time.perf_counter()
    cascade = certify_model(model, [eps], limit=limit, batch_size=batch_size, seed=seed)
    cascade_wall = time.perf_counter() - started
    started = time.perf_counter()
    alpha = certify_model(model, [eps], limit=alpha_limit, batch_size=batch_size, methods=("alpha-crown",),
                          attack=False, seed=seed)
    alpha_wall = time.perf_counter() - started
    on_subset = run_summary(cascade, alpha_limit)
    alpha_summary = run_summary(alpha)
    return {
        "eps": eps,
        "cascade": {**run_summary(cascade), "wall_seconds": round(cascade_wall, 3),
                    "samples_per_second": len(cascade.results[0].samples) / cascade.results[0].seconds},
        "cascade_on_alpha_subset": on_subset,
        "alpha_crown_every_sample": {**alpha_summary, "wall_seconds": round(alpha_wall, 3)},
        "speedup_per_sample": alpha_summary["seconds_per_sample"] / max(on_subset["seconds_per_sample"], 1e-12),
        "speedup_per_sample_full_cascade": alpha_summary["seconds_per_sample"]
        / max(cascade.results[0].seconds / len(cascade.results[0].samples), 1e-12),
        "same_or_more_verified": on_subset["verified"] >= alpha_summary["verified"],
    }


def direct_lirpa_seconds(model: Path, eps: float, limit: int, batch_size: int, method: str) -> tuple[float, int]:
    """auto_LiRPA called by hand on the imported module: the baseline of our overhead."""
    auto_lirpa = lirpa()
    imported = import_onnx(model)
    shape = tuple(imported.input_shape)
    module = imported.module.eval()
    bounded = auto_lirpa.BoundedModule(module, torch.zeros(1, *shape), bound_opts={"verbosity": 0})
    test = load_dataset("mnist", "test").subset(limit)
    verified = 0
    started = time.perf_counter()
    for start in range(0, len(test), batch_size):
        x = test.x[start:start + batch_size].reshape(-1, *shape)
        y = test.y[start:start + batch_size]
        lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        perturbation = auto_lirpa.PerturbationLpNorm(norm=float("inf"), eps=None, x_L=lower, x_U=upper)
        bounded_x = auto_lirpa.BoundedTensor(x, perturbation)
        with torch.no_grad():
            bound, _ = bounded.compute_bounds(x=(bounded_x,), C=margin_matrix(y, 10), method=LIRPA_METHODS[method],
                                              bound_upper=False)
        verified += int((bound.min(1).values > 0).sum())
    return time.perf_counter() - started, verified


def overhead(model: Path, eps: float, limit: int, batch_size: int, method: str, repeats: int = 2) -> dict:
    """Best of `repeats` timings of each side, taken in turns (direct, ours, direct, ours, ...) so
    that a change in the load of a shared machine hits both sides alike."""
    direct, runs = [], []
    for _ in range(repeats):
        direct.append(direct_lirpa_seconds(model, eps, limit, batch_size, method))
        started = time.perf_counter()
        run = certify_model(model, [eps], limit=limit, batch_size=batch_size, methods=(method,), attack=False,
                            quiet=True)
        runs.append((time.perf_counter() - started, run))
    direct_seconds, direct_verified = min(direct)
    wall, ours = min(runs, key=lambda r: r[1].results[0].seconds)
    loop = ours.results[0].seconds
    return {"method": method, "eps": eps, "samples": limit, "direct_seconds": round(direct_seconds, 3),
            "direct_verified": direct_verified, "ours_loop_seconds": round(loop, 3),
            "ours_verified": ours.results[0].summary()["verified"], "ours_wall_seconds": round(wall, 3),
            "overhead_loop": loop / direct_seconds - 1, "overhead_wall": wall / direct_seconds - 1}


def vnncomp(methods: tuple[str, ...], folders: list[str], seed: int) -> dict:
    out = {}
    for folder in folders:
        expected = {(r["onnx"], Path(r["vnnlib"]).name): r
                    for r in csv.DictReader((VNNCOMP / folder / "expected_results.csv").open())}
        run = check_properties(None, [VNNCOMP / folder / "instances.csv"], methods=methods, seed=seed)
        rows = []
        for p in run.properties:
            e = expected.get((Path(p.onnx).name, Path(p.vnnlib).name), {})
            rows.append({"onnx": Path(p.onnx).name, "vnnlib": Path(p.vnnlib).name, "ours": p.result,
                         "ours_method": p.method, "ours_bound": p.bound, "ours_seconds": p.seconds,
                         **{k: e.get(k) for k in ("vnncomp2021_verdict", "abcrown2021", "abcrown2021_time_s",
                                                  "random_corner_cex", "lirpa_CROWN_margin",
                                                  "lirpa_alphaCROWN_margin")}})
        models = {}
        for onnx in sorted({r["onnx"] for r in rows}):
            mine = [r for r in rows if r["onnx"] == onnx]

            def count(key, test):
                return sum(1 for r in mine if r.get(key) not in (None, "") and test(r[key]))

            models[onnx] = {
                "properties": len(mine), "ours_unsat": count("ours", lambda v: v == "unsat"),
                "ours_sat": count("ours", lambda v: v == "sat"), "ours_unknown": count("ours", lambda v: v == "unknown"),
                "ours_seconds_per_property": statistics.fmean(r["ours_seconds"] for r in mine),
                "vnncomp2021_unsat": count("vnncomp2021_verdict", lambda v: v == "unsat"),
                "vnncomp2021_sat": count("vnncomp2021_verdict", lambda v: v == "sat"),
                "abcrown2021_unsat": count("abcrown2021", lambda v: v == "unsat"),
                "abcrown2021_seconds_per_property": statistics.fmean(
                    float(r["abcrown2021_time_s"]) for r in mine if r.get("abcrown2021_time_s")) if any(
                    r.get("abcrown2021_time_s") for r in mine) else None,
                "lirpa071_crown_margin_positive": count("lirpa_CROWN_margin", lambda v: float(v) > 0),
                "lirpa071_alpha_margin_positive": count("lirpa_alphaCROWN_margin", lambda v: float(v) > 0),
                "wrong": sum(
                    1 for r in mine if (r["ours"] == "unsat" and r["vnncomp2021_verdict"] == "sat")
                    or (r["ours"] == "sat" and r["vnncomp2021_verdict"] == "unsat")),
            }
        out[folder] = {"models": models, "properties": rows, "seconds": round(run.seconds, 3),
                       "skipped_rows": len(run.skipped)}
    return out


def tables(document: dict) -> str:
    lines = []
    for entry in document.get("cascade_vs_alpha", []):
        c, s, a = entry["cascade"], entry["cascade_on_alpha_subset"], entry["alpha_crown_every_sample"]
        lines += [f"\n### {entry['model']}: cascade vs alpha-CROWN on every sample, eps {entry['eps']}",
                  "| run | samples | verified | falsified | unknown | s/sample | by |", "|---|---|---|---|---|---|---|",
                  f"| cascade | {c['samples']} | {c['verified']} | {c['falsified']} | {c['unknown']} | "
                  f"{c['seconds_per_sample']:.4f} | {c['by']} |",
                  f"| cascade, first {s['samples']} | {s['samples']} | {s['verified']} | {s['falsified']} | "
                  f"{s['unknown']} | {s['seconds_per_sample']:.4f} | {s['by']} |",
                  f"| alpha-CROWN only, first {a['samples']} | {a['samples']} | {a['verified']} | - | {a['unknown']} | "
                  f"{a['seconds_per_sample']:.4f} | {a['by']} |",
                  f"\nspeedup per sample (same subset): {entry['speedup_per_sample']:.1f}x; "
                  f"(whole cascade run vs alpha subset): {entry['speedup_per_sample_full_cascade']:.1f}x; "
                  f"cascade {c['samples_per_second']:.2f} samples/s; same or more verified: "
                  f"{entry['same_or_more_verified']}"]
    if document.get("overhead"):
        lines += ["\n### overhead vs auto_LiRPA called directly",
                  "| model | method | samples | direct s | ours (loop) s | ours (wall, incl. load) s | overhead loop | overhead wall | verified direct / ours |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for o in document["overhead"]:
            lines.append(f"| {o['model']} | {o['method']} | {o['samples']} | {o['direct_seconds']:.2f} | "
                         f"{o['ours_loop_seconds']:.2f} | {o['ours_wall_seconds']:.2f} | {100 * o['overhead_loop']:+.1f}% | "
                         f"{100 * o['overhead_wall']:+.1f}% | {o['direct_verified']} / {o['ours_verified']} |")
    for folder, entry in document.get("vnncomp", {}).items():
        lines += [f"\n### vnncomp/{folder} ({entry['seconds']:.0f} s, {entry['skipped_rows']} csv rows skipped)",
                  "| model | props | ours unsat/sat/unknown | s/prop | VNN-COMP 2021 unsat/sat | abcrown2021 unsat, s/prop | lirpa 0.7.1 CROWN>0 / alpha>0 | contradictions |",
                  "|---|---|---|---|---|---|---|---|"]
        for onnx, m in entry["models"].items():
            ab = m["abcrown2021_seconds_per_property"]
            lines.append(f"| {onnx} | {m['properties']} | {m['ours_unsat']}/{m['ours_sat']}/{m['ours_unknown']} | "
                         f"{m['ours_seconds_per_property']:.3f} | {m['vnncomp2021_unsat']}/{m['vnncomp2021_sat']} | "
                         f"{m['abcrown2021_unsat']}, {'-' if ab is None else f'{ab:.1f}'} | "
                         f"{m['lirpa071_crown_margin_positive']} / {m['lirpa071_alpha_margin_positive']} | {m['wrong']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="ONNX model(s) with harden metadata "
                        "(default: train the small CNN for --train-epochs and export it)")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--eps", type=float, action="append", help="radius of the cascade vs alpha-CROWN runs; "
                        "repeat for several (default 0.1)")
    parser.add_argument("--limit", type=int, default=1000, help="test images for the cascade")
    parser.add_argument("--alpha-limit", type=int, default=1000, help="test images for alpha-CROWN on every sample")
    parser.add_argument("--overhead-limit", type=int, default=1000, help="test images for the overhead runs")
    parser.add_argument("--overhead-eps", type=float, default=0.02, help="eps of the overhead runs (0.1 proves nothing on a clean CNN)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--vnncomp-methods", default="ibp,crown,alpha-crown")
    parser.add_argument("--vnncomp-folders", default="vnncomp_test_tiny,mnistfc,verivital_mnist_conv")
    parser.add_argument("--skip-vnncomp", action="store_true")
    parser.add_argument("--skip-dataset", action="store_true")
    parser.add_argument("--skip-alpha", action="store_true", help="only the overhead runs on the dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/results/cache"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/certification_engine.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    document = {"command": " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "cascade_vs_alpha": [], "overhead": []}
    if not args.skip_dataset:
        models = args.model or [trained_model(args.cache, args.train_epochs, args.seed)]
        for model in models:
            for eps in [] if args.skip_alpha else args.eps or [0.1]:
                say(f"cascade vs alpha-CROWN on {model} at eps {eps}")
                entry = cascade_vs_alpha(model, eps, args.limit, min(args.alpha_limit, args.limit),
                                         args.batch_size, args.seed)
                document["cascade_vs_alpha"].append({"model": str(model), **entry})
            for method in ("ibp", "crown"):
                say(f"overhead of {method} on {model}")
                document["overhead"].append({"model": str(model), **overhead(model, args.overhead_eps,
                                             args.overhead_limit, args.batch_size, method)})
    if not args.skip_vnncomp and VNNCOMP.is_dir():
        methods = tuple(m for m in args.vnncomp_methods.split(",") if m)
        document["vnncomp"] = vnncomp(methods, [f for f in args.vnncomp_folders.split(",") if f], args.seed)
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(document, indent=1))
    print(tables(document))
    say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
